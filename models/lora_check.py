"""Does a trained LoRA file carry what it was trained on? A held-out denoising check.

On held-out images of the trained characters (poses the training never saw), the denoising
loss of the base with the LoRA file loaded (through diffusers' `load_lora_weights`, as a user
would) is compared with the base alone, and with the LoRA but other captions (e.g. empty ones,
or another character's). Noise and timesteps are fixed, so the three figures differ only by
what the LoRA and the captions change. A working training lowers the loss (`gain` = off / on
> 1) and fits the captions it was trained with (`caption_gain` = other / right > 1); a training
that did nothing or whose LoRA is not applied has gain 1, and one whose captions never reached
the text encoder fits the empty caption better than the right one (caption gain < 1).

On a FLUX.1 base the loss is flow matching's (the velocity noise - x at fixed noise levels
sigma = TIMESTEPS / 1000), with the text embedded and the guidance embedding set as the trainer
does (models/flux_base.py). A kohya FLUX file goes in through models/flux_format.from_kohya_flux
(the exact inverse of what the trainer writes), since diffusers' own kohya converter assumes
FLUX.1's widths and cannot read the tiny stand-in's; the diffusers/peft form loads as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.lora_data import Example

TIMESTEPS = (100, 300, 500, 700, 900, 999)


@dataclass
class LearningReport:
    """Mean held-out denoising losses and the two ratios the check is judged by."""

    loss_base: float          # base alone, right captions
    loss_lora: float          # base + LoRA, right captions
    loss_other: float         # base + LoRA, the other captions
    lora_scale: float
    velocity: bool            # measured against a velocity (a v-prediction base; FLUX: noise - x)

    @property
    def gain(self) -> float:
        return self.loss_base / self.loss_lora

    @property
    def caption_gain(self) -> float:
        return self.loss_other / self.loss_lora

    def passed(self, min_gain: float, min_caption_gain: float) -> bool:
        return self.gain >= min_gain and self.caption_gain >= min_caption_gain

    def to_json(self) -> dict[str, float]:
        return asdict(self) | {"gain": self.gain, "caption_gain": self.caption_gain}


def _losses(pipe: Any, latents: Any, captions: list[str], noise: Any) -> float:
    """Mean epsilon / v loss over the images and TIMESTEPS (SD 1.5 bases)."""
    import torch
    import torch.nn.functional as F

    sched = pipe.scheduler
    total, n = 0.0, 0
    with torch.no_grad():
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids)[0]
        for k, t in enumerate(TIMESTEPS):
            steps = torch.full((latents.shape[0],), t, dtype=torch.long)
            eps = noise[k]
            noisy = sched.add_noise(latents, eps, steps)
            if sched.config.prediction_type == "v_prediction":
                a = sched.alphas_cumprod[steps].view(-1, 1, 1, 1)
                target = a.sqrt() * eps - (1 - a).sqrt() * latents   # the velocity, written out
            else:
                target = eps
            pred = pipe.unet(noisy, steps, embeds).sample
            total += F.mse_loss(pred.float(), target.float()).item()
            n += 1
    return total / n


def learning_check(base: str, lora: Path | str, heldout: list[Example], other: list[str], *,
                   lora_scale: float = 1.0, seed: int = 0, config: str | None = None,
                   prediction: str = "auto") -> LearningReport:
    """Held-out denoising losses of `base` without and with the LoRA file (at `lora_scale`).

    Args:
        base: the base the LoRA was trained on (SD 1.5 or FLUX.1; `config` as for a single file);
            lora: its kohya-format file (or, on FLUX, the diffusers form).
        heldout: images with their right captions; other: a caption per image to compare with.
    """
    import torch
    from diffusers import DDPMScheduler

    from models.sd_base import load_base

    if len(other) != len(heldout):
        raise ValueError(f"other needs one caption per held-out image ({len(heldout)}), got {len(other)}")
    from models.flux_base import is_flux

    if is_flux(base):
        return flux_learning_check(base, lora, heldout, other, lora_scale=lora_scale, seed=seed, config=config)
    model = load_base(base, config=config, prediction=prediction)
    if model.family != "sd15":
        raise ValueError(f"learning_check measures SD 1.5 and FLUX.1 bases, got {model.family} ({base})")
    pipe = model.pipeline(scheduler=DDPMScheduler.from_config(model.noise_scheduler.config))
    size = model.unet.config.sample_size * 2 ** (len(model.vae.config.block_out_channels) - 1)
    latents = _heldout_latents(model.vae, heldout, size)
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(latents.shape, generator=gen) for _ in TIMESTEPS]
    captions = [e.caption for e in heldout]
    loss_base = _losses(pipe, latents, captions, noise)
    pipe.load_lora_weights(str(lora), adapter_name="checked")
    pipe.set_adapters(["checked"], adapter_weights=[lora_scale])
    loss_lora = _losses(pipe, latents, captions, noise)
    loss_other = _losses(pipe, latents, list(other), noise)
    return LearningReport(loss_base=loss_base, loss_lora=loss_lora, loss_other=loss_other, lora_scale=lora_scale,
                          velocity=model.v_prediction)


def _heldout_latents(vae: Any, heldout: list[Example], size: int) -> Any:
    """Latents of the held-out images at the bucket nearest a size x size square, shifted and scaled by
    the VAE's config (as the trainer encodes them)."""
    import torch
    from PIL import Image

    from models.lora_data import load_image, nearest_bucket

    with Image.open(heldout[0].image) as im:
        bucket = nearest_bucket(im.width, im.height, [(size, size)])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        pixels = torch.stack([load_image(e.image, bucket, e.alpha_mask) for e in heldout])
        return (vae.encode(pixels).latent_dist.mode() - shift) * vae.config.scaling_factor


def _flux_losses(base: Any, latents: Any, captions: list[str], noise: list[Any], guidance: float | None) -> float:
    """Mean flow-matching loss (velocity noise - x) over the images and sigmas TIMESTEPS / 1000."""
    import torch
    import torch.nn.functional as F

    from models.flux_base import encode_text, flow_pair, pack, predict

    embeds, pooled = encode_text(base.tokenizers, base.text_encoders, captions, "cpu")
    total = 0.0
    with torch.no_grad():
        for k, t in enumerate(TIMESTEPS):
            sigmas = torch.full((latents.shape[0],), t / 1000.0)
            noisy, target = flow_pair(latents, noise[k], sigmas)
            pred = predict(base.unet, noisy, sigmas, embeds, pooled, guidance, latents.dtype)
            total += F.mse_loss(pred.float(), pack(target).float()).item()
    return total / len(TIMESTEPS)


def _load_flux_lora(pipe: Any, lora: Path | str, name: str) -> None:
    """Load a FLUX LoRA file into the pipeline as adapter `name` (kohya form through our exact inverse)."""
    import torch
    from safetensors.torch import load_file

    from models.flux_format import from_kohya_flux

    tensors = load_file(str(lora))
    if not any(k.startswith("lora_unet_") for k in tensors):
        pipe.load_lora_weights(str(lora), adapter_name=name)
        return
    shapes = {n: (m.out_features, m.in_features) for n, m in pipe.transformer.named_modules()
              if n.startswith(("transformer_blocks.", "single_transformer_blocks.")) and isinstance(m, torch.nn.Linear)}
    peft = from_kohya_flux(tensors, shapes)  # alpha / rank folded into lora_A: loads at scale 1
    if not peft:
        raise ValueError(f"{lora} holds no kohya FLUX block LoRA this base has modules for")
    pipe.load_lora_weights({f"transformer.{k}": v for k, v in peft.items()}, adapter_name=name)


def flux_learning_check(base: str, lora: Path | str, heldout: list[Example], other: list[str], *,
                        lora_scale: float = 1.0, seed: int = 0, config: str | None = None,
                        guidance: float = 1.0, size: int | None = None) -> LearningReport:
    """`learning_check` on a FLUX.1 base: held-out flow-matching losses without and with the LoRA.

    `guidance`: the guidance embedding's value (FLUX.1-dev; the trainer's default 1.0); `size`: the
    side of the held-out images' bucket (default: the VAE's sample size).
    """
    import torch

    from models.flux_base import load_flux_base

    model = load_flux_base(base, config=config)
    latents = _heldout_latents(model.vae, heldout, size or model.vae.config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(latents.shape, generator=gen) for _ in TIMESTEPS]
    guide = guidance if model.unet.config.guidance_embeds else None
    captions = [e.caption for e in heldout]
    loss_base = _flux_losses(model, latents, captions, noise, guide)
    pipe = model.pipeline()
    _load_flux_lora(pipe, lora, "checked")
    pipe.set_adapters(["checked"], adapter_weights=[lora_scale])
    loss_lora = _flux_losses(model, latents, captions, noise, guide)
    loss_other = _flux_losses(model, latents, list(other), noise, guide)
    return LearningReport(loss_base=loss_base, loss_lora=loss_lora, loss_other=loss_other, lora_scale=lora_scale,
                          velocity=True)
