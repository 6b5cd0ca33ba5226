"""Image sources to LoRAs: a render folder (the Kyana render guide: checked, per-phase report, the core
LoRA then the detail LoRA fine-tuned from it) or a photo set (the FLUX identity guide: analysed, one
identity LoRA with the fast or final profile).

One flow for both: `source` picks the pipeline of tasks/pipelines.py (an ingest step of its own, then
the episode run's dataset and training steps); `params` is one form for both (flows/source_params.py).
Wiring only: the runner runs the table.
"""

from __future__ import annotations

import os
from typing import Optional

from flows.source_params import Source, SourceParams, SourceStage
from flows.pipeline_flow import OptionalText, pipeline_flow, recorded_run, refuse_programs_from_api, with_training
from tasks.pipelines import PIPELINES
from tasks.run.runner import run_pipeline
from tasks.run.stage import RunRef, StageResult

FLOW_NAME = "source-to-lora"


@pipeline_flow(FLOW_NAME)
def source_to_lora(
    source: Source,
    input_dir: str,
    name: str,
    trigger: Optional[str] = None,
    until: SourceStage = "train",
    profile: OptionalText = "",
    base: OptionalText = "",
    runs_dir: str = "data/runs",
    params: SourceParams = SourceParams(),
    webhook_url: OptionalText = "",
    new_attempt: bool = False,
) -> dict[str, StageResult]:
    """Turn a render folder or a photo set into LoRAs; stops after `until`.

    Args:
        source: renders (phase folders of NAME_..._0000.png + .txt) or photos (images/ + captions/, or side by side).
        input_dir: the folder (relative: to the project folder).
        name: the run and its LoRA (a render run's stage 2 LoRA is <name>_detail).
        trigger: the trigger word every caption carries (renders: default the name; photos: required, e.g. ohwx).
        until: the last stage to run (default: train).
        profile: training profile: fast or final (the FLUX guide's tables), package or demo; empty: params.train.profile.
        base: base model: a Hugging Face id (SD, SDXL, FLUX.1), a local folder or file, tiny / tiny-flux;
            empty: params.train.base.
        runs_dir: folder holding all runs (relative: to the project folder).
        params: the `renders` or `photos` ingest section (the other is ignored) and the shared stages.
        webhook_url: POST a JSON summary here when the run completes or fails (optional).
        new_attempt: on an existing run with other inputs or parameters, keep its record under
            attempts/ and run with these (else such a run is refused, unchanged).
    """
    run_params = with_training(params.for_source(source), profile, base).for_run(name, trigger)
    refuse_programs_from_api(run_params)
    input_dir = os.path.abspath(input_dir)  # so `resume` works from any folder
    run = RunRef(runs_dir=runs_dir, name=name)
    with recorded_run(source, run, run_params, [input_dir], until, new_attempt):
        return run_pipeline(run, run_params, PIPELINES[source], until, sources=[input_dir])
