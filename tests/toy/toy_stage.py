"""A toy stage for tests/test_add_stage.py: counts the frames it is handed, times a factor.

It is all a stage is: parameters, a pure function, and its spec. The test copies it into a copy of the
project's `tasks/` and adds one row to that copy's pipeline table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field

from tasks.run.spec import GlobalStage, Inputs
from tasks.run.store import RunStore


class CountFramesParams(BaseModel):
    factor: int = Field(1, ge=1, description="each frame counts this many times")


def count_frames(store: RunStore, params: Any, inputs: Inputs, folder: Path) -> tuple[pa.Table, dict, list[str]]:
    """One row: the number of frames of the `frames` input, times the factor."""
    frames = store.read_manifest(inputs["frames"].stage).num_rows
    counted = frames * params.count_frames.factor
    return pa.table({"item_id": ["all"], "counted": [counted]}), {"counted": counted}, []


COUNT_FRAMES = GlobalStage(name="count_frames", version=1, params=CountFramesParams, inputs=("frames",),
                           title="counted frames", build=count_frames)
