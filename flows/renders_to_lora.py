"""Render folders to LoRAs (the Kyana render guide): ingest -> augment -> caption -> package -> validate
-> train, where training is staged: the core LoRA first, then the detail LoRA fine-tuned from it.

Wiring only: the stages are the episode run's (flows/dataset.py, flows/training.py) after an ingest
stage of their own (tasks/sources/ingest_renders.py).
"""

from __future__ import annotations

import os
from typing import Optional

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dataset import dataset_stages
from flows.notify import webhook_hooks
from flows.source_params import RendersRunParams, SourceStage
from flows.training import training_stages
from tasks.sources.ingest_renders import ingest_phase_task, merge_ingest_renders_task, plan_ingest_renders_task
from tasks.run.stage import RunRef, StageResult, bind_to_run, settle

FLOW_NAME = "renders-to-lora"


@flow(name=FLOW_NAME, log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2),
      **webhook_hooks())
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
    run = RunRef(runs_dir=runs_dir, name=name)
    store = run.store()
    with store.lock():
        store.write_run_record({"flow": FLOW_NAME, "inputs": [input_dir], "params": params.model_dump(mode="json"),
                                "until": until})
        plan = plan_ingest_renders_task(run, input_dir, params.ingest)
        phases = [bind_to_run(ingest_phase_task, run).submit(run, shard, params.ingest, plan.template)
                  for shard in plan.shards]
        settle(phases)
        results = {"ingest": bind_to_run(merge_ingest_renders_task, run)(run, plan, params.ingest, wait_for=phases)}
        results.update(dataset_stages(run, params, until, results["ingest"]))  # raises when validation fails
        if "package" in results:
            results.update(training_stages(run, params, until, results["package"], results.get("validate")))
        return results
