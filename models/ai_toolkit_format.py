"""The AI-Toolkit (ostris/ai-toolkit) job for a FLUX LoRA; its one writer is the package stage (a job
per character, a render run's detail LoRA starting from its core LoRA).

`job_settings(job)` reads a job back as our trainer's settings (models/lora_settings.py), so that
on a FLUX base under profile `package` the trainer trains what the packaged job says: the same
rank, alpha, LR, schedule, steps, resolution, batch, timestep sampling and caption dropout.
AI-Toolkit's EMA, quantisation and sampler settings have no counterpart in our trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

NEGATIVE = "blurry, low quality, distorted, deformed, watermark, text, logo"


def ai_toolkit_job(name: str, trigger: str, folders: Sequence[Path | str], training_folder: Path | str, *,
                   rank: int, steps: int, lr: float, base_model: str, resolution: Sequence[int],
                   prompts: list[str], save_every: int, sample_every: int, init_lora: Optional[str] = None,
                   meta: Optional[dict[str, Any]] = None, alpha_mask: bool = False) -> dict:
    """An AI-Toolkit `sd_trainer` job (the Kyana guide's FLUX profile), as a dict to dump as YAML.

    `resolution` is [side] or [width, height]; `init_lora` starts the LoRA from a trained one;
    `alpha_mask`: the images' alpha is the loss mask (AI-Toolkit's dataset option of that name).
    """
    network: dict[str, Any] = {"type": "lora", "linear": rank, "linear_alpha": rank}
    if init_lora:
        network["pretrained_lora_path"] = init_lora
    width, height = resolution[0], resolution[-1]
    return {
        "job": "extension",
        "config": {
            "name": name,
            "process": [{
                "type": "sd_trainer", "training_folder": str(training_folder), "device": "cuda:0",
                "trigger_word": trigger, "network": network,
                "save": {"dtype": "float16", "save_every": save_every, "max_step_saves_to_keep": 3},
                "datasets": [{"folder_path": str(f), "caption_ext": "txt", "caption_dropout_rate": 0.05,
                              "shuffle_tokens": False, "cache_latents_to_disk": True, "resolution": list(resolution),
                              **({"alpha_mask": True} if alpha_mask else {})}
                             for f in folders],
                "train": {"batch_size": 1, "steps": steps, "gradient_accumulation_steps": 1, "train_unet": True,
                          "train_text_encoder": False, "gradient_checkpointing": True, "noise_scheduler": "flowmatch",
                          "optimizer": "adamw8bit", "lr": lr, "lr_scheduler": "constant", "timestep_type": "sigmoid",
                          "ema_config": {"use_ema": True, "ema_decay": 0.99}, "dtype": "bf16"},
                "model": {"name_or_path": base_model, "is_flux": True, "quantize": True},
                "sample": {"sampler": "flowmatch", "sample_every": sample_every, "width": width, "height": height,
                           "prompts": prompts, "neg": NEGATIVE, "seed": 42, "walk_seed": True,
                           "guidance_scale": 4.0, "sample_steps": 20},
            }],
        },
        "meta": {"name": meta.get("name", name) if meta else name, "version": "1.0", **(meta or {})},
    }


TIMESTEP_TYPES = {"sigmoid": "sigmoid", "linear": "uniform", "shift": "shift"}
"""AI-Toolkit `train.timestep_type` (its default: sigmoid) -> our `timestep_sampling`."""


def _bucket_side(value: float) -> int:
    return max(64, int(round(value / 64)) * 64)


def job_settings(job: dict) -> dict[str, Any]:
    """TrainSettings fields (models/lora_settings.py) of an AI-Toolkit job (a dict as `ai_toolkit_job`
    makes, or its YAML loaded): what our trainer trains for it on a FLUX base under profile `package`.

    Resolution: the largest of the datasets' resolutions; buckets from half the smallest to twice
    the largest (AI-Toolkit buckets keep the area and vary the sides). The base model is not read
    (the run's `train.base` decides, as for kohya configs); nor is `init_lora` (the run's init_from).
    """
    process = job["config"]["process"][0]
    network, train, save = process["network"], process.get("train", {}), process.get("save", {})
    datasets, sample = process.get("datasets") or [{}], process.get("sample", {})
    sides = [int(r) for d in datasets for r in (d.get("resolution") or [512])]
    kind = train.get("timestep_type", "sigmoid")
    if kind not in TIMESTEP_TYPES:
        raise ValueError(f"AI-Toolkit timestep_type {kind!r} has no counterpart here; known: {', '.join(TIMESTEP_TYPES)}")
    out: dict[str, Any] = {
        "rank": int(network["linear"]), "alpha": float(network.get("linear_alpha", network["linear"])),
        "unet_lr": float(train["lr"]), "max_steps": int(train["steps"]), "epochs": None,
        "resolution": _bucket_side(max(sides)), "min_bucket_reso": _bucket_side(min(sides) / 2),
        "max_bucket_reso": _bucket_side(max(sides) * 2), "batch_size": int(train.get("batch_size", 1)),
        "grad_accum": int(train.get("gradient_accumulation_steps", train.get("gradient_accumulation", 1))),
        "lr_scheduler": train.get("lr_scheduler", "constant"), "warmup_steps": 0,
        "train_text_encoder": bool(train.get("train_text_encoder", False)),
        "gradient_checkpointing": bool(train.get("gradient_checkpointing", False)),
        "optimizer": "adamw8bit" if str(train.get("optimizer", "")).lower() == "adamw8bit" else "adamw",
        "timestep_sampling": TIMESTEP_TYPES[kind], "noise_offset": float(train.get("noise_offset", 0.0)),
        "min_snr_gamma": train.get("min_snr_gamma"),
        "caption_dropout_rate": float(datasets[0].get("caption_dropout_rate", 0.0)),
        "shuffle_caption": bool(datasets[0].get("shuffle_tokens", False)),
    }
    if "save_every" in save:
        out["save_every_steps"] = int(save["save_every"])
    if "max_step_saves_to_keep" in save:
        out["keep_last"] = int(save["max_step_saves_to_keep"])
    if sample.get("prompts"):
        out |= {"sample_prompts": list(sample["prompts"]), "sample_every_steps": int(sample.get("sample_every", 0)),
                "sample_steps": int(sample.get("sample_steps", 20))}
    if any(d.get("alpha_mask") for d in datasets):
        out["masked_loss"] = "on"
    return out


def read_job(path: Path | str) -> dict:
    """An AI-Toolkit job YAML file as a dict."""
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
