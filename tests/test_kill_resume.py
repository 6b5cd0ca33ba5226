"""SIGKILL a run of the demo config at seeded random moments in at least five stages, `resume` after
each kill, and compare every manifest and output file with an uninterrupted run of the same command.

Only what legitimately carries time or the attempt may differ: the columns in TIME_COLUMNS, the files
IGNORED names (Prefect's result cache, the run lock, markers and params rewritten by each attempt), and
timestamps, durations and the run folder's own path inside text reports (TIME_TEXT).
The figures (where each kill landed, what was compared) go to test-artifacts/kill_resume.md.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pyarrow.parquet as pq

from tasks.pipelines import stages_of
from tasks.run.store import RunStore
from tests.conftest import ARTIFACTS, ROOT, run_cli

ARGS = ["run", str(ROOT / "data" / "sample" / "episode01.mp4"), "--name", "demo", "--config", str(ROOT / "data" / "demo.yaml"),
        "--set", "select.min_images=4", "--until", "package"]
"""The demo config on one sample episode, up to the packaged dataset (training is killed and resumed in
tests/test_moved_run.py and tests/test_train.py)."""
TARGETS = ("frames", "segment", "embed", "cluster", "tier", "select", "augment", "caption", "package")
"""Stages to kill in: once a stage has started, SIGKILL after a seeded random delay. Short stages may
finish within the delay (the kill then lands in a later one), so there are more targets than the five
stages the test asks for."""
TIME_COLUMNS = {"seconds", "version_id"}
IGNORED = (".lock", ".prefect-results/*", "*.tmp", "*/_DONE.json", "*/plan.json", "*/params.json", "*/_parts.json")
"""Files that carry the attempt, not the result (markers and parts indexes hold manifest digests and file
stamps, compared through the manifests' parts; params.json is rewritten by each attempt with the same content)."""
TIME_TEXT = [re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?"),
             re.compile(r'"seconds": [0-9.]+')]
"""Timestamps and durations inside reports (JSON, HTML), replaced before files are compared."""


def _files(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(fnmatch(rel, pattern) for pattern in IGNORED):
            out[rel] = "parquet" if rel.endswith(".parquet") else hashlib.sha256(_normalized(path, root)).hexdigest()
    return out


def _normalized(path: Path, root: Path) -> bytes:
    """A file's bytes; text reports with the run folder, timestamps and durations blanked."""
    data = path.read_bytes()
    if path.suffix not in (".json", ".html", ".txt", ".yaml", ".toml", ".md"):
        return data
    text = data.decode("utf-8", "replace").replace(str(root), "<run>")
    for pattern in TIME_TEXT:
        text = pattern.sub("<time>", text)
    return text.encode()


def _table(path: Path):
    table = pq.read_table(path)
    return table.drop_columns([c for c in table.column_names if c in TIME_COLUMNS])


def _differences(killed: Path, clean: Path) -> list[str]:
    a, b = _files(killed), _files(clean)
    diffs = [f"only after kills: {p}" for p in sorted(set(a) - set(b))]
    diffs += [f"only uninterrupted: {p}" for p in sorted(set(b) - set(a))]
    for rel in sorted(set(a) & set(b)):
        if a[rel] == "parquet":
            if not _table(killed / rel).equals(_table(clean / rel)):
                diffs.append(f"table differs: {rel}")
        elif a[rel] != b[rel]:
            diffs.append(f"content differs: {rel}")
    return diffs


def _running_stage(store: RunStore) -> str:
    return next((s for s in stages_of("episode") if not store.is_done(s)), stages_of("episode")[-1])


def _started(store: RunStore, target: str, since: float) -> bool:
    """`target` began in this attempt (its params.json is newer than `since`), or is done already."""
    params = store.root / target / "params.json"
    return (params.is_file() and params.stat().st_mtime >= since) or store.is_done(target)


def test_runs_killed_in_five_stages_resume_to_the_uninterrupted_outputs(tmp_path, cli_env):
    rng = random.Random(14)
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    store = RunStore(killed_dir, "demo")
    landed: list[tuple[str, str, float]] = []  # (target, stage running at the kill, delay)
    command = [*ARGS, "--runs-dir", str(killed_dir)]
    targets = list(TARGETS)
    while targets := [t for t in targets if not store.is_done(t)]:
        target = targets.pop(0)
        since = time.time() - 1
        proc = subprocess.Popen([sys.executable, "-m", "episode2lora", *command], env=cli_env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not _started(store, target, since):
            time.sleep(0.05)
        delay = rng.uniform(0.0, 1.0)
        time.sleep(delay)
        if proc.poll() is not None:  # it finished first: nothing left to kill
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        landed.append((target, _running_stage(store), delay))
        command = ["resume", "demo", "--runs-dir", str(killed_dir)]
    resumed = run_cli(["resume", "demo", "--runs-dir", str(killed_dir)], cli_env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    clean = run_cli([*ARGS, "--runs-dir", str(clean_dir)], cli_env, timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]
    diffs = _differences(store.root, clean_dir / "demo")
    compared = _files(clean_dir / "demo")

    ARTIFACTS.mkdir(exist_ok=True)
    lines = ["# Kill/resume (tests/test_kill_resume.py)", "", "| kill | waited for | running at the kill | delay s |",
             "|---|---|---|---|"]
    lines += [f"| {i + 1} | {t} | {s} | {d:.2f} |" for i, (t, s, d) in enumerate(landed)]
    lines += ["", f"compared: {sum(v == 'parquet' for v in compared.values())} manifests/tables, "
                  f"{sum(v != 'parquet' for v in compared.values())} other files; differences: {len(diffs)}"]
    lines += [f"- {d}" for d in diffs[:50]]
    (ARTIFACTS / "kill_resume.md").write_text("\n".join(lines) + "\n")

    assert len({stage for _, stage, _ in landed}) >= 5, landed
    assert store.is_done("package")
    assert not diffs, diffs[:20]
