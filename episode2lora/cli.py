"""`episode2lora`: run, inspect, resume and clean runs from the terminal."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err = Console(stderr=True)

RUNS_DIR = typer.Option(Path("data/runs"), "--runs-dir", help="folder holding all runs")


def _quiet_prefect() -> None:
    """Offline, local defaults for Prefect unless the user set their own."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # a busy machine can take well over Prefect's default 20 s to start the temporary API server
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


_quiet_prefect()  # before anything imports prefect


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in sets:
        if "=" not in item:
            _fail(f"--set expects FIELD=VALUE (e.g. frames.mode=interval), got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _execute(inputs: list[str], name: str, runs_dir: Path, params: Any, until: str) -> None:
    from flows.episode_to_lora import episode_to_lora
    from tasks.run.store import RunLockedError, RunStore

    store = RunStore(runs_dir, name)
    started = time.time()
    try:
        results = episode_to_lora(inputs=inputs, name=name, runs_dir=str(runs_dir), params=params, until=until)
    except RunLockedError as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(str(exc))
    except Exception as exc:  # the flow failed: say where, and how to continue
        _fail(f"run '{store.name}' failed: {exc}\n  continue with: episode2lora resume {store.name} --runs-dir {runs_dir}", 1)
    _print_status(store)
    console.print(f"\n[bold green]done[/] — outputs in [bold]{store.root}[/]")
    for stage in results:
        manifest = store.manifest_path(stage)
        fresh = manifest.exists() and manifest.stat().st_mtime >= started
        console.print(f"  {stage:<9} {manifest}  ({'computed now' if fresh else 'reused from an earlier run'})")
    if "package" in results:  # the guide's total steps per character (images x repeats x epochs / batch)
        console.print("\ntraining steps:")
        for line in results["package"].summary.get("steps", []):
            console.print(f"  {line}", markup=False, highlight=False)
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


@app.command()
def run(
    inputs: list[str] = typer.Argument(..., help="video files, folders of videos, or globs"),
    name: str = typer.Option(..., "--name", "-n", help="run name (a folder under --runs-dir)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of stage parameters"),
    until: Optional[str] = typer.Option(None, "--until", help="last stage to run (default: the whole pipeline)"),
    sets: list[str] = typer.Option([], "--set", help="override one parameter, e.g. --set frames.mode=interval"),
    runs_dir: Path = RUNS_DIR,
) -> None:
    """Run the pipeline on episodes (a new run, or more episodes for an existing one)."""
    from flows.params import LAST_STAGE, ParamsError, load_params

    _quiet_prefect()
    until = until or LAST_STAGE
    try:
        params = load_params(config, _parse_sets(sets))
    except ParamsError as exc:
        _fail(str(exc))
    _check_until(until, "episode")
    _execute(inputs, name, runs_dir, params, until)


@app.command()
def resume(name: str = typer.Argument(..., help="run name"), runs_dir: Path = RUNS_DIR) -> None:
    """Continue a failed or interrupted run with the parameters it was started with."""
    from flows.params import RunParams
    from tasks.run.store import RunStore

    _quiet_prefect()
    try:
        record = RunStore(runs_dir, name).read_run_record()
    except FileNotFoundError as exc:
        _fail(str(exc))
    if record.get("flow") in ("renders-to-lora", "photos-to-lora"):  # image-source runs (sources_cli.py)
        from episode2lora.sources_cli import resume_source

        return resume_source(record, name, runs_dir)
    _execute(record["inputs"], name, runs_dir, RunParams.model_validate(record["params"]), record["until"])


@app.command()
def status(name: str = typer.Argument(..., help="run name"), runs_dir: Path = RUNS_DIR) -> None:
    """Show each stage of a run: done, partial (n of m shards) or missing, with counts."""
    from tasks.run.store import RunStore

    store = RunStore(runs_dir, name)
    if not store.root.exists():
        _fail(f"no run named '{name}' in {Path(runs_dir).resolve()}")
    _print_status(store)


@app.command()
def clean(
    name: str = typer.Argument(..., help="run name"),
    stage: str = typer.Option(..., "--stage", "-s", help="first stage to remove"),
    runs_dir: Path = RUNS_DIR,
) -> None:
    """Remove a stage and every stage after it, so they run again."""
    from tasks.run.store import RunLockedError, RunStore

    _check_until(stage)
    store = RunStore(runs_dir, name)
    if not store.root.exists():
        _fail(f"no run named '{name}' in {Path(runs_dir).resolve()}")
    try:
        with store.lock():
            removed = store.clean(stage)
    except RunLockedError as exc:
        _fail(str(exc))
    console.print(f"removed: {', '.join(removed) or 'nothing (no such stage output)'}")


@app.command()
def report(name: str = typer.Argument(..., help="run name"), runs_dir: Path = RUNS_DIR) -> None:
    """Write the cluster report (<run>/report/cluster_report.html + .json) and print clusters per tier and kind."""
    from tasks.report import summary_table, write_report
    from tasks.run.store import RunStore, StageNotDoneError

    store = RunStore(runs_dir, name)
    if not store.root.exists():
        _fail(f"no run named '{name}' in {Path(runs_dir).resolve()}")
    try:
        html_path, json_path, data = write_report(store)
    except StageNotDoneError as exc:
        _fail(str(exc))
    console.print(summary_table(data))
    for warning in data["warnings"]:
        console.print(f"  [yellow]warning[/] {warning}")
    console.print(f"report: {html_path}\n        {json_path}")


DEPLOYMENTS = typer.Option(None, "--config", help="deployments file (default: deployments/prefect.yaml)")
LIMIT = typer.Option(None, "--limit", help="at most this many runs at once")


@app.command()
def serve(config: Optional[Path] = DEPLOYMENTS, limit: Optional[int] = LIMIT) -> None:
    """Serve every deployment of deployments/prefect.yaml (full run, reprocess schedule, train-only, ...)."""
    from deployments.serve import CONFIG, DeploymentConfigError, serve_all

    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        serve_all(config or CONFIG, limit)
    except DeploymentConfigError as exc:
        _fail(str(exc))


@app.command()
def deploy(
    pool: str = typer.Option(..., "--pool", help="process work pool (prefect work-pool create NAME --type process)"),
    config: Optional[Path] = DEPLOYMENTS,
    working_dir: Optional[Path] = typer.Option(None, "--working-dir", help="project folder on the worker machines (default: this one)"),
) -> None:
    """Register every deployment with a work pool; `prefect worker start --pool NAME` runs them anywhere."""
    from deployments.serve import CONFIG, PROJECT, DeploymentConfigError, deploy_all

    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        ids = deploy_all(pool, config or CONFIG, working_dir or PROJECT)
    except DeploymentConfigError as exc:
        _fail(str(exc))
    console.print(f"registered {len(ids)} deployments with work pool [bold]{pool}[/]; "
                  f"start workers with: prefect worker start --pool {pool}")


@app.command()
def ui(
    port: int = typer.Option(4200, "--port", help="port of the local Prefect server on 127.0.0.1"),
    config: Optional[Path] = DEPLOYMENTS,
    limit: Optional[int] = LIMIT,
) -> None:
    """Start a local Prefect server (UI on 127.0.0.1) and serve the deployments; Ctrl-C stops both."""
    from deployments.serve import CONFIG, DeploymentConfigError, ui as start_ui

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        start_ui(port, config or CONFIG, limit)
    except (DeploymentConfigError, OSError, RuntimeError) as exc:
        _fail(str(exc))


@app.command()
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
        _fail(f"no such folder: {directory}")
    try:
        params = ValidateParams(**({} if min_resolution is None else {"min_resolution": min_resolution}))
    except ValidationError as exc:
        _fail(f"--min-resolution must be >= 1, got {min_resolution} ({exc.error_count()} error)")
    result = validate_dataset(root, params)
    console.print(format_summary(result), markup=False, highlight=False)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        console.print(f"report: {report}")
    if not result["passed"]:
        raise typer.Exit(1)


def _check_until(stage: str, source: str | None = None) -> None:
    """Fail naming the known stages (of `source`'s pipeline, else of any run) when `stage` is not one."""
    from tasks.pipelines import stages_of
    from tasks.run.store import STAGES

    known = stages_of(source) if source else STAGES
    if stage not in known:
        _fail(f"unknown stage '{stage}'; stages are: {', '.join(known)}")


def _print_status(store: Any) -> None:
    from tasks.run.store import STAGES

    table = Table(title=f"run {store.name}  ({store.root})")
    for column in ("stage", "state", "shards", "rows", "kept", "quarantined", "fingerprint"):
        table.add_column(column, justify="right" if column in ("rows", "kept", "quarantined") else "left")
    colours = {"done": "green", "partial": "yellow", "missing": "dim"}
    for stage in STAGES:
        s = store.stage_status(stage)
        shards = f"{s['shards_done']} of {s['shards']}" if s["shards"] else ""
        table.add_row(stage, f"[{colours[s['state']]}]{s['state']}[/]", shards,
                      *(str(s[k]) if s[k] is not None else "" for k in ("rows", "kept", "quarantined")),
                      s["fingerprint"])
    console.print(table)
    quarantined = store.quarantine_report()
    for line in quarantined:
        console.print(f"  [yellow]quarantined[/] {line}")


from episode2lora import training_commands  # noqa: E402  (`train DIR` and `versions`)

training_commands.register(app)

from episode2lora import sources_cli  # noqa: E402  (`renders DIR` and `photos DIR`)

sources_cli.register(app)


def main() -> None:  # pragma: no cover - `python -m episode2lora`
    app(prog_name="episode2lora")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
