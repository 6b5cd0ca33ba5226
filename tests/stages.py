"""Stages run as plain calls in tests: a slice of a pipeline table through the runner, no Prefect.

`run_plain(store, "segment", after="frames", segment=SegmentParams(...))` runs the episode pipeline's
stages after `frames` (read as done on disk) up to `segment`, with default parameters for every stage
not given. The same runner the flows use (`tasks/run/runner.run_steps`), with the same inputs bound.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from flows.params import RunParams
from flows.source_params import PhotosRunParams, RendersRunParams
from tasks.pipelines import PIPELINES
from tasks.run.runner import run_steps
from tasks.run.stage import StageResult
from tasks.run.store import RunStore

PARAMS = {"episode": RunParams, "renders": RendersRunParams, "photos": PhotosRunParams}


def run_params(source: str = "episode", **sections: Any) -> Any:
    """The run parameters of a source's pipeline: defaults, with the given stage sections."""
    return PARAMS[source](**sections)


def run_plain(store: RunStore, until: str, *, after: Optional[str] = None, source: str = "episode",
              sources: Sequence[str] = (), params: Any = None, **sections: Any) -> StageResult:
    """Run the stages (after, until] of a source's pipeline as plain calls; the result of `until`."""
    params = params if params is not None else run_params(source, **sections)
    return run_steps(store, params, PIPELINES[source], until, sources=sources, after=after)[until]
