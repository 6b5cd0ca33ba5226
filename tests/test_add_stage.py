"""Adding a stage is its module and one row of the pipeline table: a toy stage added to a copy of the
project's episode table runs through the CLI (its `--until`, `--set`, `status`) and a Prefect flow."""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("tasks", "flows", "models", "deployments", "episode2lora")


def _project_with_the_toy_stage(to: Path) -> list[str]:
    """A copy of the project's code with tests/toy/toy_stage.py as tasks/count_frames.py and one row for it
    (after frames) in the episode table; returns the changed lines of tasks/pipelines.py."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, to / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "toy" / "toy_stage.py", to / "tasks" / "count_frames.py")
    table = to / "tasks" / "pipelines.py"
    before = table.read_text()
    after = before.replace("from tasks.frames import FRAMES\n",
                           "from tasks.frames import FRAMES\nfrom tasks.count_frames import COUNT_FRAMES\n")
    after = after.replace("step(FRAMES), step(SEGMENT)", "step(FRAMES), step(COUNT_FRAMES), step(SEGMENT)")
    table.write_text(after)
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def _cli(args: list[str], env: dict, project: Path) -> subprocess.CompletedProcess:
    """The CLI of the project copy (run from its folder, so its packages are the ones imported)."""
    return subprocess.run([sys.executable, "-m", "episode2lora", *args], env=env, cwd=project, text=True,
                          capture_output=True, timeout=900)


def test_a_toy_stage_added_by_one_row_runs_through_the_cli_and_a_prefect_flow(tmp_path, cli_env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, TaskRunFilter, TaskRunFilterFlowRunId

    project = tmp_path / "project"
    changed = _project_with_the_toy_stage(project)
    assert len(changed) == 3, changed  # one import added, one row changed (old and new line)
    env = {**cli_env, "PYTHONPATH": str(project)}
    runs = tmp_path / "runs"
    args = ["run", str(ROOT / "data" / "sample" / "episode01.mp4"), "--name", "toy-stage", "--until", "count_frames",
            "--set", "count_frames.factor=3", "--runs-dir", str(runs)]
    out = _cli(args, env, project)
    assert out.returncode == 0, out.stdout + out.stderr

    import pyarrow.parquet as pq

    frames = pq.read_table(runs / "toy-stage" / "frames" / "manifest.parquet").num_rows
    counted = pq.read_table(runs / "toy-stage" / "count_frames" / "manifest.parquet").to_pylist()
    assert frames > 0 and counted == [{"item_id": "all", "counted": 3 * frames}]
    status = _cli(["status", "toy-stage", "--runs-dir", str(runs)], env, project)
    assert status.returncode == 0 and "count_frames" in status.stdout, status.stdout + status.stderr
    assert not (runs / "toy-stage" / "segment").exists()

    with get_client(sync_client=True) as client:  # the run was a Prefect flow run with a task of the toy stage
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["toy-stage"])))
        assert [run.state.type.value for run in flow_runs] == ["COMPLETED"]
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_runs[0].id])))
    assert "count_frames" in {task.name.rsplit("-", 1)[0] for task in tasks}, sorted(task.name for task in tasks)
