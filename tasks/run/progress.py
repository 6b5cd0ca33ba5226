"""Progress of long work: a rich bar in the terminal and a progress artifact in the Prefect UI."""

from __future__ import annotations

import os
import sys
import time
import threading

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_lock = threading.Lock()
_bars: Progress | None = None
_open = 0


def _shared_bars() -> Progress:
    global _bars
    if _bars is None:
        _bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(file=sys.stderr), transient=False,
            disable=os.environ.get("EPISODE2LORA_NO_PROGRESS") == "1",
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


class StageProgress:
    """Count finished items of one unit of work (an episode, a shard) and show it."""

    def __init__(self, description: str, total: int | None):
        global _open
        self.total = total
        self.done = 0
        self._artifact = _prefect_artifact(description)
        self._last_report = 0.0
        with _lock:
            bars = _shared_bars()
            if _open == 0:
                bars.start()
            _open += 1
            self._task = bars.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        _shared_bars().update(self._task, completed=self.done)
        now = time.monotonic()
        if self._artifact and self.total and now - self._last_report > 2.0:
            self._last_report = now
            self._report()

    def set_total(self, total: int) -> None:
        self.total = total
        _shared_bars().update(self._task, total=total)

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
        with _lock:
            bars = _shared_bars()
            bars.update(self._task, completed=self.total or self.done)
            _open -= 1
            if _open == 0:
                bars.stop()

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
