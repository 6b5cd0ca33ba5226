"""The full run: episodes in, per-episode stages fanned out, then the global stages."""

from __future__ import annotations

import os

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dataset import dataset_stages
from flows.identity import identity_stages
from flows.notify import webhook_hooks
from flows.params import LAST_STAGE, RunParams, Stage
from flows.scale import TaskRunnerKind, check_runner, on_dask, run_on_dask
from flows.training import training_stages
from tasks.frames import frames_episode_task, merge_frames_task, plan_frames_task
from tasks.segment import merge_segment_task, plan_segment_task, segment_shard_task
from tasks.run.stage import RunRef, StageResult, bind_to_run, settle
from tasks.run.store import reaches


@flow(name="episode-to-lora", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2),
      **webhook_hooks())
def episode_to_lora(
    inputs: list[str],
    name: str,
    runs_dir: str = "data/runs",
    params: RunParams = RunParams(),
    until: Stage = LAST_STAGE,
    webhook_url: str | None = None,
    task_runner: TaskRunnerKind = "threads",
    dask_address: str | None = None,
    review_clusters: bool = False,
) -> dict[str, StageResult]:
    """Turn episode videos into a LoRA; stops after the stage `until`.

    Args:
        webhook_url: POST a JSON summary here when the run completes or fails (optional).
        task_runner: "threads" in this process, or "dask" to send per-episode work to Dask workers.
        dask_address: Dask scheduler to use with task_runner="dask" (empty: a local cluster).
        review_clusters: pause after `tier` with a form to pick, name and trigger the characters.
    """
    check_runner(task_runner)
    if task_runner == "dask" and not on_dask():
        return run_on_dask(episode_to_lora, dask_address)
    run = RunRef(runs_dir=runs_dir, name=name)
    store = run.store()
    with store.lock():
        store.write_run_record({"inputs": inputs, "params": params.model_dump(mode="json"), "until": until})
        plan = plan_frames_task(run, inputs, params.frames)
        shards = [
            bind_to_run(frames_episode_task, run).submit(run, video, episode, fp, params.frames)
            for video, episode, fp in zip(plan.videos, plan.episodes, plan.shard_fingerprints)
        ]
        settle(shards)
        frames = bind_to_run(merge_frames_task, run)(run, plan, params.frames, wait_for=shards)
        results = {"frames": frames}
        if reaches(until, "segment"):
            seg_plan = plan_segment_task(run, frames, params.segment)
            seg_shards = [bind_to_run(segment_shard_task, run).submit(run, shard, params.segment)
                          for shard in seg_plan.shards]
            settle(seg_shards)
            results["segment"] = bind_to_run(merge_segment_task, run)(run, seg_plan, wait_for=seg_shards)
        if reaches(until, "embed"):  # embed -> cluster -> tier -> select, then the cluster report
            results.update(identity_stages(run, params, until, results["segment"], review=review_clusters))
        if reaches(until, "augment"):  # augment -> caption -> package -> validate (raises when invalid)
            if "select" not in results:
                raise RuntimeError("the dataset stages (augment onward) need the select stage, which is not wired yet")
            results.update(dataset_stages(run, params, until, results["select"]))
        if reaches(until, "train"):  # train (one task per character, tagged gpu) -> evaluate
            results.update(training_stages(run, params, until, results["package"], results.get("validate")))
        return results
