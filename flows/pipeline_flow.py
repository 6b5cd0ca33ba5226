"""What every pipeline flow shares: the flow decorator (threads, webhook hooks, a failure told in
one line) and the refusal of program paths in runs started through the API."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterator

from prefect import flow
from pydantic import BeforeValidator
from prefect.task_runners import ThreadPoolTaskRunner

from flows.notify import webhook_hooks
from tasks.run.runner import run_record
from tasks.run.stage import RunRef

OptionalText = Annotated[str, BeforeValidator(lambda value: value or "")]
"""A text parameter that may stay empty ("" or null: not given): a plain text box in the form, no None switch."""
OWN_PACKAGES = ("models", "tasks", "flows", "deployments", "episode2lora")
"""Exceptions of these packages say what happened in their message: shown without their class name."""


def pipeline_flow(name: str) -> Callable:
    """The `@flow` of a pipeline run, named after its run folder (`name`): prints logged, a thread per core for
    the fan-out, webhook hooks, a failure told in one line (`told_in_one_line`)."""
    decorate = flow(name=name, flow_run_name="{name}", log_prints=True,
                    task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2), **webhook_hooks())
    return lambda fn: decorate(told_in_one_line(fn))


def failure_line(exc: BaseException) -> str:
    """The one-line reason of a failure (our messages also say what to do), e.g. 'base model ... does not
    exist; pass ...'; an exception from outside this project keeps its class name in front."""
    text = " ".join(str(exc).split())
    if type(exc).__module__.split(".")[0] in OWN_PACKAGES and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _OneLineTaskFailure(logging.Filter):
    """Prefect's 'Task run failed with exception: <repr>' log starts with the failure's one line instead
    (the traceback still follows it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and record.exc_info[1] is not None \
                and str(record.msg).startswith("Task run failed with exception"):
            record.msg, record.args = f"{failure_line(record.exc_info[1])} (task run failed)", ()
        return True


def told_in_one_line(fn: Callable) -> Callable:
    """Wrap a flow function: when it fails, its error is logged as one line (the run's first error line,
    with the task's) and the flow run ends Failed with that line as its state message."""
    task_logger = logging.getLogger("prefect.task_runs")

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from prefect import get_run_logger
        from prefect.states import Failed

        if not any(isinstance(f, _OneLineTaskFailure) for f in task_logger.filters):
            task_logger.addFilter(_OneLineTaskFailure())
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            line = failure_line(exc)
            get_run_logger().error(line)
            return Failed(message=line, data=exc)

    run.__signature__ = inspect.signature(fn, eval_str=True)  # types resolved here, in `fn`'s module
    return run


def with_training(params: Any, profile: str, base: str) -> Any:
    """`params` with `train.profile` and `train.base` set where the form's top fields give them (empty: as
    `params` says): what a person sets on every run sits first in the form, and means what --set means."""
    given = {field: value for field, value in (("profile", profile), ("base", base)) if value}
    if not given:
        return params
    train = type(params.train).model_validate({**params.train.model_dump(), **given})
    return params.model_copy(update={"train": train})


@contextmanager
def recorded_run(source: str, run: RunRef, params: Any, inputs: list[str], until: str,
                 new_attempt: bool) -> Iterator[None]:
    """Hold the run and record it (tasks/run/runner.run_record): how every pipeline flow starts its run.
    A changed existing run is refused unless `new_attempt` (its old record then kept under attempts/)."""
    with run.store().lock():
        run.store().record_run(run_record(source, inputs, params, until), new_attempt=new_attempt)
        yield


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
