"""What every CLI command shares: the consoles, failing with a message, `--set`, the shared options,
Prefect's offline defaults, and running a flow then reporting on its run (status, outputs)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True, soft_wrap=True)  # a message stays one line however long

RUNS_DIR = typer.Option(Path("data/runs"), "--runs-dir", help="folder holding all runs")
CONFIG = typer.Option(None, "--config", "-c", help="YAML file of stage parameters")


def quiet_prefect() -> None:
    """Offline, local defaults for Prefect unless the user set their own (call before Prefect is imported)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # INFO goes to the API (the UI's Logs tab of runs started here, by `ui`, `serve` or workers);
    # the terminal shows warnings only
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # a busy machine can take well over Prefect's default 20 s to start the temporary API server
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `code` (2: bad usage, 1: the run failed)."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def parse_sets(sets: list[str], example: str = "frames.mode=interval") -> dict[str, Any]:
    """`--set FIELD=VALUE` options as {"FIELD": value}, each value parsed as YAML."""
    overrides = {}
    for item in sets:
        if "=" not in item:
            fail(f"--set expects FIELD=VALUE (e.g. {example}), got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def check_until(stage: str, source: Optional[str] = None) -> None:
    """Fail naming the known stages (of `source`'s pipeline, else of any run) when `stage` is not one."""
    from tasks.pipelines import STAGES, stages_of

    known = stages_of(source) if source else list(STAGES)
    if stage not in known:
        fail(f"unknown stage '{stage}'; stages are: {', '.join(known)}")


def open_store(name: str, runs_dir: Path) -> Any:
    """The run store of `name`; fails saying the alphabet when the name is not a valid run name."""
    from tasks.run.store import RunNameError, RunStore

    try:
        return RunStore(runs_dir, name)
    except RunNameError as exc:
        fail(str(exc))


def check_writable(runs_dir: Path) -> None:
    """Fail naming the folder when runs cannot be written under `runs_dir` (read-only, not a folder)."""
    folder = Path(runs_dir).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        fail(f"--runs-dir {runs_dir}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"--runs-dir {runs_dir}: {folder} is read-only; make it writable or choose another --runs-dir")


def existing_store(name: str, runs_dir: Path) -> Any:
    """The run store of an existing run; fails naming the runs folder when there is none."""
    store = open_store(name, runs_dir)
    if not store.root.exists():
        fail(f"no run named '{name}' in {Path(runs_dir).resolve()}")
    return store


def print_status(store: Any) -> None:
    """The per-stage table of `episode2lora status`, then the quarantined items."""
    from tasks.pipelines import STAGES

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
    for line in store.quarantine_report(STAGES):
        console.print(f"  [yellow]quarantined[/] {line}")


class _StorageTracebacks(logging.Filter):
    """Drops the traceback from Prefect's log of a run that failed for lack of disk space or write access:
    the one-line error the CLI prints says the cause and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.run.store import storage_cause

        if record.exc_info and record.exc_info[1] is not None and storage_cause(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def run_and_report(store: Any, runs_dir: Path, call: Callable[[], dict], *, expected: tuple = (),
                   before_report: Callable[[], None] = lambda: None) -> dict:
    """Run a flow (`call`), then print the run's status and where each stage's manifest is.

    Errors of the kinds in `expected` (and a locked run) fail with their message; any other
    failure names the run and how to resume it (exit code 1).
    """
    from tasks.run.store import MARKER, RunChangedError, RunLockedError, storage_cause

    started = time.time()
    for logger in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(logger).addFilter(_StorageTracebacks())
    try:
        results = call()
    except (RunLockedError, RunChangedError, FileNotFoundError, *expected) as exc:
        before_report()
        fail(str(exc))
    except Exception as exc:  # the flow failed: say where, and how to continue
        before_report()
        cause = storage_cause(exc)
        if cause == "disk full":
            fail(f"run '{store.name}' stopped: the disk holding {store.root} is full ({exc})\n  free some space "
                 f"(or move the run), then continue with: episode2lora resume {store.name} --runs-dir {runs_dir}", 1)
        if cause == "read-only":
            fail(f"run '{store.name}' stopped: {store.root} is not writable ({exc})\n  make it writable "
                 f"(resume cannot help before that), then: episode2lora resume {store.name} --runs-dir {runs_dir}", 1)
        fail(f"run '{store.name}' failed: {exc}\n  continue with: episode2lora resume {store.name} --runs-dir {runs_dir}", 1)
    before_report()
    print_status(store)
    console.print(f"\n[bold green]done[/] — outputs in [bold]{store.root}[/]")
    for stage in results:
        manifest, marker = store.manifest_path(stage), store.stage_dir(stage) / MARKER
        fresh = marker.exists() and marker.stat().st_mtime >= started
        console.print(f"  {stage:<9} {manifest}  ({'computed now' if fresh else 'reused from an earlier run'})")
    return results
