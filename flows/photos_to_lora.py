"""Photo sets to a LoRA (the FLUX identity guide): ingest (with the dataset analysis) -> augment ->
caption -> package -> validate -> train with the guide's fast or final profile.

Wiring only: the `photos` pipeline of tasks/pipelines.py, the episode run's dataset and training steps
after an ingest step of their own (tasks/sources/ingest_photos.py).
"""

from __future__ import annotations

from typing import Optional

from flows.source_params import PhotosRunParams, SourceStage
from flows.sources import pipeline_flow, run_source
from tasks.run.stage import StageResult

FLOW_NAME = "photos-to-lora"


@pipeline_flow(FLOW_NAME)
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
    return run_source("photos", FLOW_NAME, input_dir, name, runs_dir, params, until)
