"""What every pipeline flow shares: the flow decorator (threads, webhook hooks) and the refusal of
program paths in runs started through the API."""

from __future__ import annotations

import os
from typing import Any, Callable

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.notify import webhook_hooks


def pipeline_flow(name: str) -> Callable:
    """The `@flow` of a pipeline run, named after its run folder (`name`): prints logged, a thread per core for the fan-out, webhook hooks."""
    return flow(name=name, flow_run_name="{name}", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2),
                **webhook_hooks())


PROGRAM_PARAMS = ("train.kohya_scripts",)
"""Parameters that name a program the run executes: set on the command line or in a config file,
never in flow parameters sent to the API (a web page must not pick what runs on this machine)."""


def refuse_programs_from_api(params: Any) -> None:
    """ValueError naming the field when a run started through the API (a deployment) sets a PROGRAM_PARAMS one
    (`params`: a run's parameter model, or {"train": TrainParams} for train-only runs)."""
    from prefect.runtime import deployment

    if not deployment.id:
        return
    for dotted in PROGRAM_PARAMS:
        value: Any = params
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if value:
            raise ValueError(f"{dotted} names a program to run ({value!r}); it is refused in runs started through "
                             f"the API or the UI form: start this run from the command line "
                             f"(episode2lora run ... --set {dotted}=PATH, or in a --config file)")
