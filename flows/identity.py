"""The identity half of the run, after `segment`: embed -> cluster -> tier -> select (+ the report).

Wiring only. Embedding fans out per episode shard; the rest are whole-run stages. After
`tier` the cluster report is (re)written to `<run>/report/`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flows.review import pause_for_review
from tasks.cluster import cluster_task
from tasks.embed import embed_shard_task, merge_embed_task, plan_embed_task
from tasks.report import report_task
from tasks.select import select_task
from tasks.run.stage import RunRef, StageResult, bind_to_run, settle
from tasks.run.store import reaches
from tasks.tier import tier_task

if TYPE_CHECKING:
    from flows.params import RunParams


def identity_stages(run: RunRef, params: "RunParams", until: str, segment: StageResult,
                    review: bool = False) -> dict[str, StageResult]:
    """Run the identity stages up to `until` (after `segment`); returns their results by stage.

    With `review`, the run pauses after `tier` for a person's choices (flows/review.py).
    """
    results: dict[str, StageResult] = {}
    if not reaches(until, "embed"):
        return results
    plan = plan_embed_task(run, segment, params.embed)
    shards = [bind_to_run(embed_shard_task, run).submit(run, shard, params.embed) for shard in plan.shards]
    settle(shards)
    results["embed"] = bind_to_run(merge_embed_task, run)(run, plan, wait_for=shards)
    if not reaches(until, "cluster"):
        return results
    results["cluster"] = bind_to_run(cluster_task, run)(run, results["embed"], segment, params.cluster)
    if not reaches(until, "tier"):
        return results
    results["tier"] = bind_to_run(tier_task, run)(run, results["cluster"], results["embed"], segment,
                                                  params.tier, params.embed)
    if reaches(until, "select"):
        select_params = params.select
        if review:  # the contact sheets first, then wait for the person's choices
            report_task(run, results)
            select_params = pause_for_review(run, results["tier"], params.select)
        results["select"] = bind_to_run(select_task, run)(run, results["cluster"], results["tier"], select_params)
    report_task(run, results)
    return results
