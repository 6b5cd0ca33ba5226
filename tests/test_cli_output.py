"""What the command line prints reads well: `--help` types, output into a file or a pipe, `versions`,
`status` of a run's own stages, the steps a run trains, and no pid left in a finished run's lock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from episode2lora.cli import app
from tasks.run.store import RunStore
from tests.conftest import ROOT

COMMANDS = ["run", "resume", "status", "clean", "report", "serve", "ui", "validate", "train", "versions", "renders",
            "photos"]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _line(text: str, option: str) -> str:
    return next(line for line in text.splitlines() if f" {option} " in line)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_a_type_only_where_a_value_is_given(command):
    text = _help(*([command] if command else []))
    assert "<bool>" not in text and "list[" not in text, text
    assert "<" not in _line(text, "--help").split("Show this message")[0]


def test_help_shows_item_types_of_lists_and_the_types_of_values():
    run = _help("run")
    assert "<str>, repeatable" in _line(run, "--set") and "<path>" in _line(run, "--runs-dir")
    assert "<" not in _line(run, "--new-attempt").split("on an existing run")[0]
    assert "<str>" in _line(run, "inputs...") and "<int>" in _line(_help("ui"), "--port")


def _versions_registry(runs_dir, lora: str) -> str:
    from tasks.run import versions

    version = versions.start_version(runs_dir, character="hero_boy", run="sample", profile="demo")
    versions.update_version(runs_dir, version, status="completed", steps=30, best_val_loss=0.25, lora_path=lora)
    failed = versions.start_version(runs_dir, character="blob", run="sample")
    versions.update_version(runs_dir, failed, status="failed", error="base model '/models/sd15' does not exist")
    return version


def test_output_into_a_pipe_is_not_wrapped(tmp_path):
    """Paths longer than 80 columns stay whole on their line when the output is not a terminal."""
    runs_dir = tmp_path / ("a-long-folder-name-" * 4) / "runs"
    lora = str(runs_dir / "sample" / "train" / "shards" / "hero_boy" / "hero_boy.safetensors")
    version = _versions_registry(runs_dir, lora)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    out = subprocess.run([sys.executable, "-m", "episode2lora", "versions", "--runs-dir", str(runs_dir)],
                         env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(lora) > 120 and f"  {version}  LoRA   {lora}" in out.stdout.splitlines(), out.stdout
    assert str(runs_dir / "versions.parquet") in out.stdout


def test_versions_fit_80_columns_in_a_terminal(tmp_path):
    from rich.console import Console

    from episode2lora.training_commands import versions_table
    from tasks.run.versions import read_versions

    version = _versions_registry(tmp_path, str(tmp_path / "x.safetensors"))
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(versions_table(read_versions(tmp_path).to_pylist(), tmp_path / "versions.parquet"))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80 and any(version in line for line in lines), "\n".join(lines)


def test_status_lists_the_stages_of_the_runs_own_pipeline(tmp_path):
    from tasks.pipelines import stages_of

    episode = RunStore(tmp_path, "episodes")
    episode.write_run_record({"inputs": ["ep01.mp4"], "params": {}, "until": "frames"})
    photos = RunStore(tmp_path, "photos")
    photos.write_run_record({"flow": "photos-to-lora", "inputs": ["set"], "params": {}, "until": "train"})
    shown = {}
    for store in (episode, photos):
        result = CliRunner().invoke(app, ["status", store.name, "--runs-dir", str(tmp_path)])
        assert result.exit_code == 0, result.output
        shown[store.name] = [s for s in ("ingest", "frames", "evaluate") if f" {s} " in result.output]
    assert shown == {"episodes": ["frames", "evaluate"], "photos": ["ingest"]}
    assert "ingest" not in stages_of("episode")


def test_the_steps_a_run_trains_are_explained_beside_the_packaged_plan():
    from episode2lora.training_commands import steps_note
    from flows.params import load_params

    note = steps_note(load_params(ROOT / "data" / "demo.yaml"), trained=True)
    assert "trained 30 steps per character" in note and "train.profile demo" in note
    assert "2500 steps" in steps_note(load_params(None, {"train.profile": "final"}), trained=False)
    assert steps_note(load_params(None, {"train.profile": "package"}), trained=False) is None


def test_a_finished_run_leaves_no_pid_in_its_lock(tmp_path):
    store = RunStore(tmp_path, "run")
    with store.lock():
        assert store.locked_by() == f"pid {os.getpid()}"
    assert (store.root / ".lock").read_text() == "" and store.locked_by() is None
