"""Where a flow's tasks run: threads in the flow's process (default) or a Dask cluster.

`task_runner="dask"` sends the data-parallel tasks (per-episode, per-shard) to Dask workers:
a local cluster of worker processes on this machine, or an existing cluster given by
`dask_address` (e.g. `tcp://scheduler:8786` with `dask worker` processes on other machines).
A flow's task runner is fixed when the flow starts, so the flow re-enters itself once as a
subflow whose runner is Dask (`run_on_dask`); everything else stays the same.
"""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

TaskRunnerKind = Literal["threads", "dask"]
RUNNERS: tuple[str, ...] = get_args(TaskRunnerKind)


def dask_task_runner(address: str | None = None) -> Any:
    """A DaskTaskRunner: connect to `address`, or start a local cluster, one worker process per core."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - prefect-dask is a dependency
        raise ImportError("task_runner='dask' needs prefect-dask: pip install prefect-dask") from exc
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": os.cpu_count() or 2, "processes": True, "threads_per_worker": 1})


def check_runner(task_runner: str) -> None:
    """Raise ValueError naming `task_runner` when it is not a known runner."""
    if task_runner not in RUNNERS:
        raise ValueError(f"task_runner must be one of {', '.join(RUNNERS)}, got {task_runner!r}")


def on_dask() -> bool:
    """True inside a flow run whose tasks already go to Dask."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx is not None and type(ctx.task_runner).__name__ == "DaskTaskRunner"


def run_on_dask(flow: Any, address: str | None = None) -> Any:
    """Run the current flow run's flow again, with the same parameters, as a Dask subflow.

    The webhook (if any) is left to the outer run, so it is sent once.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None:
        raise RuntimeError("run_on_dask must be called inside a flow run")
    parameters = dict(ctx.parameters)
    if "webhook_url" in parameters:
        parameters["webhook_url"] = ""
    return flow.with_options(task_runner=dask_task_runner(address))(**parameters)
