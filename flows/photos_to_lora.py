"""Photo sets to a LoRA (the FLUX identity guide): ingest (with the dataset analysis) -> augment ->
caption -> package -> validate -> train with the guide's fast or final profile.

Wiring only: the stages are the episode run's (flows/dataset.py, flows/training.py) after an ingest
stage of their own (tasks/sources/ingest_photos.py).
"""

from __future__ import annotations

import os
from typing import Optional

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dataset import dataset_stages
from flows.notify import webhook_hooks
from flows.source_params import PhotosRunParams, SourceStage
from flows.training import training_stages
from tasks.sources.ingest_photos import ingest_photos_task
from tasks.run.stage import RunRef, StageResult, bind_to_run

FLOW_NAME = "photos-to-lora"


@flow(name=FLOW_NAME, log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2),
      **webhook_hooks())
def photos_to_lora(
    input_dir: str,
    name: str,
    trigger: str,
    runs_dir: str = "data/runs",
    params: PhotosRunParams = PhotosRunParams(),
    until: SourceStage = "train",
    webhook_url: Optional[str] = None,
) -> dict[str, StageResult]:
    """Turn a photo set (images/ + captions/, or side by side) into an identity LoRA; stops after `until`.

    Args:
        input_dir: the photo folder.
        name: the run and the identity's LoRA.
        trigger: the unique trigger token (e.g. ohwx, sks, or a made-up word).
        webhook_url: POST a JSON summary here when the run completes or fails (optional).
    """
    params = params.for_run(name, trigger)
    run = RunRef(runs_dir=runs_dir, name=name)
    store = run.store()
    with store.lock():
        store.write_run_record({"flow": FLOW_NAME, "inputs": [input_dir], "params": params.model_dump(mode="json"),
                                "until": until})
        results = {"ingest": bind_to_run(ingest_photos_task, run)(run, input_dir, params.ingest)}
        results.update(dataset_stages(run, params, until, results["ingest"]))  # raises when validation fails
        if "package" in results:
            results.update(training_stages(run, params, until, results["package"], results.get("validate")))
        return results
