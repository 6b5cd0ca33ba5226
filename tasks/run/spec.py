"""Stage specs: each stage declared once, its Prefect tasks, cache keys and plain `run` made from it.

A spec names the stage, its version, its parameter model, the roles of its inputs and its tags
(`gpu`). Its callables are plain functions of (store, the run's parameters, the inputs the runner
hands it); a stage never looks up another stage's folder by name, it reads `inputs[role].stage`.

- `GlobalStage`: one `build(store, params, inputs) -> StageResult` for the whole run.
- `ShardedStage`: `plan(...) -> plan` (with `.shards`, each with `.key` and `.fingerprint`, and a
  stage `.fingerprint`), `shard(store, shard, params, plan)` per shard, `merge(store, plan, params)`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional

from pydantic import BaseModel

from tasks.run.stage import RunRef, StageResult, bind_to_run, dry_plans, publish, reused, settle, stage_fingerprint
from tasks.run.store import RunStore

Inputs = dict[str, StageResult]
"""What the runner hands a stage: its input roles -> the results of the stages bound to them."""


def _key(fp: str, done: bool) -> str:
    """A Prefect cache key: the fingerprint while the output is intact on disk, else unique."""
    return f"{fp}-done" if done else f"{fp}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class StageSpec:
    """What every stage declares: name, version, parameter model, input roles, tags, UI title."""

    name: str
    version: int
    params: type[BaseModel]
    inputs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    """Input roles a pipeline may leave unbound (the stage then gets no such input)."""
    tags: tuple[str, ...] = ()
    title: str = ""
    rows: Optional[Callable[[RunStore, StageResult], Optional[list[dict]]]] = None
    """Per-item rows for the UI table of a finished stage (may also print what a person needs)."""

    def own(self, params: Any) -> BaseModel:
        """This stage's parameters out of the run's parameters."""
        return getattr(params, self.name)

    def _publish(self, run: RunRef, result: StageResult, title: str, whole: bool) -> StageResult:
        rows = self.rows(run.store(), result) if (whole and self.rows) else None
        publish(result, title, rows=rows)
        return result


@dataclass(frozen=True)
class GlobalStage(StageSpec):
    """A whole-run stage: one build per fingerprint."""

    build: Callable[[RunStore, Any, Inputs], StageResult] = None  # type: ignore[assignment]
    probe: Optional[Callable[[Any, Inputs], str]] = None
    """The stage's fingerprint when it is not that of its own parameters and inputs (cache keys)."""

    def fingerprint(self, params: Any, inputs: Inputs) -> str:
        if self.probe is not None:
            return self.probe(params, inputs)
        return stage_fingerprint(self.name, self.version, self.own(params), inputs)

    def run(self, store: RunStore, params: Any, inputs: Inputs) -> StageResult:
        """The stage as one plain call (no Prefect)."""
        return self.build(store, params, inputs)

    def done(self, store: RunStore, params: Any, inputs: Inputs) -> Optional[StageResult]:
        """Its result when it is done on disk with the fingerprint a run would give it now, else None."""
        return reused(store, self.name, self.fingerprint(params, inputs))

    @cached_property
    def task(self) -> Any:
        from prefect import task

        def key_fn(context: Any, parameters: dict[str, Any]) -> str:
            fp = self.fingerprint(parameters["params"], parameters["inputs"])
            return _key(fp, parameters["run"].store().is_done(self.name, fp))

        def stage_task(run: RunRef, params: Any, inputs: Inputs) -> StageResult:
            return self._publish(run, self.build(run.store(), params, inputs), self.title or self.name, True)

        return task(stage_task, name=self.name, tags=list(self.tags), cache_key_fn=key_fn,
                    description=f"{self.title or self.name} (after {', '.join(self.inputs) or 'the sources'})")

    def submit(self, run: RunRef, params: Any, inputs: Inputs) -> StageResult:
        """Run the stage's task in the current flow, its results kept in the run folder."""
        return bind_to_run(self.task, run)(run, params, inputs)


@dataclass(frozen=True)
class ShardedStage(StageSpec):
    """A stage committed in shards (per episode, per character, per phase): plan, shards, merge."""

    plan: Callable[[RunStore, Any, Inputs], Any] = None  # type: ignore[assignment]
    shard: Callable[[RunStore, Any, Any, Any], StageResult] = None  # type: ignore[assignment]
    merge: Callable[[RunStore, Any, Any], StageResult] = None  # type: ignore[assignment]
    shard_name: str = "{shard.key}"
    """Prefect task-run name of a shard after `<stage>-` (a template over the task's parameters)."""
    shards_of: Callable[[Any], list] = lambda plan: plan.shards
    key_of: Callable[[Any], str] = lambda shard: shard.key
    """Where a plan keeps its shards and a shard its key (and `.fingerprint`)."""
    waits_for: Optional[Callable[[Any], Optional[str]]] = None
    """The key of the shard this one starts from (a fine-tune after its base training), if any."""
    shard_rows: Optional[Callable[[RunStore, StageResult], Optional[list[dict]]]] = None
    """Per-item rows for the UI table of one finished shard."""

    def run(self, store: RunStore, params: Any, inputs: Inputs) -> StageResult:
        """The stage as one plain call (no Prefect): plan, every shard in order, merge."""
        plan = self.plan(store, params, inputs)
        for shard in self.shards_of(plan):
            self.shard(store, shard, params, plan)
        return self.merge(store, plan, params)

    def done(self, store: RunStore, params: Any, inputs: Inputs) -> Optional[StageResult]:
        """Its merged result when it and every shard of its plan are done on disk, else None (writes nothing)."""
        with dry_plans():
            plan = self.plan(store, params, inputs)
        if not all(store.shard_done(self.name, self.key_of(s), s.fingerprint) for s in self.shards_of(plan)):
            return None
        return reused(store, self.name, plan.fingerprint)

    @cached_property
    def tasks(self) -> tuple[Any, Any, Any]:
        """(plan, shard, merge) Prefect tasks; shard and merge cached by fingerprint while intact."""
        from prefect import task

        def shard_key(context: Any, parameters: dict[str, Any]) -> str:
            shard = parameters["shard"]
            done = parameters["run"].store().shard_done(self.name, self.key_of(shard), shard.fingerprint)
            return _key(shard.fingerprint, done)

        def merge_key(context: Any, parameters: dict[str, Any]) -> str:
            fp = parameters["plan"].fingerprint
            return _key(fp, parameters["run"].store().is_done(self.name, fp))

        def plan_task(run: RunRef, params: Any, inputs: Inputs) -> Any:
            return self.plan(run.store(), params, inputs)

        def shard_task(run: RunRef, shard: Any, params: Any, plan: Any) -> StageResult:
            result = self.shard(run.store(), shard, params, plan)
            publish(result, f"{self.name} {self.key_of(shard)}", rows=self.shard_rows(run.store(), result) if self.shard_rows else None)
            return result

        def merge_task(run: RunRef, plan: Any, params: Any) -> StageResult:
            return self._publish(run, self.merge(run.store(), plan, params), self.title or self.name, True)

        return (task(plan_task, name=f"plan-{self.name}"),
                task(shard_task, name=self.name, task_run_name=f"{self.name}-{self.shard_name}",
                     tags=list(self.tags), cache_key_fn=shard_key),
                task(merge_task, name=f"merge-{self.name}", cache_key_fn=merge_key))

    def submit(self, run: RunRef, params: Any, inputs: Inputs) -> StageResult:
        """Plan, fan the shards out (a shard waits for the one it starts from), settle, merge."""
        plan_task, shard_task, merge_task = self.tasks
        plan = plan_task(run, params, inputs)
        futures: dict[str, Any] = {}
        for shard in self.shards_of(plan):
            before = self.waits_for(shard) if self.waits_for else None
            futures[self.key_of(shard)] = bind_to_run(shard_task, run).submit(
                run, shard, params, plan, wait_for=[futures[before]] if before else None)
        settle(list(futures.values()))
        return bind_to_run(merge_task, run)(run, plan, params, wait_for=list(futures.values()))


@dataclass(frozen=True)
class Step:
    """A row of a pipeline table: a stage and the stages bound to its input roles (role -> stage)."""

    spec: Any
    bind: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def inputs(self, results: dict[str, StageResult]) -> Inputs:
        """The results this step reads, by role; the sources have none."""
        return bound_inputs(self.spec, self.bind, results)


def bound_inputs(spec: Any, bind: dict[str, str], results: dict[str, StageResult]) -> Inputs:
    """The results of the stages `bind` names for the roles of `spec` (a role unbound: the stage of its
    name); an optional role only when it is bound and its stage's result is at hand (a slice of a table
    run after that stage without it: no such input)."""
    roles = (*spec.inputs, *(role for role in spec.optional if bind.get(role) in results))
    return {role: results[bind.get(role, role)] for role in roles}


def check_roles(name: str, roles: tuple[str, ...], bind: dict[str, str]) -> dict[str, str]:
    """`bind`, when every role it names is one of `roles` (of the stage or hook `name`); else KeyError listing them."""
    unknown = set(bind) - set(roles)
    if unknown:
        raise KeyError(f"{name} has no input role {', '.join(sorted(unknown))}; its roles: {', '.join(roles)}")
    return dict(bind)


def step(spec: Any, **bind: str) -> Step:
    """A pipeline row: `step(AUGMENT, images="ingest")` binds the role `images` to the `ingest` stage."""
    return Step(spec, check_roles(spec.name, (*spec.inputs, *spec.optional), bind))
