"""The full run: the `episode` pipeline (tasks/pipelines.py), per-episode stages fanned out, then the
global ones. Wiring only: the runner slices the table by `until`."""

from __future__ import annotations

from flows.params import LAST_STAGE, RunParams, Stage
from flows.review import pause_for_review
from flows.scale import TaskRunnerKind, check_runner, on_dask, run_on_dask
from flows.pipeline_flow import OptionalText, pipeline_flow, recorded_run, refuse_programs_from_api, with_training
from tasks.sources.episodes import discover_videos, normalize_inputs
from tasks.pipelines import PIPELINES
from tasks.run.runner import run_pipeline, stages_between
from tasks.run.stage import RunRef, StageResult


@pipeline_flow("episode-to-lora")
def episode_to_lora(
    inputs: list[str],
    name: str,
    until: Stage = LAST_STAGE,
    profile: OptionalText = "",
    base: OptionalText = "",
    runs_dir: str = "data/runs",
    params: RunParams = RunParams(),
    webhook_url: OptionalText = "",
    task_runner: TaskRunnerKind = "threads",
    dask_address: OptionalText = "",
    review_clusters: bool = False,
    new_attempt: bool = False,
) -> dict[str, StageResult]:
    """Turn episode videos into a LoRA; stops after the stage `until`.

    Args:
        inputs: video files, folders of videos or globs (relative: to the project folder).
        name: the run's folder under runs_dir; the flow run takes the same name.
        until: the last stage to run (the whole pipeline by default; `frames` stops after sampling frames).
        profile: training profile: fast or final (the FLUX guide's tables), package (the package's kohya
            TOMLs) or demo (a tiny CPU stand-in); empty: params.train.profile.
        base: base model: a Hugging Face id, a local folder or file, tiny / tiny-flux; empty: params.train.base.
        runs_dir: folder holding all runs (relative: to the project folder).
        params: every stage's parameters, one card per stage in pipeline order.
        webhook_url: POST a JSON summary here when the run completes or fails (optional).
        task_runner: "threads" in this process, or "dask" to send per-episode work to Dask workers.
        dask_address: Dask scheduler to use with task_runner="dask" (empty: a local cluster).
        review_clusters: pause after `tier` with a form to pick, name and trigger the characters.
        new_attempt: on an existing run with other inputs or parameters, keep its record under
            attempts/ and run with these (else such a run is refused, unchanged).
    """
    check_runner(task_runner)
    params = with_training(params, profile, base)
    refuse_programs_from_api(params)
    inputs = normalize_inputs(inputs)
    discover_videos(inputs)  # nothing to read at all: fail before the run record changes
    if task_runner == "dask" and not on_dask():
        return run_on_dask(episode_to_lora, dask_address)
    run = RunRef(runs_dir=runs_dir, name=name)
    with recorded_run("episode", run, params, inputs, until, new_attempt):
        steps = PIPELINES["episode"]
        if not (review_clusters and "select" in stages_between(steps, until)):
            return run_pipeline(run, params, steps, until, sources=inputs)
        results = run_pipeline(run, params, steps, "tier", sources=inputs)  # then the person's choices
        params = params.model_copy(update={"select": pause_for_review(run, results["tier"], params.select)})
        return run_pipeline(run, params, steps, until, after="tier", results=results)
