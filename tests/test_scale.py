"""Series scale: a rerun with nothing to do answers without Prefect; per-episode work spreads over Dask workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

NO_PREFECT_CLI = """
import sys
from episode2lora.cli import app
try:
    app(sys.argv[1:], prog_name="episode2lora")
except SystemExit as exc:
    code = exc.code
print("prefect imported:", "prefect" in sys.modules, "exit:", code)
"""
"""The CLI in a process that says afterwards whether anything imported Prefect."""


@pytest.fixture(scope="module")
def four_episodes(tmp_path_factory) -> list[Path]:
    """Four tiny generated episodes (two shots each) in one folder."""
    from tests.footage import default_shots, render_episode

    folder = tmp_path_factory.mktemp("series")
    for seed in (11, 12, 13, 14):
        render_episode(folder / f"ep{seed}.mp4", shots=default_shots(seed)[:2], seed=seed, repeat_shot=None,
                       black_intro_s=0.0)
    return sorted(folder.glob("*.mp4"))


def _flow_runs(name: str) -> int:
    """How many flow runs named `name` the test Prefect server holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))))


def test_noop_rerun_starts_no_flow_and_a_changed_run_is_not_done(cli_env, episode, tmp_path):
    from flows.params import load_params
    from tasks.pipelines import PIPELINES
    from tasks.run.runner import finished_run, pipeline_done
    from tasks.run.stage import RunRef

    args = ["run", str(episode), "--name", "noop", "--until", "frames", "--runs-dir", str(tmp_path)]
    first = run_cli(args, cli_env)
    assert first.returncode == 0, first.stderr
    assert _flow_runs("noop") == 1

    again = subprocess.run([sys.executable, "-c", NO_PREFECT_CLI, *args], env=cli_env, text=True,
                           capture_output=True, cwd=ROOT)
    assert "prefect imported: False exit: 0" in again.stdout, again.stdout + again.stderr
    assert "done" in again.stdout and "reused from an earlier run" in again.stdout  # the same summary as a run
    assert _flow_runs("noop") == 1  # no second flow run

    run, params = RunRef(runs_dir=str(tmp_path), name="noop"), load_params(None, {})
    steps, sources = PIPELINES["episode"], [str(episode)]
    done = pipeline_done(run, params, steps, "frames", sources=sources)
    marker = run.store().marker("frames")
    assert done["frames"].fingerprint == marker["fingerprint"]
    assert done["frames"].manifest_digest == marker["manifest_digest"]

    changed = load_params(None, {"frames.interval_s": 0.25})
    assert pipeline_done(run, changed, steps, "frames", sources=sources) is None
    assert run.store().marker("frames") == marker, "the dry plan started the stage (it must write nothing)"
    record = {"inputs": sources, "params": params.model_dump(mode="json"), "until": "segment"}
    assert finished_run(run, params, steps, "segment", sources=sources, record=record) is None  # segment not run

    shard = next((run.store().stage_dir("frames") / "shards").iterdir())
    next(p for p in shard.rglob("*") if p.is_file() and p.name != "_DONE.json").unlink()
    assert pipeline_done(run, params, steps, "frames", sources=sources) is None
    deleted = subprocess.run([sys.executable, "-c", NO_PREFECT_CLI, *args], env=cli_env, text=True,
                             capture_output=True, cwd=ROOT)
    assert "prefect imported: True exit: 0" in deleted.stdout, deleted.stdout + deleted.stderr
    assert _flow_runs("noop") == 2  # the deleted output was redone by a flow


def test_two_dask_workers_divide_four_episodes_and_match_one_process(prefect_api, four_episodes, tmp_path):
    from distributed import Client, LocalCluster

    from benchmarks.compare_runs import TIMING, compare
    from flows.episode_to_lora import episode_to_lora
    from flows.params import load_params
    from tasks.pipelines import PIPELINES
    from tasks.run.runner import run_steps
    from tasks.run.store import RunStore
    from tests.dask_shards import ShardLog

    inputs = [str(p) for p in four_episodes]
    params = load_params(None, {"segment.shard_size": 1000})  # one segment shard per episode
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(ShardLog())
        episode_to_lora(inputs=inputs, name="dask", runs_dir=str(tmp_path), params=params, until="segment",
                        task_runner="dask", dask_address=cluster.scheduler_address)
        ran = client.run(lambda dask_worker: dask_worker.plugins["shard-log"].ran)
    print("shards per worker:", ran)

    episodes = {p.stem for p in four_episodes}
    for stage in ("frames", "segment"):
        per_worker = [{shard.rsplit("-", 1)[0] if stage == "segment" else shard for task, shard in shards if task == stage}
                      for shards in ran.values()]
        assert len(per_worker) == 2 and all(per_worker), f"{stage}: one worker ran every shard: {ran}"
        assert set().union(*per_worker) == episodes and not set.intersection(*per_worker), ran

    run_steps(RunStore(tmp_path, "plain"), params, PIPELINES["episode"], "segment", sources=inputs)  # one process, no Prefect
    assert compare(tmp_path / "dask", tmp_path / "plain", set(TIMING)) == {"frames": [], "segment": []}
