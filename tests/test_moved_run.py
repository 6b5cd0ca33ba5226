"""A run folder moved (renamed) after packaging still trains from its packaged configs and resumes an
interrupted training: manifests and written configs hold paths relative to the run folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tasks.augment import AugmentParams
from tasks.run.runner import on_disk
from tasks.run.spec import run_stage
from tasks.run.store import RunStore
from tasks.train import TRAIN, TrainParams
from tests.conftest import ROOT
from tests.dataset_fixtures import make_run
from tests.lora_fixtures import kill_after
from tests.stages import run_params, run_plain

# profile `package`: the kohya TOMLs the package stage wrote, with a tiny base and a short schedule on top
SETTINGS = {"profile": "package", "base": "tiny", "resolution": 64, "max_steps": 12, "save_every_steps": 4,
            "sample_prompts": [], "batch_size": 1, "optimizer": "adamw", "mixed_precision": "no"}


def _config_paths(run: Path) -> list[str]:
    """Every path written into the package's kohya TOMLs and AI-Toolkit YAMLs."""
    paths = []
    for toml in (run / "package" / "configs").glob("*_dataset.toml"):
        paths += [s["image_dir"] for d in tomllib.loads(toml.read_text())["datasets"] for s in d["subsets"]]
    for toml in (run / "package" / "configs").glob("*_config.toml"):
        flat = {k: v for table in tomllib.loads(toml.read_text()).values() for k, v in table.items()}
        paths += [flat["dataset_config"], flat["sample_prompts"]]
    for job in (run / "package" / "configs").glob("*_ai_toolkit.yaml"):
        paths += [d["folder_path"] for d in yaml.safe_load(job.read_text())["config"]["process"][0]["datasets"]]
    return paths


def test_a_moved_run_folder_trains_from_its_packaged_configs_and_resumes(tmp_path):
    store = make_run(tmp_path / "old", {"hero": ("human", 3)}, name="before")
    run_plain(store, "package", after="select", augment=AugmentParams(intensity="light"))  # augment, caption, package
    assert _config_paths(store.root) and not any(Path(p).is_absolute() for p in _config_paths(store.root))

    code = ("import json, sys; from tasks.run.runner import on_disk; from tasks.run.spec import run_stage; "
            "from tasks.run.store import RunStore; from tasks.train import TRAIN, TrainParams; "
            "from tests.stages import run_params; store = RunStore(sys.argv[1], 'before'); "
            "run_stage(TRAIN, store, run_params(train=TrainParams.model_validate(json.loads(sys.argv[2]))), "
            "{'package': on_disk(store, 'package')})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "old"), json.dumps(SETTINGS)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_after(proc, store.root / "train" / "work" / "hero" / "checkpoints" / "step-000004")  # SIGKILL

    (tmp_path / "new").mkdir()
    store.root.rename(tmp_path / "new" / "after")  # another runs folder and another name
    moved = RunStore(tmp_path / "new", "after")
    assert all((moved.root / p).exists() for p in _config_paths(moved.root))
    package = on_disk(moved, "package")  # the package is still done where it now lies
    result = run_stage(TRAIN, moved, run_params(train=TrainParams.model_validate(SETTINGS)), {"package": package})
    [row] = moved.read_manifest("train").to_pylist()
    assert result.recomputed and row["steps"] == 12 and row["resumed_from"] >= 4
    assert (moved.root / row["lora_path"]).is_file()
    boards = list((moved.root / "train").rglob("events.out.tfevents.*"))
    writers = {re.search(r"\.(\d+)\.\d+$", p.name).group(1) for p in boards}
    assert boards and writers == {str(os.getpid())}  # the killed attempt's TensorBoard files are gone
