"""Tiny kohya-style packages for the LoRA training tests: generated 64 px cartoon figures + captions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

POSES = ("standing", "sitting", "running", "jumping", "waving")


def make_character(package: Path, name: str, trigger: str, *, n_train: int = 6, n_validation: int = 2,
                   repeats: int = 2, seed: int = 0, colour: tuple[int, int, int] = (220, 40, 40), size: int = 64) -> Path:
    """Write `<repeats>_<name>/` and `validation/<name>/` PNG + caption pairs; returns the train folder."""
    rng = np.random.default_rng(seed)
    train = Path(package) / f"{repeats}_{name}"
    validation = Path(package) / "validation" / name
    train.mkdir(parents=True, exist_ok=True)
    validation.mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_validation):
        image = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(170, 255, 3)))
        draw = ImageDraw.Draw(image)
        cx, cy = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
        r = int(rng.integers(size // 7, size // 4))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw.rectangle([cx - 4, cy + r - 2, cx + 4, cy + r + 12], fill=(30, 30, 160))
        folder = train if i < n_train else validation
        image.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"{trigger}, round creature, {POSES[i % len(POSES)]}, simple background")
    return train


def tiny_job(package: Path, out: Path, **overrides):
    """The trainer's job for the package's first character on the tiny SD1.5 stand-in (demo profile)."""
    from models.lora_data import read_package
    from models.lora_settings import resolve_settings
    from models.lora_trainer import TrainJob

    character = read_package(package)[0][0]
    settings = resolve_settings("demo", overrides={"base": "tiny", "sample_prompts": [], **overrides})
    return TrainJob(character=character.name, trigger=character.trigger, train=character.train,
                    validation=character.validation, repeats=character.repeats, settings=settings,
                    output_dir=Path(out), output_name=character.name)


def train_then_die(package: str, out: str, overrides_json: str, kill_at: int) -> None:
    """Train in this process and SIGKILL it right after step `kill_at` (used from a subprocess)."""
    import json
    import os
    import signal

    from models.lora_trainer import train_lora

    def on_step(step: int, total: int, logs: dict) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train_lora(tiny_job(Path(package), Path(out), **json.loads(overrides_json)), on_step=on_step)


def kill_after(proc: subprocess.Popen, checkpoint: Path, timeout: float = 300) -> None:
    """SIGKILL a training subprocess once `checkpoint` exists (somewhere after it); asserts it was killed."""
    import time

    deadline = time.time() + timeout
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    _, stderr = proc.communicate()
    assert proc.returncode == -9, stderr[-2000:]


HELD_OUT_POSES = ("walk1", "walk5", "fall")
TRAIN_POSES = ("idle", "walk0", "walk2", "walk3", "walk4", "walk6", "walk7", "jump", "climb0", "climb1")


def make_renders(package: Path, name: str, trigger: str, identity: str, *, repeats: int = 2, size: int = 64,
                 seed: int = 0, backdrop: tuple[int, int, int] = (230, 230, 230)) -> Path:
    """Renders of one arcade sprite character (tests/footage.py's cast) on its own backdrop colour
    (varied a little per image): `<repeats>_<name>/` holds TRAIN_POSES, `validation/<name>/` the
    HELD_OUT_POSES, captions `<trigger>, <pose>, simple background`."""
    from tests.dataset_fixtures import sprite_layer

    rng = np.random.default_rng(seed)
    train = Path(package) / f"{repeats}_{name}"
    validation = Path(package) / "validation" / name
    for folder, poses in ((train, TRAIN_POSES), (validation, HELD_OUT_POSES)):
        folder.mkdir(parents=True, exist_ok=True)
        for i, pose in enumerate(poses):
            layer = Image.fromarray(sprite_layer(identity, pose, size), "RGBA")
            if layer.width > size:
                layer = layer.resize((size, round(layer.height * size / layer.width)))
            colour = np.clip(np.array(backdrop) + rng.integers(-20, 21, 3), 0, 255)
            canvas = Image.new("RGBA", (size, size), tuple(int(x) for x in colour) + (255,))
            x = int(rng.integers(0, max(1, size - layer.width + 1)))
            canvas.alpha_composite(layer, (x, size - layer.height))
            canvas.convert("RGB").save(folder / f"{pose}.png")
            (folder / f"{pose}.txt").write_text(f"{trigger}, {pose.rstrip('0123456789')}, simple background")
    return train
