"""A Dask worker plugin for tests: which worker ran which shard of which stage."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin


class ShardLog(WorkerPlugin):
    """A Dask worker plugin that records (stage, shard key) of every Prefect shard task the worker starts."""

    name = "shard-log"

    def setup(self, worker) -> None:
        self.worker, self.ran = worker, []

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and key in self.worker.state.tasks:
            found = _task_and_shard(self.worker.state.tasks[key].run_spec, {})
            if "shard" in found:
                self.ran.append((found["task"], found["shard"]))


def _task_and_shard(obj, found: dict, depth: int = 0) -> dict:
    """The Prefect task's name and the `shard` parameter's key, looked up in a Dask run spec."""
    from prefect import Task
    from pydantic import BaseModel

    if depth > 8 or len(found) == 2:
        return found
    if isinstance(obj, Task):
        found.setdefault("task", obj.name)
    elif isinstance(obj, dict):
        if isinstance(obj.get("shard"), BaseModel):
            found.setdefault("shard", obj["shard"].key)
        for value in obj.values():
            _task_and_shard(value, found, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _task_and_shard(value, found, depth + 1)
    else:
        for attr in ("args", "kwargs", "value", "func"):
            if hasattr(obj, attr) and not isinstance(obj, BaseModel):
                _task_and_shard(getattr(obj, attr), found, depth + 1)
    return found
