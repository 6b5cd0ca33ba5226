"""The full run: episodes in, per-episode stages fanned out, then the global stages."""

from __future__ import annotations

import os

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import RunParams, Stage
from tasks.frames import frames_episode_task, merge_frames_task, plan_frames_task
from tasks.stage import RunRef, StageResult, bind_to_run


@flow(name="episode-to-lora", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2))
def episode_to_lora(
    inputs: list[str],
    name: str,
    runs_dir: str = "data/runs",
    params: RunParams = RunParams(),
    until: Stage = "frames",
) -> dict[str, StageResult]:
    """Turn episode videos into a LoRA; stops after the stage `until`."""
    run = RunRef(runs_dir=runs_dir, name=name)
    store = run.store()
    with store.lock():
        store.write_run_record({"inputs": inputs, "params": params.model_dump(mode="json"), "until": until})
        plan = plan_frames_task(run, inputs, params.frames)
        shards = [
            bind_to_run(frames_episode_task, run).submit(run, video, episode, fp, params.frames)
            for video, episode, fp in zip(plan.videos, plan.episodes, plan.shard_fingerprints)
        ]
        frames = bind_to_run(merge_frames_task, run)(run, plan, params.frames, wait_for=shards)
        return {"frames": frames}
