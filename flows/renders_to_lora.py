"""Render folders to LoRAs (the Kyana render guide): ingest -> augment -> caption -> package -> validate
-> train, where training is staged: the core LoRA first, then the detail LoRA fine-tuned from it.

Wiring only: the `renders` pipeline of tasks/pipelines.py, the episode run's dataset and training steps
after an ingest step of their own (tasks/sources/ingest_renders.py).
"""

from __future__ import annotations

from typing import Optional

from flows.source_params import RendersRunParams, SourceStage
from flows.sources import pipeline_flow, run_source
from tasks.run.stage import StageResult

FLOW_NAME = "renders-to-lora"


@pipeline_flow(FLOW_NAME)
def renders_to_lora(
    input_dir: str,
    name: str,
    trigger: Optional[str] = None,
    runs_dir: str = "data/runs",
    params: RendersRunParams = RendersRunParams(),
    until: SourceStage = "train",
    webhook_url: Optional[str] = None,
) -> dict[str, StageResult]:
    """Turn a folder of phase folders of numbered renders into staged LoRAs; stops after `until`.

    Args:
        input_dir: the renders folder (phase_1_essential/, phase_2_sensors/, ... of NAME_..._0000.png + .txt).
        name: the run and the product's LoRA (stage 2's LoRA is <name>_detail).
        trigger: the trigger word every caption carries (default: the name).
        webhook_url: POST a JSON summary here when the run completes or fails (optional).
    """
    params = params.for_run(name, trigger)
    return run_source("renders", FLOW_NAME, input_dir, name, runs_dir, params, until)
