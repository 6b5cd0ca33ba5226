#!/usr/bin/env bash
# The three runs the refactor check compares (demo, renders, photos), made with the code of one checkout.
#
#   benchmarks/compare_runs.sh CODE RUNS [SOURCES]
#
# CODE     the checkout whose code runs (its tasks/, flows/, episode2lora/ are imported: PYTHONPATH=CODE)
# RUNS     the runs folder written: RUNS/demo, RUNS/watch (renders), RUNS/anna (photos), RUNS/*.log, RUNS/times.txt
# SOURCES  the render folder and photo set (default: RUNS/../sources), built by benchmarks/make_sources.py
#          when missing; the before and after runs must read the same SOURCES (same paths, same bytes).
#
# Env: ONLY="renders photos" makes only those of demo, renders, photos; PYTHON, PREFECT_HOME (default
# CODE/.cache/prefect) and U2NET_HOME (default /work/main/.cache/u2net) may be set. Give a new RUNS folder:
# in an existing one the runs resume (their finished stages are reused, not made again). One run at a
# time (a small machine); exits 1 when a run failed.
#
# The demo reads CODE/data/sample, so compare the two sides with --same-path BEFORE_CODE AFTER_CODE, e.g.
# (before: a worktree of commit 1adee43 at /tmp/before, after: /work/main):
#   benchmarks/compare_runs.sh /tmp/before /tmp/compare/before
#   benchmarks/compare_runs.sh /work/main /tmp/compare/after
#   for r in demo watch anna; do .venv/bin/python -m benchmarks.compare_runs /tmp/compare/{before,after}/$r \
#       --same-path /tmp/before /work/main; done
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,21p "$0"; exit 2; }
CODE=$(cd "$1" && pwd)
mkdir -p "$2"
RUNS=$(cd "$2" && pwd)
SOURCES=${3:-$(dirname "$RUNS")/sources}
HERE=$(cd "$(dirname "$0")/.." && pwd)  # the checkout holding this script (and make_sources.py)
PYTHON=${PYTHON:-/work/main/.venv/bin/python}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME=${PREFECT_HOME:-$CODE/.cache/prefect} U2NET_HOME=${U2NET_HOME:-/work/main/.cache/u2net} PYTHONPATH=$CODE
mkdir -p "$PREFECT_HOME"

"$PYTHON" "$HERE/benchmarks/make_sources.py" "$SOURCES"
cd "$CODE"
commit=$(git -C "$CODE" rev-parse --short HEAD 2>/dev/null || echo '?')
echo "code: $("$PYTHON" -c 'import tasks; print(tasks.__file__)') (HEAD $commit), $(date -u +%FT%TZ)" | tee -a "$RUNS/times.txt"

TINY="--profile demo --base tiny --set train.save_every_steps=2 --set train.sample_prompts=[] \
      --set package.render.resolution=64 --set validate.min_resolution=64"
failed=0
run() {  # run NAME ARGS...: one episode2lora command, its output in RUNS/NAME.log, its time in RUNS/times.txt
    local name=$1 start rc=0; shift
    [[ " ${ONLY:-demo renders photos} " == *" $name "* ]] || return 0
    start=$(date +%s)
    echo "+ python -m episode2lora $*" | tee "$RUNS/$name.log"
    "$PYTHON" -m episode2lora "$@" >>"$RUNS/$name.log" 2>&1 || rc=$?
    echo "$name: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$RUNS/times.txt"
    [ "$rc" = 0 ] || failed=1
}
run demo run data/sample --name demo --config data/demo.yaml --runs-dir "$RUNS"
# shellcheck disable=SC2086  # TINY is a list of options
run renders renders "$SOURCES/renders" --name watch --trigger Kyana --resolution 64x64 \
    --stage1-steps 2 --stage2-steps 1 --stage2-lr 1e-12 $TINY --runs-dir "$RUNS"
# shellcheck disable=SC2086
run photos photos "$SOURCES/photos" --name anna --trigger ohwx --set train.max_steps=2 $TINY --runs-dir "$RUNS"
exit $failed
