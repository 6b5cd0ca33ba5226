"""Progress of long work: live bars on a terminal, a few plain lines elsewhere, an artifact in Prefect.

Where stderr is a terminal the bars redraw in place (rich). Where it is not (a log file, CI, a
pipe) each unit of work writes at most six plain lines: started, every quarter done, finished.
`EPISODE2LORA_NO_PROGRESS=1` silences both; the Prefect progress artifact is written either way.
"""

from __future__ import annotations

import os
import sys
import time
import threading
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_lock = threading.Lock()
_bars: Progress | None = None
_open = 0
QUARTERS = 4
"""Plain-line mode reports this many evenly spaced steps of a known total."""
QUIET_S = 30.0
"""Plain-line mode, unknown total: at most one line per this many seconds."""


STOP = threading.Event()
"""Set when the run is interrupted (Ctrl-C): work in other threads stops at its next progress step."""


class Interrupted(RuntimeError):
    """Raised by `StageProgress.advance` once STOP is set: the unit of work in progress is given up
    (its temporary folder is never committed, so a resume redoes it)."""


def _silenced() -> bool:
    return os.environ.get("EPISODE2LORA_NO_PROGRESS") == "1"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def _shared_bars() -> Progress:
    global _bars
    if _bars is None:
        _bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(file=sys.stderr), transient=False,
        )
    return _bars


def _prefect_artifact(description: str) -> str | None:
    """Create a progress artifact when running inside a Prefect task or flow run."""
    try:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return None
    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return None
    try:
        return str(create_progress_artifact(progress=0.0, description=description))
    except Exception:  # the UI is a nicety: never fail the work because of it
        return None


class _Lines:
    """Plain-line progress of one unit of work: start, each quarter (or every QUIET_S), end."""

    def __init__(self, description: str, total: int | None, stream: TextIO):
        self.description, self.total, self.stream = description, total, stream
        self.started = self.last_line = time.monotonic()
        self.next_step = 1
        total_text = f"{total} items" if total else "total unknown"
        self._say(f"started ({total_text})")

    def _say(self, text: str) -> None:
        with _lock:
            self.stream.write(f"{self.description}: {text}\n")
            self.stream.flush()

    def update(self, done: int) -> None:
        if self.total:
            if done * QUARTERS >= self.next_step * self.total and done < self.total:
                self.next_step = done * QUARTERS // self.total + 1
                self._say(f"{done}/{self.total} ({100 * done // self.total}%)")
        elif time.monotonic() - self.last_line >= QUIET_S:
            self.last_line = time.monotonic()
            self._say(f"{done} done")

    def close(self, done: int) -> None:
        self._say(f"finished {done} in {time.monotonic() - self.started:.1f} s")


class StageProgress:
    """Count finished items of one unit of work (an episode, a shard) and show it."""

    def __init__(self, description: str, total: int | None):
        global _open
        self.total = total
        self.done = 0
        self._artifact = _prefect_artifact(description)
        self._last_report = 0.0
        self._task = None
        self._lines: _Lines | None = None
        if _silenced():
            return
        if not _is_terminal(sys.stderr):
            self._lines = _Lines(description, total, sys.stderr)
            return
        with _lock:
            bars = _shared_bars()
            if _open == 0:
                bars.start()
            _open += 1
            self._task = bars.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if STOP.is_set():
            raise Interrupted(f"interrupted after {self.done} of {self.total} items")
        self.done += n
        if self._task is not None:
            _shared_bars().update(self._task, completed=self.done)
        elif self._lines is not None:
            self._lines.update(self.done)
        now = time.monotonic()
        if self._artifact and self.total and now - self._last_report > 2.0:
            self._last_report = now
            self._report()

    def set_total(self, total: int) -> None:
        self.total = total
        if self._task is not None:
            _shared_bars().update(self._task, total=total)
        elif self._lines is not None:
            self._lines.total = total

    def _report(self) -> None:
        try:
            from prefect.artifacts import update_progress_artifact
            update_progress_artifact(self._artifact, progress=min(100.0, 100.0 * self.done / self.total))
        except Exception:
            pass

    def close(self) -> None:
        global _open
        if self._artifact and self.total:
            self.done = self.total
            self._report()
        if self._lines is not None:
            self._lines.close(self.done)
        if self._task is None:
            return
        with _lock:
            bars = _shared_bars()
            bars.update(self._task, completed=self.total or self.done)
            _open -= 1
            if _open == 0:
                bars.stop()
                for task_id in list(bars.task_ids):  # the next unit of work starts a fresh set of bars
                    bars.remove_task(task_id)
        self._task = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
