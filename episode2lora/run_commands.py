"""`episode2lora run | resume | status | clean | report | validate`: episode runs from the terminal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from episode2lora.common import CONFIG, RUNS_DIR, check_path_length, check_until, check_utf8, check_writable, \
    console, err, execute, existing_store, fail, open_store, parse_sets, print_status


def check_inputs(inputs: list[str], name: str, runs_dir: Path, params: Any) -> list[str]:
    """What an episode run can get wrong in its inputs, checked before any orchestration: the name, the runs
    folder, the inputs, the detector. Returns the inputs as stored (absolute, each once); prints the ones
    that will be quarantined."""
    from tasks.sources.episodes import discover_videos, missing_inputs, normalize_inputs

    open_store(name, runs_dir)
    check_writable(runs_dir)
    for text in inputs:
        check_utf8(text, "input")
        check_path_length(os.path.abspath(os.path.expanduser(text)), "an input")
    inputs = normalize_inputs(inputs)
    try:
        discover_videos(inputs)
    except FileNotFoundError as exc:
        fail(str(exc))
    _check_detector(params)
    for text in missing_inputs(inputs):
        err.print(f"[yellow]warning:[/] input {text!r} matches no video file: it is quarantined, the rest goes on",
                  highlight=False)
    return inputs


def _check_detector(params: Any) -> None:
    """Fail naming segment.detector when it is set and is not a file (before frames run for an hour)."""
    detector = params.segment.detector
    if detector and not Path(detector).expanduser().is_file():
        fail(f"segment.detector: no such file {detector!r} (from {os.getcwd()}); give the path of an .onnx "
             "detector, or leave segment.detector unset")


def absolute_paths(params: Any) -> Any:
    """`params` with its local file paths (segment.detector) absolute, as run.json stores its inputs, so
    `resume` works from any folder."""
    detector = params.segment.detector
    if not detector or not Path(detector).expanduser().is_file():
        return params
    segment = params.segment.model_copy(update={"detector": str(Path(detector).expanduser().resolve())})
    return params.model_copy(update={"segment": segment})


def _execute(inputs: list[str], name: str, runs_dir: Path, params: Any, until: str, new_attempt: bool = False) -> None:
    """Run the episode pipeline (common.execute), then report: select's warnings, steps, LoRAs, stand-ins."""
    inputs = check_inputs(inputs, name, runs_dir, params)

    def flow() -> dict:
        from flows.episode_to_lora import episode_to_lora

        return episode_to_lora(inputs=inputs, name=name, runs_dir=str(runs_dir), params=params, until=until,
                               new_attempt=new_attempt)

    results = execute("episode", inputs, name, runs_dir, params, until, flow, new_attempt=new_attempt)
    store = open_store(name, runs_dir)
    for warning in results["select"].summary.get("warnings", []) if "select" in results else []:
        err.print(f"[yellow]warning:[/] select: {warning}", highlight=False)  # override entries that match nothing
    if "package" in results:  # the guide's total steps per character (images x repeats x epochs / batch)
        console.print("\ntraining steps:")
        for line in results["package"].summary.get("steps", []):
            console.print(f"  {line}", markup=False, highlight=False)
        from episode2lora.training_commands import steps_note

        if note := steps_note(params, "train" in results):
            console.print(f"  ({note})", markup=False, highlight=False)
    if "train" in results:  # the LoRA files, and a plain word when the base model is a stand-in
        from episode2lora.training_commands import print_loras

        print_loras(store, params)
    _print_stand_ins(params)
    if (store.root / "report" / "cluster_report.html").exists():
        console.print(f"\ncluster report: {store.root / 'report' / 'cluster_report.html'}")


def _print_stand_ins(params: Any) -> None:
    """Say plainly which models of this run are offline stand-ins, and how to use real ones."""
    notes = []
    if params.segment.model == "u2netp":
        notes.append("segmentation: u2netp, a small general model that also cuts out background objects; "
                     "for anime use --set segment.model=isnet-anime")
    if params.caption.captioner == "template":
        notes.append("captions: the offline template captioner; for BLIP2 use "
                     "--set caption.captioner=blip2:Salesforce/blip2-opt-2.7b")
    if params.embed.embedder == "colour-shape":
        notes.append("identity embeddings: colour-shape features (no weights); a learned embedder is e.g. "
                     "--set embed.embedder=clip:openai/clip-vit-base-patch32")
    if notes:
        console.print("\n[bold]stand-ins in this run[/] (they work offline; real models download on first use):")
        for note in notes:
            console.print(f"  - {note}", highlight=False)


def run(
    inputs: list[str] = typer.Argument(..., help="video files, folders of videos, or globs"),
    name: str = typer.Option(..., "--name", "-n", help="run name (a folder under --runs-dir)"),
    config: Optional[Path] = CONFIG,
    until: Optional[str] = typer.Option(None, "--until", help="last stage to run (default: the whole pipeline)"),
    sets: list[str] = typer.Option([], "--set", help="override one parameter, e.g. --set frames.mode=interval"),
    runs_dir: Path = RUNS_DIR,
    new_attempt: bool = typer.Option(False, "--new-attempt", help="on an existing run with other inputs or "
                                     "parameters: keep its record under attempts/ and run with these"),
) -> None:
    """Run the pipeline on episodes: a new run, or (with --new-attempt) other episodes or parameters for an existing one."""
    from flows.params import LAST_STAGE, ParamsError, load_params

    until = until or LAST_STAGE
    try:
        params = load_params(config, parse_sets(sets))
    except ParamsError as exc:
        fail(str(exc))
    check_until(until, "episode")
    _execute(inputs, name, runs_dir, absolute_paths(params), until, new_attempt)


def resume(name: str = typer.Argument(..., help="run name"), runs_dir: Path = RUNS_DIR) -> None:
    """Continue a failed or interrupted run with the parameters it was started with."""
    from flows.params import RunParams

    from tasks.run.store import RunRecordError

    try:
        record = open_store(name, runs_dir).read_run_record()
    except (FileNotFoundError, RunRecordError) as exc:
        fail(str(exc))
    from episode2lora.sources_cli import RUN_KINDS, resume_source

    if record.get("flow") in RUN_KINDS:  # image-source runs (sources_cli.py)
        return resume_source(record, name, runs_dir)
    _execute(record["inputs"], name, runs_dir, RunParams.model_validate(record["params"]), record["until"])


def status(name: str = typer.Argument(..., help="run name"), runs_dir: Path = RUNS_DIR,
           verify: bool = typer.Option(False, "--verify", help="also read every committed manifest in full and "
                                       "check it against its digest (finds bit rot)")) -> None:
    """Show each stage of a run: done, partial (n of m shards) or missing, with counts."""
    store = existing_store(name, runs_dir)
    print_status(store)
    if verify:
        _print_verification(store, runs_dir)


def _print_verification(store: Any, runs_dir: Path) -> None:
    """`status --verify`: every committed manifest against its digest; exits 1 naming what is damaged."""
    from tasks.pipelines import STAGES

    damaged = {stage: store.verify(stage) for stage in STAGES}
    damaged = {stage: problems for stage, problems in damaged.items() if problems}
    if not damaged:
        console.print("verified: every committed manifest matches its digest")
        return
    for stage, problems in damaged.items():
        for problem in problems:
            err.print(f"  damaged {problem}", highlight=False, markup=False)
    first = next(iter(damaged))
    fail(f"run '{store.name}': {len(damaged)} stage(s) damaged ({', '.join(damaged)}); redo from the first: "
         f"episode2lora clean {store.name} --stage {first} --runs-dir {runs_dir}, then episode2lora resume "
         f"{store.name} --runs-dir {runs_dir}", 1)


def clean(
    name: str = typer.Argument(..., help="run name"),
    stage: str = typer.Option(..., "--stage", "-s", help="first stage to remove"),
    runs_dir: Path = RUNS_DIR,
) -> None:
    """Remove a stage and every stage after it, so they run again."""
    from tasks.pipelines import STAGES
    from tasks.run.store import RunLockedError

    check_until(stage)
    store = existing_store(name, runs_dir)
    try:
        with store.lock():
            removed = store.clean(stage, STAGES)
    except RunLockedError as exc:
        fail(str(exc))
    console.print(f"removed: {', '.join(removed) or 'nothing (no such stage output)'}")


def report(name: str = typer.Argument(..., help="run name"), runs_dir: Path = RUNS_DIR) -> None:
    """Write the cluster report (<run>/report/cluster_report.html + .json) and print clusters per tier and kind."""
    from tasks.report import summary_table, write_report
    from tasks.run.store import StageNotDoneError

    store = existing_store(name, runs_dir)
    try:
        html_path, json_path, data = write_report(store)
    except StageNotDoneError as exc:
        fail(str(exc))
    console.print(summary_table(data))
    for warning in data["warnings"]:
        console.print(f"  [yellow]warning[/] {warning}")
    console.print(f"report: {html_path}\n        {json_path}")


def validate(
    directory: Path = typer.Argument(..., help="a kohya training tree (or a run folder: its package/ is checked)"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the JSON report here"),
    min_resolution: Optional[int] = typer.Option(None, "--min-resolution", help="shortest image side, pixels (default 512)"),
) -> None:
    """Check a training dataset before training; exits non-zero when it has errors."""
    import json

    from pydantic import ValidationError

    from tasks.validate import ValidateParams, format_summary, tree_root, validate_dataset

    root = tree_root(directory)
    if not root.is_dir():
        fail(f"no such folder: {directory}")
    try:
        params = ValidateParams(**({} if min_resolution is None else {"min_resolution": min_resolution}))
    except ValidationError as exc:
        fail(f"--min-resolution must be >= 1, got {min_resolution} ({exc.error_count()} error)")
    result = validate_dataset(root, params)
    console.print(format_summary(result), markup=False, highlight=False)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        console.print(f"report: {report}")
    if not result["passed"]:
        raise typer.Exit(1)
