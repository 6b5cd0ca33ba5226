"""The pipeline runner: one function that runs a slice of a pipeline table inside a flow.

A pipeline is a list of `Step`s (tasks/run/spec.py) and `Hook`s in run order. `run_pipeline`
runs the stages after `after` up to and including `until` (kedro's `--from-nodes`/`--to-nodes`),
handing each stage the results bound to its input roles; a hook (the cluster report, the dataset
check) runs once, right after the last of its `after` stages that ran, handed its inputs the same way.

`finished_run` answers a rerun with nothing to do from the stage markers alone, in plain Python,
before any orchestration starts (no Prefect import, no server, no flow run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Optional, Sequence

from tasks.run.spec import SOURCES, Step, bound_inputs, check_roles, run_stage, sources_result
from tasks.run.links import publish_outputs
from tasks.run.stage import RunRef, StageResult
from tasks.run.store import RunLockedError, RunStore, StageNotDoneError

@dataclass(frozen=True)
class Hook:
    """Work that is not a stage (writes no manifest): runs after the last of its `after` stages, handed
    the results bound to its input roles (an optional role only when its stage has run)."""

    name: str
    after: tuple[str, ...]
    call: Callable[[RunRef, dict[str, StageResult]], Any]
    inputs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    bind: dict[str, str] = field(default_factory=dict)

    def given(self, results: dict[str, StageResult]) -> dict[str, StageResult]:
        """The results this hook reads, by role."""
        return bound_inputs(self, self.bind, results)

    @cached_property
    def task(self) -> Any:
        from prefect import task

        return task(self.call, name=self.name)


def hook(name: str, call: Callable[[RunRef, dict[str, StageResult]], Any], *, after: tuple[str, ...],
         inputs: tuple[str, ...] = (), optional: tuple[str, ...] = (), **bind: str) -> Hook:
    """A pipeline row that is not a stage: `hook("cluster-report", write_cluster_report, after=("tier",
    "select"), inputs=("clusters", "tiers"), clusters="cluster", tiers="tier")`."""
    return Hook(name, after, call, inputs, optional, check_roles(name, (*inputs, *optional), bind))


def run_kind(source: str) -> str:
    """What a run of an image source records as its `flow` in run.json (`resume` reads it): renders-to-lora."""
    return f"{source}-to-lora"


def run_record(source: str, inputs: Sequence[str], params: Any, until: str) -> dict[str, Any]:
    """What run.json records of a run of `source` (episode, renders, photos): the one definition the flows
    write, the CLI checks before a run and `finished_run` compares. (An episode run records no `flow`.)"""
    kind = {} if source == "episode" else {"flow": run_kind(source)}
    return {**kind, "inputs": list(inputs), "params": params.model_dump(mode="json"), "until": until}


def stage_names(steps: Sequence[Any]) -> list[str]:
    """The stages of a pipeline table, in run order (hooks left out)."""
    return [s.name for s in steps if isinstance(s, Step)]


def stages_between(steps: Sequence[Any], until: str, after: Optional[str] = None) -> list[str]:
    """The stages after `after` up to and including `until`. Raises ValueError naming an unknown stage."""
    names = stage_names(steps)
    for name in (until, after):
        if name is not None and name not in names:
            raise ValueError(f"unknown stage '{name}'; this pipeline's stages are: {', '.join(names)}")
    start = names.index(after) + 1 if after else 0
    return names[start:names.index(until) + 1]


def run_pipeline(run: RunRef, params: Any, steps: Sequence[Any], until: str, *, sources: Sequence[str] = (),
                 after: Optional[str] = None, results: Optional[dict[str, StageResult]] = None
                 ) -> dict[str, StageResult]:
    """Run the slice (after, until] of `steps` in the current flow; returns every stage's result by name.

    `results` carries the results of stages run before (by an earlier call), `sources` the run's inputs.
    """
    chosen = stages_between(steps, until, after)
    results = dict(results or {})
    for item in steps:
        if isinstance(item, Step) and item.name in chosen:
            inputs = item.inputs({SOURCES: sources_result(sources), **results})
            results[item.name] = item.spec.submit(run, params, inputs)
            for hook in steps:
                if isinstance(hook, Hook) and item.name in hook.after and \
                        not any(later in hook.after for later in chosen[chosen.index(item.name) + 1:]):
                    hook.task(run, hook.given(results))
    publish_outputs(run.store())  # links on the run page: cluster report, evaluation report, LoRA files
    return results


def run_steps(store: RunStore, params: Any, steps: Sequence[Any], until: str, *, sources: Sequence[str] = (),
              after: Optional[str] = None) -> dict[str, StageResult]:
    """Run the slice (after, until] of `steps` as plain calls, no Prefect (tests, benchmarks); returns
    every stage's result by name. The stages up to `after` are read as they are done on disk; a hook runs
    after the last of its stages in the slice, as in a flow."""
    chosen = stages_between(steps, until, after)
    names = stage_names(steps)
    before = names[:names.index(after) + 1] if after else []
    results = {name: on_disk(store, name) for name in before if store.is_done(name)}
    run = RunRef(runs_dir=str(store.root.parent), name=store.name)
    for item in steps:
        if isinstance(item, Step) and item.name in chosen:
            inputs = _inputs_of(item, sources, results)
            results[item.name] = run_stage(item.spec, store, params, inputs)
            for hook in steps:
                if isinstance(hook, Hook) and item.name in hook.after and \
                        not any(later in hook.after for later in chosen[chosen.index(item.name) + 1:]):
                    hook.call(run, hook.given(results))
    return results


def _inputs_of(item: Step, sources: Sequence[str], results: dict[str, StageResult]) -> dict[str, StageResult]:
    """The results a step reads, by role; StageNotDoneError naming the stage of a role that has none."""
    try:
        return item.inputs({SOURCES: sources_result(sources), **results})
    except KeyError as exc:
        raise StageNotDoneError(f"{item.name} reads stage {exc} of run, which is not done; run it first") from None


def on_disk(store: RunStore, stage: str) -> StageResult:
    """The result of a stage done on disk, as a rerun would hand it on. StageNotDoneError when it is not done."""
    marker = store.marker(stage)
    if marker is None or not store.is_done(stage):
        raise StageNotDoneError(f"stage '{stage}' of run '{store.name}' is not done; run it first")
    return StageResult(stage=stage, fingerprint=marker["fingerprint"], manifest_digest=marker["manifest_digest"],
                       summary=marker.get("summary", {}), recomputed=False)


def pipeline_done(run: RunRef, params: Any, steps: Sequence[Any], until: str, *, sources: Sequence[str] = ()
                  ) -> Optional[dict[str, StageResult]]:
    """Every stage's result when all stages up to `until` are done on disk with the fingerprints a run
    would give them now (the specs' own fingerprints and plans, in plain Python); else None.

    Writes nothing. A plan that fails (a missing episode, a stage not done) gives None: the flow then
    runs and reports it.
    """
    store = run.store()
    chosen = stages_between(steps, until)
    results: dict[str, StageResult] = {}
    for item in steps:
        if isinstance(item, Step) and item.name in chosen:
            try:
                result = item.spec.done(store, params, item.inputs({SOURCES: sources_result(sources), **results}))
            except Exception:  # whatever a plan raises, the real run raises it again, with the flow's report
                return None
            if result is None:
                return None
            results[item.name] = result
    return results


def finished_run(run: RunRef, params: Any, steps: Sequence[Any], until: str, *, sources: Sequence[str],
                 record: dict[str, Any]) -> Optional[dict[str, StageResult]]:
    """The results of a rerun with nothing to do, without starting a flow; None when there is work.

    Nothing to do: run.json already holds `record` (what the flow would write: same inputs, parameters,
    `until`) and `pipeline_done` finds every stage done. The hooks of the slice then run plainly, as
    after a real run (the dataset check still stops a run whose validation failed). Checked under the
    run's lock; a run being written by another process is left to the flow (which says so).
    """
    store = run.store()
    if not (store.root / "run.json").is_file():
        return None
    try:
        with store.lock():
            written = store.read_run_record()
            if any(written.get(key) != value for key, value in record.items()):
                return None
            results = pipeline_done(run, params, steps, until, sources=sources)
            if results is None:
                return None
            chosen = set(stages_between(steps, until))
            for hook in steps:
                if isinstance(hook, Hook) and chosen.intersection(hook.after):
                    hook.call(run, hook.given(results))
    except RunLockedError:
        return None
    return results
