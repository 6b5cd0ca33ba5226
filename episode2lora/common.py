"""What every CLI command shares: the consoles, failing with a message, `--set`, the shared options,
Prefect's offline defaults, and running a flow then reporting on its run (status, outputs)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

UNWRAPPED = 10_000
"""Width of the output when it is not a terminal: lines are never wrapped, tables take their natural width."""


def make_console(stderr: bool = False) -> Console:
    """A console wrapped to the terminal's width; into a file or a pipe (COLUMNS unset) not wrapped at all.
    Messages on stderr stay one line however long."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr, soft_wrap=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=UNWRAPPED)


console = make_console()
err = make_console(stderr=True)

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
    """Print `error: message` on stderr and exit with `code` (2: bad usage, 1: the run failed); the lines
    after the first are indented as its details."""
    first, *details = str(message).splitlines() or [""]
    text = "\n".join([first, *(line if line.startswith("  ") or not line.strip() else f"  {line}" for line in details)])
    err.print(f"[bold red]error:[/] {escape(text)}", highlight=False)  # a message is text: '[x' is no markup
    raise typer.Exit(code)


def parse_sets(sets: list[str], example: str = "frames.mode=interval") -> dict[str, Any]:
    """`--set FIELD=VALUE` options as {"FIELD": value}, each value parsed as YAML."""
    overrides = {}
    for item in sets:
        if "=" not in item:
            fail(f"--set expects FIELD=VALUE (e.g. {example}), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            fail(f"--set {key}: the value {value!r} is not valid YAML ({problem}); to pass it as text, quote it: "
                 f"--set '{key}=\"{value}\"'")
    for key in overrides:
        for other in overrides:
            if other.startswith(f"{key}."):
                fail(f"--set {key} and --set {other} overlap: set either the whole of {key!r} or fields inside it")
    return overrides


def check_path_length(text: str, what: str) -> None:
    """Fail naming `what` when the path `text` (or one name in it) is longer than the system allows."""
    encoded = os.fsencode(str(text))
    try:
        path_max, name_max = os.pathconf("/", "PC_PATH_MAX"), os.pathconf("/", "PC_NAME_MAX")
    except (OSError, ValueError):  # pragma: no cover - every POSIX system answers
        return
    longest = max((len(name) for name in encoded.split(b"/")), default=0)
    if len(encoded) >= path_max or longest > name_max:
        fail(f"{what} is longer than the system allows ({len(encoded)} bytes, longest name {longest}; limits "
             f"{path_max} and {name_max}): {os.fsdecode(encoded[:60])!r}...; use a shorter path")


def check_utf8(text: str, what: str) -> None:
    """Fail naming `what` when the path `text` is not valid UTF-8 (it could not be stored in the run)."""
    from tasks.run.store import storable_text

    if storable_text(text) != text:
        fail(f"{what} '{storable_text(text)}' is not valid UTF-8 text, so the run cannot store it: rename it "
             "(e.g. with convmv), or give its folder (a file in it whose name is not UTF-8 is quarantined)")


def check_not_locked(store: Any) -> None:
    """Fail at once, before anything starts, when another process is writing the run."""
    holder = store.locked_by()
    if holder:
        fail(f"run '{store.name}' is being written by {holder} (lock {store.root / '.lock'}); "
             "wait for it to finish or stop it first")


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
    check_path_length(os.path.abspath(runs_dir), "--runs-dir")
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


def run_stages(store: Any) -> list[str]:
    """The stages of the run's own pipeline (run.json's `flow`: renders-to-lora, photos-to-lora; else
    episodes); every stage there is when its record cannot be read."""
    from tasks.pipelines import PIPELINES, STAGES, stages_of

    try:
        source = str(store.read_run_record().get("flow", "")).removesuffix("-to-lora")
    except (FileNotFoundError, ValueError):
        return list(STAGES)
    return stages_of(source if source in PIPELINES else "episode")


def print_status(store: Any) -> None:
    """The per-stage table of `episode2lora status`, then the quarantined items."""
    table = Table(title=f"run {store.name}  ({store.root})")
    for column in ("stage", "state", "shards", "rows", "kept", "quarantined", "fingerprint"):
        table.add_column(column, justify="right" if column in ("rows", "kept", "quarantined") else "left")
    colours = {"done": "green", "partial": "yellow", "missing": "dim"}
    for stage in run_stages(store):
        s = store.stage_status(stage)
        shards = f"{s['shards_done']} of {s['shards']}" if s["shards"] else ""
        table.add_row(stage, f"[{colours[s['state']]}]{s['state']}[/]", shards,
                      *(str(s[k]) if s[k] is not None else "" for k in ("rows", "kept", "quarantined")),
                      s["fingerprint"])
    console.print(table)
    for path in store.broken_files():
        what = "the run's record: `resume` cannot read it" if path == "run.json" else \
            "its stage counts as not done: `resume` redoes it"
        console.print(f"  [yellow]broken[/] {store.root / path} is not a JSON object ({what})", highlight=False,
                      soft_wrap=True)
    for line in store.quarantine_report(run_stages(store)):
        console.print(f"  [yellow]quarantined[/] {line}")


@contextmanager
def flow_server() -> Iterator[None]:
    """The API server of a CLI run (`deployments.api_server.run_api`), started with Ctrl-C held back.

    The server inherits the blocked signal, so a Ctrl-C sent to the whole process group (what a terminal
    does) stops this process, while the server its flow reports to keeps running until this process
    stops it on its way out. A Ctrl-C during the server's start takes effect once it is up.
    """
    from deployments.api_server import run_api

    held = threading.current_thread() is threading.main_thread()
    with ExitStack() as stack:
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            stack.enter_context(run_api())
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        yield


class _StorageTracebacks(logging.Filter):
    """Drops the traceback from Prefect's log of a run that failed for lack of disk space or write access,
    on a damaged manifest or record, or on a run another process holds: the one-line error the CLI prints
    says the cause and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.run.store import ManifestDamagedError, RunLockedError, RunRecordError, storage_cause

        error = record.exc_info[1] if record.exc_info else None
        told = (ManifestDamagedError, RunLockedError, RunRecordError)  # their messages say what to do
        if error is not None and (storage_cause(error) or isinstance(error, told)):
            record.exc_info, record.exc_text = None, None
        return True


class _InterruptCrash(logging.Filter):
    """Drops Prefect's "Crash detected! ... interrupt signal" record: on Ctrl-C the CLI's one line says
    what happened and how to continue."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "aborted by an interrupt signal" not in record.getMessage()


def execute(source: str, inputs: list[str], name: str, runs_dir: Path, params: Any, until: str,
            flow: Callable[[], dict], *, new_attempt: bool = False, expected: tuple = (),
            before_report: Callable[[], None] = lambda: None) -> dict:
    """The one way a run starts from the terminal, for every source (episode, renders, photos).

    Checked before any orchestration: the run's record (a changed run is refused unless `new_attempt`) and
    its lock. A rerun with nothing to do is answered from the stage markers (no Prefect); otherwise `flow()`
    (which imports and calls the source's flow) runs against a Prefect server that dies with this process.
    Then the run's status and outputs are printed (`run_and_report`). `params`: the run's resolved parameters.
    """
    from tasks.pipelines import PIPELINES
    from tasks.run.runner import finished_run, run_record
    from tasks.run.stage import RunRef
    from tasks.run.store import RunChangedError, RunRecordError

    store = open_store(name, runs_dir)
    record = run_record(source, inputs, params, until)
    try:
        store.check_run_record(record, new_attempt=new_attempt)
    except (RunChangedError, RunRecordError, ValueError) as exc:
        fail(str(exc))
    check_not_locked(store)
    run = RunRef(runs_dir=str(runs_dir), name=name)

    def call() -> dict:
        done = None if new_attempt else finished_run(run, params, PIPELINES[source], until, sources=inputs, record=record)
        if done is not None:
            return done
        with flow_server():  # Prefect is imported after the server is up
            return flow()

    return run_and_report(store, runs_dir, call, expected=expected, before_report=before_report)


def run_and_report(store: Any, runs_dir: Path, call: Callable[[], dict], *, expected: tuple = (),
                   before_report: Callable[[], None] = lambda: None) -> dict:
    """Run a flow (`call`), then print the run's status and where each stage's manifest is.

    Errors of the kinds in `expected` (and a locked run) fail with their message; any other
    failure names the run and how to resume it (exit code 1).
    """
    from tasks.run.store import MARKER, RunChangedError, RunLockedError, storage_cause

    from tasks.run.progress import STOP

    STOP.clear()  # a run starts un-interrupted (a Ctrl-C of an earlier run in this process is over)
    started = time.time()
    for logger in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(logger).addFilter(_StorageTracebacks())
        logging.getLogger(logger).addFilter(_InterruptCrash())
    try:
        results = call()
    except (RunLockedError, RunChangedError, FileNotFoundError, *expected) as exc:
        before_report()
        fail(str(exc))
    except KeyboardInterrupt:  # Ctrl-C: committed shards are kept, the shard in progress is redone
        from tasks.run.progress import STOP

        STOP.set()  # a shard still running in a worker thread stops at its next step, so the process can exit
        fail(f"run '{store.name}' interrupted (Ctrl-C); finished stages and shards are kept; continue with: "
             f"episode2lora resume {store.name} --runs-dir {runs_dir}", 130)
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
