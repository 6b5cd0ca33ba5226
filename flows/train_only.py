"""Train-only: LoRAs from an already packaged dataset folder (kohya layout), no episodes needed."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.notify import webhook_hooks


@flow(name="train-package", log_prints=True, **webhook_hooks())
def train_package(package_dir: str, name: str = "train-only", runs_dir: str = "data/runs",
                  webhook_url: str | None = None) -> dict:
    """Train LoRAs from `package_dir` into run `name`.

    Args:
        package_dir: a packaged dataset folder (`<repeats>_<name>/` image + caption folders).
        name: the run the LoRAs are written into.
        webhook_url: POST a JSON summary here when training completes or fails (optional).
    """
    folder = Path(package_dir).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"package_dir '{package_dir}' is not a folder")
    raise NotImplementedError("the train stage is not available yet (tasks/train.py)")
