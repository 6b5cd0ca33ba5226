"""Train-only: LoRAs from an already packaged dataset folder (kohya layout), no episodes needed.

The `train` deployment runs this flow: point `package_dir` at a folder of `<repeats>_<name>/`
image + caption folders (a run's `package/` output, or one made by hand); the LoRAs go to
`output` (default `<package_dir>-lora` beside it), each training recorded in the versions
registry of `runs_dir`. The training task is tagged `gpu` (one per GPU with a concurrency limit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.notify import webhook_hooks
from flows.pipeline_flow import OptionalText, refuse_programs_from_api, told_in_one_line
from tasks.train import TrainParams, train_folder


def output_for(package_dir: str, output: str | None) -> Path:
    """Where the LoRAs of a package go: `output`, else `<package_dir>-lora` beside the package."""
    package = Path(package_dir).expanduser().resolve()
    return Path(output).expanduser().resolve() if output else package.parent / f"{package.name}-lora"


def package_payload(parameters: dict[str, Any], status: str, error: str | None, flow_run_id: str) -> dict:
    """Webhook body of a train-only run: the package, the LoRA files written so far, the error."""
    out = output_for(parameters["package_dir"], parameters.get("output"))
    loras = sorted(str(p) for p in out.glob("*/*.safetensors")) if out.is_dir() else []
    return {"run": f"package:{Path(parameters['package_dir']).name}", "status": status, "flow_run_id": flow_run_id,
            "run_dir": str(out), "stages": {"train": {"state": "done" if status == "completed" else "failed",
                                                      "rows": len(loras), "kept": len(loras), "quarantined": None}},
            "loras": loras, "error": error}


@task(name="train-package", tags=["gpu"])
def train_package_task(package_dir: str, output: Path, params: TrainParams, resume: bool, runs_dir: str) -> list[str]:
    """Train every character of the package; returns the LoRA files (kohya format)."""
    done = train_folder(Path(package_dir), output, params, resume=resume, registry=Path(runs_dir))
    return [outcome.lora_path for outcome, _ in done]


@flow(name="train-package", log_prints=True, **webhook_hooks(package_payload))
@told_in_one_line
def train_package(
    package_dir: str,
    params: TrainParams = TrainParams(),
    output: str | None = None,
    resume: bool = False,
    runs_dir: str = "data/runs",
    webhook_url: OptionalText = "",
) -> list[str]:
    """Train one LoRA per character folder of `package_dir`.

    Args:
        package_dir: a packaged dataset folder (`<repeats>_<name>/` image + `.txt` caption pairs).
        params: trainer, profile, base model and training settings.
        output: folder for the LoRAs (empty: `<package_dir>-lora` beside the package).
        resume: continue from the latest checkpoints in the output folder.
        runs_dir: folder whose `versions.parquet` records every training.
        webhook_url: POST a JSON summary here when training completes or fails (optional).
    """
    refuse_programs_from_api({"train": params})
    folder = Path(package_dir).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"package_dir '{package_dir}' is not a folder")
    loras = train_package_task(str(folder), output_for(package_dir, output), params, resume, runs_dir)
    print("LoRAs:\n" + "\n".join(f"  {p}" for p in loras))
    return loras
