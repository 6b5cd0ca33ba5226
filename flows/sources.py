"""What every pipeline flow shares: the flow decorator (threads, webhook hooks) and, for render
folders and photo sets, their source's pipeline run under the run lock."""

from __future__ import annotations

import os
from typing import Any, Callable

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.notify import webhook_hooks

from tasks.pipelines import PIPELINES
from tasks.run.runner import run_pipeline
from tasks.run.stage import RunRef, StageResult


def pipeline_flow(name: str) -> Callable:
    """The `@flow` of a pipeline run, named after its run folder (`name`): prints logged, a thread per core for the fan-out, webhook hooks."""
    return flow(name=name, flow_run_name="{name}", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2),
                **webhook_hooks())


def run_source(source: str, flow_name: str, input_dir: str, name: str, runs_dir: str, params: Any,
               until: str) -> dict[str, StageResult]:
    """Record the run and run the `source` pipeline (tasks/pipelines.py) on `input_dir` up to `until`."""
    run = RunRef(runs_dir=runs_dir, name=name)
    store = run.store()
    with store.lock():
        store.write_run_record({"flow": flow_name, "inputs": [input_dir], "params": params.model_dump(mode="json"),
                                "until": until})
        return run_pipeline(run, params, PIPELINES[source], until, sources=[input_dir])
