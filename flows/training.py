"""The training half of the run, after `validate`: train (one task per character) -> evaluate.

Wiring only. Trainings and evaluations are tagged `gpu`: a Prefect concurrency limit on that tag
(`prefect concurrency-limit create gpu 1`) keeps one of them per GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.evaluate import evaluate_task, merge_evaluate_task, plan_evaluate_task
from tasks.run.stage import RunRef, StageResult, bind_to_run, settle
from tasks.run.store import reaches
from tasks.train import merge_train_task, plan_train_task, train_character_task

if TYPE_CHECKING:
    from flows.params import RunParams


def training_stages(run: RunRef, params: "RunParams", until: str, package: StageResult,
                    validate: StageResult | None = None) -> dict[str, StageResult]:
    """Train every packaged character, then pick each one's best checkpoint, up to `until`."""
    results: dict[str, StageResult] = {}
    if not reaches(until, "train"):
        return results
    plan = plan_train_task(run, package, params.train, wait_for=[validate] if validate is not None else None)
    trainings = {}
    for spec in plan.specs:  # a fine-tune (spec.init_from) waits for the training it starts from
        trainings[spec.character] = bind_to_run(train_character_task, run).submit(
            run, spec, params.train, wait_for=[trainings[spec.init_from]] if spec.init_from else None)
    settle(list(trainings.values()))
    results["train"] = bind_to_run(merge_train_task, run)(run, plan, wait_for=list(trainings.values()))
    if not reaches(until, "evaluate"):
        return results
    embedder = params.evaluate.embedder or params.embed.embedder
    eval_plan = plan_evaluate_task(run, results["train"], params.evaluate, embedder)
    evaluations = [bind_to_run(evaluate_task, run).submit(run, spec, params.evaluate, eval_plan.embedder)
                   for spec in eval_plan.specs]
    settle(evaluations)
    results["evaluate"] = bind_to_run(merge_evaluate_task, run)(run, eval_plan, wait_for=evaluations)
    return results
