"""What a render-folder run and a photo-set run share: a source's pipeline run under the run lock."""

from __future__ import annotations

from typing import Any

from tasks.pipelines import PIPELINES
from tasks.run.runner import run_pipeline
from tasks.run.stage import RunRef, StageResult


def run_source(source: str, flow_name: str, input_dir: str, name: str, runs_dir: str, params: Any,
               until: str) -> dict[str, StageResult]:
    """Record the run and run the `source` pipeline (tasks/pipelines.py) on `input_dir` up to `until`."""
    run = RunRef(runs_dir=runs_dir, name=name)
    store = run.store()
    with store.lock():
        store.write_run_record({"flow": flow_name, "inputs": [input_dir], "params": params.model_dump(mode="json"),
                                "until": until})
        return run_pipeline(run, params, PIPELINES[source], until, sources=[input_dir])
