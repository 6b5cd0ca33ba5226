"""The dataset half of the run, after `select`: augment -> caption -> package -> validate.

Wiring only. A failing validation report raises DatasetInvalidError, so training never
starts on a broken dataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.augment import augment_shard_task, merge_augment_task, plan_augment_task
from tasks.caption import caption_shard_task, merge_caption_task, plan_caption_task
from tasks.package import package_task
from tasks.run.stage import RunRef, StageResult, bind_to_run, settle
from tasks.run.store import reaches
from tasks.validate import check_passed, validate_task

if TYPE_CHECKING:
    from flows.params import RunParams


def dataset_stages(run: RunRef, params: "RunParams", until: str, select: StageResult) -> dict[str, StageResult]:
    """Run the dataset stages up to `until` (after `select`); returns their results by stage."""
    results: dict[str, StageResult] = {}
    if not reaches(until, "augment"):
        return results
    plan = plan_augment_task(run, select, params.augment)
    shards = [bind_to_run(augment_shard_task, run).submit(run, shard, plan.backgrounds, params.augment)
              for shard in plan.shards]
    settle(shards)
    results["augment"] = bind_to_run(merge_augment_task, run)(run, plan, wait_for=shards)
    if not reaches(until, "caption"):
        return results
    render = params.package.render
    cap_plan = plan_caption_task(run, results["augment"], params.caption, render)
    cap_shards = [bind_to_run(caption_shard_task, run).submit(run, shard, params.caption, render)
                  for shard in cap_plan.shards]
    settle(cap_shards)
    results["caption"] = bind_to_run(merge_caption_task, run)(run, cap_plan, wait_for=cap_shards)
    if not reaches(until, "package"):
        return results
    results["package"] = bind_to_run(package_task, run)(run, results["caption"], params.package)
    if not reaches(until, "validate"):
        return results
    results["validate"] = bind_to_run(validate_task, run)(run, results["package"], params.validate)
    check_passed(results["validate"], run.store())
    return results
