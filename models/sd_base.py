"""Base models for LoRA training: Stable Diffusion 1.5 and SDXL, by Hugging Face id or local folder.

`load_base(name)` returns the parts a trainer needs (tokenizers, text encoders, UNet, VAE, noise
scheduler) and which family they are. `tiny`, `tiny-sd15` and `tiny-sdxl` stand for tiny
untrained models built on first use (models/tiny_sd.py); they make the pipeline run on a CPU
without downloads, and produce no useful images.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Family = Literal["sd15", "sdxl"]
DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_WORK = threading.RLock()
"""One model job (loading, a training, a gallery) per process at a time: model loading and LoRA
injection patch torch globally, accelerate keeps per-process state, and one GPU runs one job anyway."""


class BaseModelMissing(FileNotFoundError):
    """The base model is neither a local diffusers folder nor downloadable here."""


@dataclass
class LoadedBase:
    """The parts of a Stable Diffusion pipeline a LoRA trainer uses."""

    name: str
    path: str
    family: Family
    tokenizers: list[Any]
    text_encoders: list[Any]
    unet: Any
    vae: Any
    noise_scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def pipeline(self, scheduler: Any | None = None):
        """A diffusers pipeline over these very modules (no copy), for samples and evaluation."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        sched = scheduler or self.noise_scheduler
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=sched,
            )
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
            scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def resolve_base(name: str) -> str:
    """A local folder for tiny names, else the name itself (a local folder or a hub id)."""
    from models.tiny_sd import TINY_BASES, ensure_tiny_base

    if name in TINY_BASES:
        return str(ensure_tiny_base(name))
    return name


def is_tiny(name: str) -> bool:
    from models.tiny_sd import TINY_BASES

    return name in TINY_BASES or (Path(name) / "README.md").is_file() and "Tiny randomly-initialised" in (
        Path(name) / "README.md").read_text(errors="ignore")


def detect_family(path: str) -> Family:
    """`sdxl` when the pipeline has a second text encoder, else `sd15`."""
    index = Path(path) / "model_index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        return "sdxl" if "text_encoder_2" in data else "sd15"
    from huggingface_hub import hf_hub_download

    try:
        data = json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())
    except Exception as exc:
        raise BaseModelMissing(_missing_message(path, exc)) from None
    return "sdxl" if "text_encoder_2" in data else "sd15"


def _missing_message(name: str, exc: BaseException) -> str:
    return (f"base model '{name}' is not a local diffusers folder (with model_index.json) and could not be "
            f"fetched from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). Pass a local folder "
            "(e.g. --base /models/sd15 or train.base=...), allow downloads (unset HF_HUB_OFFLINE), "
            "or use base 'tiny' for an untrained stand-in that only exercises the code")


def load_base(name: str, *, dtype: Any = None, device: Any = "cpu") -> LoadedBase:
    """Load tokenizers, text encoders, UNet, VAE and the DDPM noise scheduler of a SD1.5/SDXL base.

    Raises BaseModelMissing with what to do when the model is not available.
    """
    import torch

    with MODEL_WORK:
        path = resolve_base(name)
        family = detect_family(path)
        return _load(name, path, family, dtype or torch.float32, device)


def _load(name: str, path: str, family: Family, dtype: Any, device: Any) -> LoadedBase:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)]
        if family == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype))
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as exc:
        raise BaseModelMissing(_missing_message(name, exc)) from None
    for module in (*encoders, unet, vae):
        module.requires_grad_(False)
        module.to(device)
    return LoadedBase(name=name, path=path, family=family, tokenizers=tokenizers, text_encoders=encoders,
                     unet=unet, vae=vae, noise_scheduler=scheduler)
