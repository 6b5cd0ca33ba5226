"""Test galleries of LoRA files: the same prompts and seeds at several LoRA strengths.

`render_gallery(base, loras, prompts, strengths)` loads the base pipeline once, then for each
LoRA file (kohya format, through diffusers' `load_lora_weights`) and each strength generates
one image per prompt with a fixed seed per prompt, so every cell differs only by the LoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_pipeline(base: str, *, device: str = "auto") -> Any:
    """The base model's diffusers pipeline (fp16 on a GPU), with a DDIM scheduler."""
    import torch
    from diffusers import DDIMScheduler

    from models.sd_base import is_tiny, load_base

    cuda = device != "cpu" and torch.cuda.is_available()
    if not cuda and is_tiny(base):
        torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than they give
    loaded = load_base(base, dtype=torch.float16 if cuda else torch.float32, device="cuda" if cuda else "cpu")
    pipe = loaded.pipeline(scheduler=DDIMScheduler.from_config(loaded.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_gallery(pipe: Any, loras: list[tuple[str, Path]], prompts: list[str], strengths: list[float], *,
                   seed: int, steps: int, size: int, guidance: float) -> dict[tuple[str, float], list[Any]]:
    """Images keyed by (LoRA label, strength), one per prompt (PIL, RGB)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    out: dict[tuple[str, float], list[Any]] = {}
    for label, path in loras:
        adapter = f"eval_{label}"
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected
        try:
            pipe.load_lora_weights(str(path), adapter_name=adapter)
        finally:
            diffusers_logging.set_verbosity(level)
        for strength in strengths:
            pipe.set_adapters([adapter], adapter_weights=[strength])
            images = []
            for i, prompt in enumerate(prompts):
                with torch.no_grad():
                    result = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                                  generator=torch.Generator().manual_seed(seed + i))
                images.append(result.images[0].convert("RGB"))
            out[(label, strength)] = images
        pipe.delete_adapters([adapter])
    return out


def contact_sheet(gallery: dict[tuple[str, float], list[Any]], prompts: list[str], scores: dict[tuple[str, float], float],
                  cell: int = 128) -> Any:
    """One row per (LoRA, strength), one column per prompt, labelled with the row's score."""
    from PIL import Image, ImageDraw

    rows = list(gallery)
    label_w, head_h = 170, 28
    sheet = Image.new("RGB", (label_w + cell * len(prompts), head_h + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, prompt in enumerate(prompts):
        draw.text((label_w + j * cell + 3, 3), prompt[:22], fill="black")
        draw.text((label_w + j * cell + 3, 14), prompt[22:44], fill="black")
    for i, key in enumerate(rows):
        label, strength = key
        y = head_h + i * cell
        draw.text((4, y + 4), f"{label}", fill="black")
        draw.text((4, y + 18), f"strength {strength:g}", fill="black")
        draw.text((4, y + 32), f"score {scores.get(key, float('nan')):.3f}", fill="black")
        for j, image in enumerate(gallery[key]):
            sheet.paste(image.resize((cell, cell)), (label_w + j * cell, y))
    return sheet
