"""Training checkpoints that resume exactly: LoRA weights, optimizer, LR schedule, RNG, step.

A checkpoint is a folder `checkpoints/step-NNNNNN/` written under a temporary name and renamed
when complete (so a kill mid-write leaves no checkpoint that looks whole):

    lora.safetensors      the trainable LoRA tensors (peft names, prefixed unet. / te0. / te1.)
    state.pt              step, optimizer, LR scheduler, grad scaler, best validation loss
    rng-<process>.pt      RNG states of each process (python, numpy, torch, CUDA, the trainer's generator)
    <name>-stepNNNNNN.safetensors   the same LoRA in kohya format (what evaluation loads)
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `out/checkpoints`, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
             and (p / "state.pt").is_file() and (p / "lora.safetensors").is_file()]
    return sorted(found)


def begin_checkpoint(out: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (same name in every process)."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:06d}"
    return tmp


def commit_checkpoint(tmp: Path, step: int, keep_last: int) -> Path:
    """Rename the temporary folder into place and drop checkpoints beyond the last `keep_last`."""
    final = tmp.parent / f"step-{step:06d}"
    if final.exists():
        trash = tmp.parent / f".old-{final.name}-{uuid.uuid4().hex[:6]}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    for _, old in checkpoint_dirs(tmp.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sweep(out: Path) -> None:
    """Remove temporary checkpoint folders left by a killed process."""
    root = Path(out) / "checkpoints"
    if root.is_dir():
        for leftover in root.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)


def rng_state(generator: Any) -> dict[str, Any]:
    """Every RNG the training touches, as tensors and plain values (loadable with weights_only)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: Any) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_tensors(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_state(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_state(path: Path, state: dict[str, Any]) -> None:
    import torch

    torch.save(state, path)
