"""The AI-Toolkit (ostris/ai-toolkit) job for a FLUX LoRA; its one writer is the package stage (a job
per character, a render run's detail LoRA starting from its core LoRA)."""

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
                          "optimizer": "adamw8bit", "lr": lr, "lr_scheduler": "constant",
                          "ema_config": {"use_ema": True, "ema_decay": 0.99}, "dtype": "bf16"},
                "model": {"name_or_path": base_model, "is_flux": True, "quantize": True},
                "sample": {"sampler": "flowmatch", "sample_every": sample_every, "width": width, "height": height,
                           "prompts": prompts, "neg": NEGATIVE, "seed": 42, "walk_seed": True,
                           "guidance_scale": 4.0, "sample_steps": 20},
            }],
        },
        "meta": {"name": meta.get("name", name) if meta else name, "version": "1.0", **(meta or {})},
    }
