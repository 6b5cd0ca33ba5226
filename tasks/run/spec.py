"""Stage specs: each stage declared once; its Prefect tasks, cache keys, fingerprint and plain run made from it.

A spec names the stage, its version, its parameter model, the parameters it reads (`reads`: its own and
other stages', e.g. `("select", "segment.margin")`), the roles of its inputs and its tags (`gpu`). Its
callables are plain functions of (store, the run's parameters, the inputs the runner hands it); a stage
never looks up another stage's folder by name, it reads `inputs[role].stage`. Its fingerprint is made in
one place, here: the parameters it reads, and its inputs' manifests (global) or its shards' (sharded).

- `GlobalStage`: `build(store, params, inputs, folder) -> (manifest, summary, extra outputs)`, once per fingerprint.
- `ShardedStage`: `plan(store, params, inputs) -> Plan` (pure: reads the run, writes nothing), then
  `shard(store, shard, params, plan)` per shard and `merge(store, plan, params)`.

`run_stage(spec, store, params, inputs)` runs any stage as one plain call (tests, benchmarks, the CLI's
finished-run check); `spec.submit` runs it inside a flow as Prefect tasks.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel

from tasks.run.stage import (Plan, RunRef, StageResult, bind_to_run, commit_global, publish, reused, settle,
                             stage_fingerprint, start_sharded)
from tasks.run.store import RunStore, fingerprint

Inputs = dict[str, StageResult]
"""What the runner hands a stage: its input roles -> the results of the stages bound to them."""
SOURCES = "sources"
"""The role (and pseudo-stage) of the run's input paths: episodes, a render folder, a photo set."""


def source_listing(path: str) -> list[tuple[str, int, int]]:
    """What a source path holds, by name, size and modification time (not its bytes): a file itself, a
    folder every file below it; nothing for a path that is not there (a glob)."""
    root = Path(path).expanduser()
    if root.is_file():
        return [("", root.stat().st_size, root.stat().st_mtime_ns)]
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def sources_result(paths: Any) -> StageResult:
    """The run's input paths as the result of the pseudo-stage `sources` (stages read `.summary['paths']`);
    its digest covers what they hold, so a whole-run stage that reads them is redone when a source changes."""
    digest = hashlib.sha256(json.dumps([list(paths), [source_listing(p) for p in paths]]).encode()).hexdigest()
    return StageResult(stage=SOURCES, fingerprint=digest, manifest_digest=digest, summary={"paths": list(paths)},
                       recomputed=False)


def _key(fp: str, done: bool) -> str:
    """A Prefect cache key: the fingerprint while the output is intact on disk, else unique."""
    return f"{fp}-done" if done else f"{fp}-{uuid.uuid4().hex}"


def read_setting(params: Any, path: str) -> Any:
    """The value at the dotted `path` of the run's parameters, as JSON for a fingerprint; a parameter model
    with `fingerprint_settings()` gives that (e.g. with the digest of a file it names)."""
    value = params
    for part in path.split("."):
        value = getattr(value, part)
    if hasattr(value, "fingerprint_settings"):
        return value.fingerprint_settings()
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


@dataclass(frozen=True)
class StageSpec:
    """What every stage declares: name, version, parameter model, what it reads, input roles, tags, UI title."""

    name: str
    version: int
    params: type[BaseModel]
    inputs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    """Input roles a pipeline may leave unbound (the stage then gets no such input)."""
    reads: tuple[str, ...] = ()
    """The parameters the stage reads, as dotted paths of the run's parameters; empty: its own section."""
    tags: tuple[str, ...] = ()
    title: str = ""
    rows: Optional[Callable[[RunStore, StageResult], Optional[list[dict]]]] = None
    """Per-item rows for the UI table of a finished stage (may also print what a person needs)."""

    def own(self, params: Any) -> BaseModel:
        """This stage's parameters out of the run's parameters."""
        return getattr(params, self.name)

    def settings(self, params: Any) -> dict[str, Any]:
        """The parameters this stage reads (its own section alone: that section's fields), for its fingerprint."""
        reads = self.reads or (self.name,)
        if reads == (self.name,):
            return read_setting(params, self.name)
        return {path: read_setting(params, path) for path in reads}

    def _publish(self, run: RunRef, result: StageResult, title: str, whole: bool) -> StageResult:
        rows = self.rows(run.store(), result) if (whole and self.rows) else None
        publish(result, title, rows=rows)
        return result


@dataclass(frozen=True)
class GlobalStage(StageSpec):
    """A whole-run stage: one build per fingerprint."""

    build: Callable[[RunStore, Any, Inputs, Path], tuple[Any, dict, list[str]]] = None  # type: ignore[assignment]

    def fingerprint(self, params: Any, inputs: Inputs) -> str:
        return stage_fingerprint(self.name, self.version, self.settings(params), inputs)

    def run(self, store: RunStore, params: Any, inputs: Inputs) -> StageResult:
        """The stage as one plain call (no Prefect)."""
        return commit_global(store, self.name, self.fingerprint(params, inputs), self.settings(params),
                             lambda folder: self.build(store, params, inputs, folder))

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
            return self._publish(run, self.run(run.store(), params, inputs), self.title or self.name, True)

        return task(stage_task, name=self.name, tags=list(self.tags), cache_key_fn=key_fn,
                    description=f"{self.title or self.name} (after {', '.join(self.inputs) or 'the sources'})")

    def submit(self, run: RunRef, params: Any, inputs: Inputs) -> StageResult:
        """Run the stage's task in the current flow, its results kept in the run folder."""
        return bind_to_run(self.task, run)(run, params, inputs)


@dataclass(frozen=True)
class ShardedStage(StageSpec):
    """A stage committed in shards (per episode, per character, per phase): plan, shards, merge."""

    plan: Callable[[RunStore, Any, Inputs], Plan] = None  # type: ignore[assignment]
    shard: Callable[[RunStore, Any, Any, Plan], StageResult] = None  # type: ignore[assignment]
    merge: Callable[[RunStore, Plan, Any], StageResult] = None  # type: ignore[assignment]
    shard_rows: Optional[Callable[[RunStore, StageResult], Optional[list[dict]]]] = None
    """Per-item rows for the UI table of one finished shard."""

    def planned(self, store: RunStore, params: Any, inputs: Inputs) -> Plan:
        """The stage's plan with its settings and fingerprint (the parameters it reads, its shards'
        fingerprints). Writes nothing."""
        plan = self.plan(store, params, inputs)
        settings = self.settings(params)
        return plan.model_copy(update={"settings": settings, "fingerprint": fingerprint(
            self.name, self.version, settings, plan.shard_fingerprints())})

    def run(self, store: RunStore, params: Any, inputs: Inputs) -> StageResult:
        """The stage as one plain call (no Prefect): plan, start, every shard in order, merge."""
        plan = self.planned(store, params, inputs)
        start_sharded(store, self.name, plan)
        for shard in plan.shards:
            self.shard(store, shard, params, plan)
        return self.merge(store, plan, params)

    def done(self, store: RunStore, params: Any, inputs: Inputs) -> Optional[StageResult]:
        """Its merged result when it and every shard of its plan are done on disk, else None (writes nothing)."""
        plan = self.planned(store, params, inputs)
        if not all(store.shard_done(self.name, s.key, s.fingerprint) for s in plan.shards):
            return None
        return reused(store, self.name, plan.fingerprint)

    @cached_property
    def tasks(self) -> tuple[Any, Any, Any]:
        """(plan, shard, merge) Prefect tasks; shard and merge cached by fingerprint while intact."""
        from prefect import task

        def shard_key(context: Any, parameters: dict[str, Any]) -> str:
            shard = parameters["shard"]
            return _key(shard.fingerprint, parameters["run"].store().shard_done(self.name, shard.key, shard.fingerprint))

        def merge_key(context: Any, parameters: dict[str, Any]) -> str:
            fp = parameters["plan"].fingerprint
            return _key(fp, parameters["run"].store().is_done(self.name, fp))

        def plan_task(run: RunRef, params: Any, inputs: Inputs) -> Plan:
            plan = self.planned(run.store(), params, inputs)
            start_sharded(run.store(), self.name, plan)
            return plan

        def shard_task(run: RunRef, shard: Any, params: Any, plan: Plan) -> StageResult:
            result = self.shard(run.store(), shard, params, plan)
            publish(result, f"{self.name} {shard.key}", rows=self.shard_rows(run.store(), result) if self.shard_rows else None)
            return result

        def merge_task(run: RunRef, plan: Plan, params: Any) -> StageResult:
            return self._publish(run, self.merge(run.store(), plan, params), self.title or self.name, True)

        return (task(plan_task, name=f"plan-{self.name}"),
                task(shard_task, name=self.name, task_run_name=f"{self.name}-{{shard.key}}",
                     tags=list(self.tags), cache_key_fn=shard_key),
                task(merge_task, name=f"merge-{self.name}", cache_key_fn=merge_key))

    def submit(self, run: RunRef, params: Any, inputs: Inputs) -> StageResult:
        """Plan, fan the shards out (a shard waits for the one it starts from), settle, merge."""
        plan_task, shard_task, merge_task = self.tasks
        plan = plan_task(run, params, inputs)
        futures: dict[str, Any] = {}
        for shard in plan.shards:
            futures[shard.key] = bind_to_run(shard_task, run).submit(
                run, shard, params, plan, wait_for=[futures[shard.after]] if shard.after else None)
        settle(list(futures.values()))
        return bind_to_run(merge_task, run)(run, plan, params, wait_for=list(futures.values()))


def run_stage(spec: StageSpec, store: RunStore, params: Any, inputs: Inputs) -> StageResult:
    """Run one stage as a plain call (no Prefect): `params` the run's parameters, `inputs` its roles' results."""
    return spec.run(store, params, inputs)


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
