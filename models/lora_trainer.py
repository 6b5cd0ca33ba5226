"""The LoRA trainer: diffusers + peft + accelerate, for Stable Diffusion 1.5 and SDXL bases
(FLUX.1 bases: the same run with the FLUX parts swapped in, models/flux_trainer.py).

One call trains one character: `train_lora(job, resume=..., on_step=...)`. peft LoRA layers go
on the UNet's attention projections (and, when asked, on the text encoders' q/k/v/out with
0.4 x the UNet LR, optionally only for the first part of the steps). accelerate handles mixed
precision, gradient accumulation and multi-GPU (`accelerate launch`); with no GPU it runs on the
CPU. Latents are cached on disk; all randomness of a step comes from one seeded generator, so a
run resumed from a checkpoint continues exactly as the uninterrupted run would have. With masked
loss (`masked_loss`: auto = when the images carry alpha) each image's alpha, area-averaged to the
latent grid and divided by its mean, weights its per-pixel loss (models/lora_data.latent_mask).

Output folder::

    settings.json  loss.jsonl  validation.jsonl  outcome.json  logs/ (TensorBoard)
    checkpoints/step-NNNNNN/   (see models/lora_checkpoints.py)   samples/step-NNNNNN.png
    <name>.safetensors         the final LoRA, kohya format
    diffusers/pytorch_lora_weights.safetensors   the same in diffusers format
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from models import lora_checkpoints as ckpt
from models.kohya_format import metadata, save_kohya, to_diffusers, to_kohya
from models.captions import CaptionRules, process_caption
from models.lora_data import (Example, Geometry, bucket_sizes, encode_latents, epoch_batches, latent_masks,
                              masked_loss_on)
from models.lora_settings import TrainSettings

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
TINY_UNET_PARAMS = 5_000_000  # below this a CPU training runs on one thread (real UNets have ~10^9)
TENSORBOARD_EVERY = 10  # steps per TensorBoard point (loss.jsonl has every step)


class ResumeMismatch(ValueError):
    """A checkpoint was made with other settings or data than the training asked to resume."""


@dataclass
class TrainJob:
    """One character's training: its data, settings and output folder."""

    character: str
    trigger: str
    train: list[Example]
    settings: TrainSettings
    output_dir: Path
    output_name: str
    repeats: int = 1
    validation: list[Example] = field(default_factory=list)
    kohya_config: Path | None = None     # the package's TOMLs (used by the kohya trainer)
    kohya_dataset: Path | None = None
    latent_cache: Path | None = None     # where latents are kept (default: <output_dir>/latents)

    def signature(self) -> str:
        """What a checkpoint must agree with to be resumed: settings and data."""
        data = [(e.image.name, e.image.stat().st_size, e.caption, e.folder, e.repeats) + ((True,) if e.alpha_mask else ())
                for e in self.train + self.validation]
        payload = json.dumps({"settings": self.settings.model_dump(mode="json"), "data": data,
                              "repeats": self.repeats}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class TrainOutcome:
    """What a finished training produced (paths absolute)."""

    character: str
    status: str
    steps: int
    epochs: int
    final_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_val_step: int | None
    lora_path: str
    diffusers_path: str
    checkpoints: list[tuple[int, str]]
    samples: list[str]
    resumed_from: int | None
    seconds: float
    base: str
    family: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- small pure helpers ------------------------------------------------------------------------

def lr_factor(step: int, kind: str, warmup: int, total: int, cycles: int) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based), like diffusers' schedules."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    raise KeyError(f"unknown lr_scheduler '{kind}'")


def snr_weights(scheduler: Any, timesteps: Any, gamma: float, prediction: str) -> Any:
    """min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1.0 - alphas)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1.0) if prediction == "v_prediction" else clipped / snr.clamp(min=1e-8)  # ZTSNR: snr 0 at T


def training_target(scheduler: Any, latents: Any, noise: Any, timesteps: Any) -> Any:
    """What the UNet learns to predict: the noise (epsilon bases) or the velocity (v-prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _has_tensorboard() -> bool:
    """TensorBoard logs when it is installed (it is in the lock; a bare GPU box may lack it)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _precision(setting: str, on_gpu: bool) -> str:
    import torch

    if setting != "auto":
        return setting
    if not on_gpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# ---- the trainer -----------------------------------------------------------------------------

class _Run:
    """State of one training; methods are its phases."""

    def __init__(self, job: TrainJob, on_step: Callable[[int, int, dict], None] | None):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.job, self.s, self.on_step = job, job.settings, on_step
        self.out = Path(job.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        s = self.s
        if s.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA GPU is available; use device auto or cpu")
        on_gpu = s.device != "cpu" and torch.cuda.is_available()
        self.precision = _precision(s.mixed_precision, on_gpu)
        self.acc = Accelerator(
            mixed_precision=self.precision, gradient_accumulation_steps=s.grad_accum, cpu=not on_gpu,
            log_with="tensorboard" if _has_tensorboard() else None, project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        self.device = self.acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        self.base = self._load_base()
        self.family = self.base.family
        if not on_gpu and sum(p.numel() for p in self.base.unet.parameters()) < TINY_UNET_PARAMS:
            torch.set_num_threads(1)  # tiny ops (a stand-in base, from a folder or a file): thread hand-offs cost more
        self.gen = torch.Generator().manual_seed(s.seed * 7919 + self.acc.process_index)
        set_seed(s.seed)  # LoRA init and dropout draw from the global RNGs
        self._add_lora()
        self._prepare_data()
        self._build_optimizer()
        self.step, self.best_val, self.best_val_step, self.resumed_from = 0, None, None, None
        self.last_val, self.last_loss = None, None
        self.started = time.time()
        self._text_cache: dict[str, tuple[Any, Any]] = {}

    # -- set-up ----------------------------------------------------------------------------------
    def _load_base(self) -> Any:
        from models.sd_base import load_base

        s = self.s
        return load_base(s.base, dtype=self.weight_dtype, device=self.device, config=s.base_config,
                         prediction=s.prediction, zero_terminal_snr=s.zero_terminal_snr)

    def _add_lora(self) -> None:
        import torch
        from peft import LoraConfig

        s = self.s
        self.base.unet.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                              target_modules=list(s.target_modules)))
        self.te_train = s.train_text_encoder
        if self.te_train:
            for te in self.base.text_encoders:
                te.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=TE_TARGETS))
                te.train()
        if s.init_lora:  # fine-tune an earlier LoRA instead of fresh layers (models/lora_init.py)
            from models.lora_init import load_init_lora

            load_init_lora(self.base.unet, self.base.text_encoders if self.te_train else [], s.init_lora,
                           family=self.family, alpha=s.alpha)
        modules = [self.base.unet] + (self.base.text_encoders if self.te_train else [])
        for module in modules:
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.float32)  # LoRA weights train in fp32 under mixed precision
        if s.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            if self.te_train:
                for te in self.base.text_encoders:
                    te.gradient_checkpointing_enable()
        self.base.unet.train()

    def _prepare_data(self) -> None:
        import torch

        s, job = self.s, self.job
        self.buckets = bucket_sizes(s.resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_step)
        vae_id = f"{self.base.path}:{json.dumps(dict(self.base.vae.config), sort_keys=True, default=str)}"
        cache = (job.latent_cache or self.out / "latents") if s.cache_latents else None
        half = self.weight_dtype != torch.float32
        if half:
            self.base.vae.to(dtype=torch.float32)  # encode in fp32 (SDXL's VAE overflows in fp16), once
        encoded = encode_latents(job.train, self.buckets, self.base.vae, vae_id, cache, device=self.device, dtype=torch.float32)
        self.latents = [lat for lat, _ in encoded]
        self.geometry: list[Geometry] = [g for _, g in encoded]
        self.example_buckets = [g.bucket for g in self.geometry]
        validation = encode_latents(job.validation, self.buckets, self.base.vae, vae_id, cache, device=self.device,
                                    dtype=torch.float32)
        self.val_latents = [lat for lat, _ in validation]
        self.val_geometry = [g for _, g in validation]
        if half:
            self.base.vae.to(dtype=self.weight_dtype)
        self.masked = masked_loss_on(s.masked_loss, job.train, job.character)
        self.masks = latent_masks(job.train, self.latents, self.geometry, s.mask_floor) if self.masked else None
        self.val_masks = (latent_masks(job.validation, self.val_latents, self.val_geometry, s.mask_floor)
                          if self.masked else None)
        self.captions = [e.caption for e in job.train]
        self.repeats = [e.repeats or job.repeats for e in job.train]
        self.folders = [e.folder or f"{job.repeats}_{job.character}" for e in job.train]
        self.rules = CaptionRules(shuffle_caption=s.shuffle_caption, keep_tokens=s.keep_tokens,
                                  caption_dropout_rate=s.caption_dropout_rate,
                                  caption_tag_dropout_rate=s.caption_tag_dropout_rate)
        world = self.acc.num_processes
        per_epoch = len(epoch_batches(self.example_buckets, self.repeats, s.batch_size, s.seed, 0))
        self.micro_per_epoch = max(1, per_epoch // world)
        self.total = s.max_steps or math.ceil(s.epochs * self.micro_per_epoch / s.grad_accum)
        self.te_steps = math.ceil(s.text_encoder_fraction * self.total) if self.te_train else 0

    def _build_optimizer(self) -> None:
        import importlib.util

        import torch

        s = self.s
        unet_params = [p for p in self.base.unet.parameters() if p.requires_grad]
        groups = [{"params": unet_params, "lr": s.unet_lr}]
        if self.te_train:
            te_params = [p for te in self.base.text_encoders for p in te.parameters() if p.requires_grad]
            groups.append({"params": te_params, "lr": s.te_lr})
        on_gpu = self.device.type == "cuda"
        want8 = s.optimizer == "adamw8bit" or (s.optimizer == "auto" and on_gpu and importlib.util.find_spec("bitsandbytes"))
        if want8:
            if not on_gpu:
                raise ValueError(f"optimizer adamw8bit needs a CUDA GPU, got device {self.device}")
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ImportError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
            optimizer = bnb.optim.AdamW8bit(groups, weight_decay=s.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=s.weight_decay, foreach=True)
        self.optimizer_name = type(optimizer).__name__
        unet_lambda = lambda step: lr_factor(step, s.lr_scheduler, s.warmup_steps, self.total, s.lr_cycles)  # noqa: E731
        te_lambda = lambda step: unet_lambda(step) if step < self.te_steps else 0.0  # noqa: E731
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [unet_lambda, te_lambda][: len(groups)])
        prepared = self.acc.prepare(self.base.unet, optimizer, *(self.base.text_encoders if self.te_train else []))
        self.unet, self.optimizer = prepared[0], prepared[1]
        self.text_encoders = list(prepared[2:]) if self.te_train else self.base.text_encoders
        self.trainable = [p for g in groups for p in g["params"]]

    # -- text --------------------------------------------------------------------------------------
    def _encode(self, captions: list[str], train_te: bool) -> tuple[Any, Any]:
        """Prompt embeddings (and SDXL pooled embeddings); cached per caption once the TE is frozen for good."""
        import torch

        # cached once the TE is frozen for good, unless shuffling makes nearly every caption new
        cacheable = not train_te and (not self.te_train or self.step >= self.te_steps) and not self.rules.rewrites
        if cacheable and all(c in self._text_cache for c in captions):
            embeds, pooled = zip(*(self._text_cache[c] for c in captions))
            return torch.stack(embeds), (torch.stack(pooled) if pooled[0] is not None else None)
        with torch.set_grad_enabled(train_te):
            ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.device) for tok in self.base.tokenizers]
            if self.family == "sdxl":
                first = self.text_encoders[0](ids[0], output_hidden_states=True)
                second = self.text_encoders[1](ids[1], output_hidden_states=True)
                embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
                pooled = second.text_embeds
            else:
                embeds, pooled = self.text_encoders[0](ids[0])[0], None
        if cacheable:
            for i, c in enumerate(captions):
                self._text_cache[c] = (embeds[i].detach(), pooled[i].detach() if pooled is not None else None)
        return embeds, pooled

    def added_cond(self, pooled: Any, geometry: list[Geometry]) -> dict | None:
        """SDXL micro-conditioning of each image: its original size, its crop's top-left in the
        resized image, and the target size (the bucket), as recorded when it was bucketed."""
        import torch

        if self.family != "sdxl":
            return None
        time_ids = torch.tensor([g.time_ids() for g in geometry], device=self.device, dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids}

    # -- one step ----------------------------------------------------------------------------------
    def _loss(self, latents: Any, captions: list[str], geometry: list[Geometry], *, train_te: bool,
              gen: Any, timesteps: Any = None, weights: bool = True, masks: Any = None) -> Any:
        """Mean loss of a micro-batch; `masks` (B, 1, h, w) weights each latent pixel (masked loss)."""
        import torch
        import torch.nn.functional as F

        s, sched = self.s, self.base.noise_scheduler
        latents = latents.to(self.device)
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        if s.noise_offset and weights:
            noise = noise + s.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen).to(self.device)
        if timesteps is None:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        timesteps = timesteps.to(self.device).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        prediction = sched.config.prediction_type
        target = training_target(sched, latents, noise, timesteps)
        embeds, pooled = self._encode(captions, train_te)
        with self.acc.autocast():
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, embeds,
                             added_cond_kwargs=self.added_cond(pooled, geometry)).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if masks is not None:
            loss = loss * masks.to(loss.device)
        loss = loss.mean(dim=(1, 2, 3))
        if weights and s.min_snr_gamma:
            loss = loss * snr_weights(sched, timesteps, s.min_snr_gamma, prediction)
        return loss.mean()

    def _micro_batches(self, start: int):
        """(epoch, indices) of each micro-batch from global micro-batch `start` on."""
        s = self.s
        world, rank = self.acc.num_processes, self.acc.process_index
        m = start
        while True:
            epoch, pos = divmod(m, self.micro_per_epoch)
            batches = epoch_batches(self.example_buckets, self.repeats, s.batch_size, s.seed, epoch)
            mine = batches[: self.micro_per_epoch * world][rank::world]
            for k, indices in enumerate(mine[pos:], start=epoch * self.micro_per_epoch + pos):
                yield epoch, k, indices
            m = (epoch + 1) * self.micro_per_epoch

    def train(self) -> None:
        s = self.s
        tracker_config = {k: v for k, v in s.model_dump().items() if isinstance(v, (int, float, str, bool))}
        self.acc.init_trackers("lora", config=tracker_config)
        main = self.acc.is_main_process  # per-step logs: one line-buffered file, TensorBoard without a flush per step
        self.board = self.acc.get_tracker("tensorboard", unwrap=True) if main and _has_tensorboard() else None
        self.loss_log = open(self.out / "loss.jsonl", "a", buffering=1) if main else None
        self.board_losses: list[float] = []
        try:
            self._loop()
        finally:
            if self.loss_log is not None:
                self.loss_log.close()
        self.acc.end_training()

    def _loop(self) -> None:
        import torch

        s = self.s
        if self.step == 0:
            self._validate(baseline=True)
        batches = self._micro_batches(self.step * s.grad_accum)
        running: list[float] = []
        while self.step < self.total:
            train_te = self.te_train and self.step < self.te_steps
            if self.te_train and not train_te:
                for te in self.text_encoders:
                    te.requires_grad_(False)
            for _ in range(s.grad_accum):
                epoch, micro, indices = next(batches)
                self.epoch = epoch
                with self.acc.accumulate(self.unet, *(self.text_encoders if train_te else [])):
                    latents = torch.stack([self.latents[i] for i in indices])
                    captions = self.step_captions(micro, indices)
                    loss = self._loss(latents, captions, [self.geometry[i] for i in indices], train_te=train_te,
                                      gen=self.gen, masks=self._masks(self.masks, indices))
                    self.acc.backward(loss)
                    if self.acc.sync_gradients and s.max_grad_norm > 0:
                        self.acc.unscale_gradients()  # fp16: clip the true gradients
                        torch.nn.utils.clip_grad_norm_(self.trainable, s.max_grad_norm, foreach=True)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                running.append(loss.detach().item())
            self.lr_scheduler.step()
            self.step += 1
            self.last_loss = sum(running) / len(running)
            running.clear()
            self._after_step()

    @staticmethod
    def _masks(masks: list | None, indices: list[int]) -> Any:
        """The loss masks of a micro-batch, stacked (None without masked loss)."""
        import torch

        return torch.stack([masks[i] for i in indices]) if masks is not None else None

    def step_captions(self, micro: int, indices: list[int]) -> list[str]:
        """The captions of micro-batch `micro` after shuffle / keep_tokens / dropout (kohya's rules).

        Each draw is seeded by (seed, process, micro-batch, position), so a resumed run sees the same captions.
        """
        import random

        if not self.rules.varies:
            return [self.captions[i] for i in indices]
        rank = self.acc.process_index
        return [process_caption(self.captions[i], self.rules, random.Random(f"{self.s.seed}:{rank}:{micro}:{j}"))
                for j, i in enumerate(indices)]

    # -- per step bookkeeping -----------------------------------------------------------------
    def _after_step(self) -> None:
        s, step = self.s, self.step
        lr = self.lr_scheduler.get_last_lr()[0]
        if self.loss_log is not None:
            self.loss_log.write(json.dumps({"step": step, "loss": self.last_loss, "lr": lr, "epoch": self.epoch}) + "\n")
            self.board_losses.append(self.last_loss)
            if self.board is not None and (step % TENSORBOARD_EVERY == 0 or step == self.total):  # TensorBoard: the mean of the last steps
                self.board.add_scalar("loss", sum(self.board_losses) / len(self.board_losses), global_step=step)
                self.board.add_scalar("lr", lr, global_step=step)
                self.board_losses.clear()
        final = step == self.total
        checkpoint = step % s.save_every_steps == 0 or final
        if checkpoint or (s.validate_every_steps and step % s.validate_every_steps == 0):
            self._validate()
        if checkpoint or (s.sample_every_steps and step % s.sample_every_steps == 0):
            self._sample()
        if checkpoint:
            self._save_checkpoint()
        if self.on_step is not None:
            self.on_step(step, self.total, {"loss": self.last_loss, "lr": lr, "val_loss": self.last_val})

    def _validate(self, baseline: bool = False) -> None:
        """Loss on the held-out split with fixed noise and timesteps (comparable across steps).

        The baseline (step 0, before any training) is logged but is not a candidate for best.
        """
        if not self.val_latents:
            return
        val = self.validation_loss()
        self.last_val = val
        if not baseline and (self.best_val is None or val < self.best_val):
            self.best_val, self.best_val_step = val, self.step
        if self.acc.is_main_process:
            with open(self.out / "validation.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.step, "val_loss": val}) + "\n")
        self.acc.log({"val_loss": val}, step=self.step)

    def _rng_devices(self) -> list[int]:
        """The GPU whose RNG a measurement must leave untouched (none on CPU)."""
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def validation_loss(self) -> float:
        """Mean loss over the validation split at fixed timesteps and noise."""
        import torch

        latents, geometries = self.val_latents, self.val_geometry
        captions = [e.caption for e in self.job.validation]
        gen = torch.Generator().manual_seed(self.s.seed + 12345)
        modules = [self.unet, *(self.text_encoders if self.te_train else [])]
        for module in modules:  # no LoRA dropout while measuring
            module.eval()
        total, n = 0.0, 0
        with torch.random.fork_rng(devices=self._rng_devices()), torch.no_grad():
            for i, (lat, caption, geometry) in enumerate(zip(latents, captions, geometries)):
                for t in VALIDATION_TIMESTEPS:
                    total += self._loss(lat[None], [caption], [geometry], train_te=False, gen=gen,
                                        timesteps=torch.tensor([t]), weights=False,
                                        masks=self._masks(self.val_masks, [i])).item()
                    n += 1
        for module in modules:
            module.train()
        return total / max(1, n)

    def _sample(self) -> None:
        import torch
        from diffusers import DDIMScheduler

        s = self.s
        if not self.acc.is_main_process or not s.sample_prompts:
            return
        prompts = [p.replace("{trigger}", self.job.trigger) for p in s.sample_prompts]
        self.unet.eval()
        pipe = self.base.pipeline(scheduler=DDIMScheduler.from_config(self.base.noise_scheduler.config))
        pipe.unet = self.acc.unwrap_model(self.unet)
        pipe.set_progress_bar_config(disable=True)
        size = s.resolution
        with torch.random.fork_rng(devices=self._rng_devices()), torch.no_grad(), self.acc.autocast():
            images = [pipe(p, num_inference_steps=s.sample_steps, height=size, width=size,
                           generator=torch.Generator().manual_seed(s.seed + i)).images[0] for i, p in enumerate(prompts)]
        self.unet.train()
        self.save_sample_sheet(images, size)

    def save_sample_sheet(self, images: list, size: int) -> None:
        """The sample images side by side at `size` px, as samples/step-<step>.png."""
        from PIL import Image

        sheet = Image.new("RGB", (size * len(images), size), "white")
        for i, im in enumerate(images):
            sheet.paste(im.resize((size, size)), (i * size, 0))
        (self.out / "samples").mkdir(exist_ok=True)
        sheet.save(self.out / "samples" / f"step-{self.step:06d}.png")

    # -- checkpoints ---------------------------------------------------------------------------
    def lora_states(self) -> tuple[dict, list[dict]]:
        """peft state dicts (adapter name stripped) of the UNet and the trained text encoders."""
        from peft.utils import get_peft_model_state_dict

        unet = get_peft_model_state_dict(self.acc.unwrap_model(self.unet), save_embedding_layers=False)
        tes = [get_peft_model_state_dict(self.acc.unwrap_model(te), save_embedding_layers=False) for te in self.text_encoders] if self.te_train else []
        return unet, tes

    def export(self, path: Path) -> Path:
        """The current LoRA as a kohya-format file with ss_* metadata."""
        import torch

        s, job = self.s, self.job
        unet, tes = self.lora_states()
        tensors = to_kohya(unet, tes, family=self.family, alpha=s.alpha,
                           layers_per_block=self.acc.unwrap_model(self.unet).config.layers_per_block,
                           dtype=torch.float16 if self.precision == "fp16" else None)
        settings = s.model_dump(mode="json") | {"te_lr": s.te_lr, "v_prediction": self.base.v_prediction,
                                                "zero_terminal_snr": self.base.zero_terminal_snr}
        captions: dict[str, list[str]] = {}
        for folder, caption in zip(self.folders, self.captions):
            captions.setdefault(folder, []).append(caption)
        repeats = dict(zip(self.folders, self.repeats))
        meta = metadata(family=self.family, base=s.base, rank=s.rank, alpha=s.alpha, resolution=s.resolution,
                        steps=self.step, epochs=getattr(self, "epoch", 0) + 1, max_steps=self.total,
                        output_name=job.output_name, trigger=job.trigger, captions=captions, base_hashes=self.base_hashes(),
                        repeats=repeats, settings=settings, started=self.started, finished=time.time(),
                        buckets={f"{w}x{h}": self.example_buckets.count((w, h)) for w, h in sorted(set(self.example_buckets))},
                        extra={"ss_optimizer": self.optimizer_name, "ss_character": job.character,
                               "ss_masked_loss": self.masked, "ss_mask_floor": s.mask_floor if self.masked else 0.0})
        return save_kohya(path, tensors, meta)

    def save_diffusers(self, folder: Path) -> None:
        """The current LoRA in diffusers' format (`pytorch_lora_weights.safetensors` in `folder`)."""
        unet, tes = self.lora_states()
        layers = to_diffusers(unet, tes, self.s.alpha / self.s.rank)
        pipeline_cls = type(self.base.pipeline())
        kwargs = {"unet_lora_layers": layers[0]}
        if tes:
            kwargs["text_encoder_lora_layers"] = layers[1]
            if self.family == "sdxl":
                kwargs["text_encoder_2_lora_layers"] = layers[2]
        pipeline_cls.save_lora_weights(str(folder), **kwargs)

    def base_hashes(self) -> dict[str, str]:
        """kohya's hashes of a single-file base (computed once): legacy short hash and full sha256."""
        from models.kohya_format import model_hashes

        if not hasattr(self, "_base_hashes"):
            self._base_hashes = model_hashes(Path(self.base.file)) if self.base.file else {}
        return self._base_hashes

    def _save_checkpoint(self) -> None:
        """Checkpoint of the current step: written in a temporary folder, renamed, rotated."""
        tmp = ckpt.begin_checkpoint(self.out, self.step)
        if self.acc.is_main_process:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        ckpt.save_state(tmp / f"rng-{self.acc.process_index}.pt", ckpt.rng_state(self.gen))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            unet, tes = self.lora_states()
            tensors = {f"unet.{k}": v for k, v in unet.items()}
            for i, te in enumerate(tes):
                tensors.update({f"te{i}.{k}": v for k, v in te.items()})
            ckpt.save_tensors(tmp / "lora.safetensors", tensors)
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.lr_scheduler.state_dict(), "best_val": self.best_val,
                     "best_val_step": self.best_val_step, "last_val": self.last_val, "last_loss": self.last_loss,
                     "signature": self.job.signature()}
            if self.acc.scaler is not None:
                state["scaler"] = self.acc.scaler.state_dict()
            ckpt.save_state(tmp / "state.pt", state)
            self.export(tmp / f"{self.job.output_name}-step{self.step:06d}.safetensors")
            ckpt.commit_checkpoint(tmp, self.step, self.s.keep_last)
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        """Load the latest complete checkpoint; False when there is none."""
        from peft.utils import set_peft_model_state_dict

        ckpt.sweep(self.out)
        found = ckpt.checkpoint_dirs(self.out)
        if not found:
            return False
        step, folder = found[-1]
        state = ckpt.load_state(folder / "state.pt")
        if state.get("signature") != self.job.signature():
            raise ResumeMismatch(f"checkpoint {folder} was made with other settings or data than this training; "
                                 "train into a new output folder (or without resume) instead")
        tensors = ckpt.load_tensors(folder / "lora.safetensors")
        parts = {"unet": self.unet, **{f"te{i}": te for i, te in enumerate(self.text_encoders if self.te_train else [])}}
        for prefix, module in parts.items():
            sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            result = set_peft_model_state_dict(self.acc.unwrap_model(module), sub)
            if getattr(result, "unexpected_keys", None):
                raise ResumeMismatch(f"checkpoint {folder} has LoRA keys this model lacks: {result.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        rng_file = folder / f"rng-{self.acc.process_index}.pt"
        ckpt.restore_rng(ckpt.load_state(rng_file if rng_file.is_file() else folder / "rng-0.pt"), self.gen)
        self.step, self.resumed_from = step, step
        self.best_val, self.best_val_step = state["best_val"], state["best_val_step"]
        self.last_val, self.last_loss = state["last_val"], state["last_loss"]
        if self.acc.is_main_process:
            _truncate_log(self.out / "loss.jsonl", step)
            _truncate_log(self.out / "validation.jsonl", step)
        return True

    def finish(self) -> TrainOutcome:
        """Export the final LoRA (kohya and diffusers formats) and describe the outcome."""
        out, job = self.out, self.job
        lora = out / f"{job.output_name}.safetensors"
        diffusers_dir = out / "diffusers"
        if self.acc.is_main_process:
            self.export(lora)
            self.save_diffusers(diffusers_dir)
        checkpoints = [(step, str(next(folder.glob("*-step*.safetensors")))) for step, folder in ckpt.checkpoint_dirs(out)]
        outcome = TrainOutcome(
            character=job.character, status="completed", steps=self.step, epochs=getattr(self, "epoch", 0) + 1,
            final_loss=self.last_loss, final_val_loss=self.last_val, best_val_loss=self.best_val,
            best_val_step=self.best_val_step, lora_path=str(lora),
            diffusers_path=str(diffusers_dir / "pytorch_lora_weights.safetensors"), checkpoints=checkpoints,
            samples=sorted(str(p) for p in (out / "samples").glob("*.png")), resumed_from=self.resumed_from,
            seconds=round(time.time() - self.started, 2), base=self.s.base, family=self.family,
        )
        if self.acc.is_main_process:
            (out / "outcome.json").write_text(json.dumps(outcome.to_json(), indent=2))
        return outcome


def _truncate_log(path: Path, step: int) -> None:
    """Drop lines of a JSONL log written after `step` (the part a resumed run redoes)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by a kill: everything after it is redone
    path.write_text("".join(f"{line}\n" for line in keep))


def train_lora(job: TrainJob, *, resume: bool = False,
               on_step: Callable[[int, int, dict], None] | None = None) -> TrainOutcome:
    """Train (or, with `resume`, continue) one character's LoRA into `job.output_dir`.

    Without `resume`, an output folder that already holds checkpoints is refused, so earlier
    work is never overwritten by accident. Raises ResumeMismatch when the checkpoint belongs
    to other settings or data.
    """
    if not job.train:
        raise ValueError(f"character '{job.character}' has no training images")
    out = Path(job.output_dir)
    if not resume and ckpt.checkpoint_dirs(out):
        raise FileExistsError(f"{out} already holds checkpoints of a training; resume it or use another output folder")
    from models.sd_base import MODEL_WORK

    with MODEL_WORK:  # accelerate keeps its state per process: trainings in one process take turns
        try:
            return _train(job, out, resume, on_step)
        finally:
            _reset_accelerate()


def _reset_accelerate() -> None:
    """Forget this training's accelerate settings (mixed precision, accumulation) for the next one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _run_class(base: str) -> type:
    """The trainer of a base's family: FLUX.1 (models/flux_trainer.py) or Stable Diffusion."""
    from models.flux_base import is_flux

    if is_flux(base):
        from models.flux_trainer import FluxParts

        return type("FluxRun", (FluxParts, _Run), {})
    return _Run


def _train(job: TrainJob, out: Path, resume: bool, on_step: Callable[[int, int, dict], None] | None) -> TrainOutcome:
    run = _run_class(job.settings.base)(job, on_step)
    if not (resume and run.resume()):
        for stale in ("loss.jsonl", "validation.jsonl", "outcome.json"):
            (out / stale).unlink(missing_ok=True)
    # TensorBoard files of an earlier (killed) attempt would repeat the steps after the checkpoint: this
    # attempt writes its own (loss.jsonl, truncated at the checkpoint, keeps the whole history)
    shutil.rmtree(out / "logs", ignore_errors=True)
    (out / "settings.json").write_text(json.dumps(
        {"character": job.character, "trigger": job.trigger, "repeats": job.repeats,
         "settings": job.settings.model_dump(mode="json"), "total_steps": run.total, "family": run.family,
         "mixed_precision": run.precision, "device": str(run.device), "optimizer": run.optimizer_name,
         "masked_loss": run.masked}, indent=2))
    run.train()
    return run.finish()
