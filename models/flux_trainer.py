"""The LoRA trainer on a FLUX.1 base: the parts of the SD trainer's run (models/lora_trainer.py)
that differ for a flow-matching transformer, as a mixin the trainer puts before its run class.

- LoRA on the attention and MLP projections of the double and single blocks (`target_modules`,
  matched inside the blocks only); the text encoders stay frozen.
- Text: CLIP-L's pooled embedding and T5's sequence, computed once per caption at set-up; the
  text encoders are then freed, so T5 is not in memory while training (kept only when caption
  shuffling / tag dropout makes new captions every step).
- Latents: shifted and scaled by the VAE's config (models/lora_data.encode_latents), packed 2x2
  into tokens with their position ids, as diffusers' FluxPipeline does.
- Objective: rectified flow, noisy = (1 - s) x + s noise, target = noise - x, with sigmas drawn by
  `timestep_sampling` / `flow_shift`; the guidance embedding (FLUX.1-dev) gets `guidance`.
  Masked loss: the latent-resolution mask is packed like the latents and weights each value.
- Settings flow matching has no use for (noise offset, min-SNR, zero terminal SNR, prediction)
  are named in a warning and in the LoRA file's `ss_ignored_settings`.
- Output: kohya's FLUX keys (models/flux_format.py) with ss_* / modelspec metadata, and the
  diffusers/peft form with the LoRA's rank and alpha in its metadata.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

from models.flux_base import encode_text, flow_pair, flux_pipeline, load_flux_base, pack, predict, sample_sigmas
from models.lora_settings import flux_ignored

_IN_BLOCKS = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.")


class FluxParts:
    """What a LoRA training on a FLUX.1 base does differently (the rest is lora_trainer._Run's)."""

    def __init__(self, job: Any, on_step: Any):
        self.ignored = flux_ignored(job.settings)
        for note in self.ignored:
            warnings.warn(note, stacklevel=2)
            print(f"note: {note}")
        super().__init__(job, on_step)
        self._cache_text()

    # -- set-up ----------------------------------------------------------------------------------
    def _load_base(self) -> Any:
        from models.sd_base import MODEL_WORK

        with MODEL_WORK:
            return load_flux_base(self.s.base, dtype=self.weight_dtype, device=self.device, config=self.s.base_config)

    def _add_lora(self) -> None:
        import torch
        from peft import LoraConfig

        s = self.s
        if s.train_text_encoder:
            raise ValueError("train_text_encoder must be false on a FLUX base (its text encoders stay frozen), got true")
        if s.init_lora:
            raise ValueError("init_lora is not supported on a FLUX base yet, got " + repr(s.init_lora))
        transformer = self.base.unet
        self.flux_shapes = {n: (m.out_features, m.in_features) for n, m in transformer.named_modules()
                            if _IN_BLOCKS.match(n) and isinstance(m, torch.nn.Linear)}
        names = [n for n in self.flux_shapes if any(n.endswith("." + t) for t in s.target_modules)]
        if not names:
            raise ValueError(f"target_modules must name projections of the FLUX blocks, got {s.target_modules}")
        self.lora_modules = names
        transformer.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=names))
        self.te_train = False
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.float32)
        if s.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()

    def _cache_text(self) -> None:
        """Embed every caption the training can see once, then free the text encoders (T5 is large)."""
        if self.rules.rewrites:
            return  # new caption strings every step: keep the encoders
        prompts = {*self.captions, *(e.caption for e in self.job.validation), "", *self.sample_prompt_texts()}
        for caption in sorted(prompts):
            self._encode([caption], False)
        self.base.text_encoders = []
        self.text_encoders = []

    def sample_prompt_texts(self) -> list[str]:
        return [p.replace("{trigger}", self.job.trigger) for p in self.s.sample_prompts]

    # -- text --------------------------------------------------------------------------------------
    def _encode(self, captions: list[str], train_te: bool) -> tuple[Any, Any]:
        """(T5 sequence embeddings, CLIP pooled embeddings) of the captions, cached per caption."""
        import torch

        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            if not self.base.text_encoders:
                raise RuntimeError(f"caption {missing[0]!r} was not embedded at set-up and the text encoders are freed")
            embeds, pooled = encode_text(self.base.tokenizers, self.base.text_encoders, missing, self.device)
            for i, caption in enumerate(missing):
                self._text_cache[caption] = (embeds[i].detach(), pooled[i].detach())
        pairs = [self._text_cache[c] for c in captions]
        if self.rules.rewrites:  # shuffled captions rarely repeat: don't keep them
            for c in missing:
                self._text_cache.pop(c, None)
        return torch.stack([e for e, _ in pairs]), torch.stack([p for _, p in pairs])

    # -- one step ----------------------------------------------------------------------------------
    def _loss(self, latents: Any, captions: list[str], geometry: list, *, train_te: bool,
              gen: Any, timesteps: Any = None, weights: bool = True, masks: Any = None) -> Any:
        """Mean flow-matching loss of a micro-batch; `timesteps` (0..1000) fix sigma = t / 1000 (validation)."""
        import torch
        import torch.nn.functional as F

        s = self.s
        latents = latents.to(self.device)
        b, c = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        sigmas = (sample_sigmas(s.timestep_sampling, b, gen, s.flow_shift) if timesteps is None
                  else timesteps.float() / 1000.0).to(self.device)
        noisy, target = flow_pair(latents, noise, sigmas)
        embeds, pooled = self._encode(captions, False)
        guidance = s.guidance if self.base.unet.config.guidance_embeds else None  # unwrap_model costs ms a step
        with self.acc.autocast():
            pred = predict(self.unet, noisy, sigmas, embeds, pooled, guidance, self.weight_dtype)
        loss = F.mse_loss(pred.float(), pack(target).float(), reduction="none")
        if masks is not None:
            loss = loss * pack(masks.to(loss.device).expand(-1, c, -1, -1))
        return loss.mean(dim=(1, 2)).mean()

    # -- samples and files -------------------------------------------------------------------------
    def _sample(self) -> None:
        import torch

        s = self.s
        if not self.acc.is_main_process or not s.sample_prompts:
            return
        prompts = self.sample_prompt_texts()
        self.unet.eval()
        pipe = flux_pipeline(self.base)
        pipe.transformer = self.acc.unwrap_model(self.unet)
        pipe.set_progress_bar_config(disable=True)
        size = s.resolution
        guidance = 3.5 if pipe.transformer.config.guidance_embeds else 0.0
        with torch.random.fork_rng(devices=self._rng_devices()), torch.no_grad(), self.acc.autocast():
            images = []
            for i, p in enumerate(prompts):
                embeds, pooled = self._encode([p], False)
                images.append(pipe(prompt_embeds=embeds.to(self.weight_dtype), pooled_prompt_embeds=pooled.to(self.weight_dtype),
                                   num_inference_steps=s.sample_steps, height=size, width=size, guidance_scale=guidance,
                                   generator=torch.Generator().manual_seed(s.seed + i)).images[0])
        self.unet.train()
        self.save_sample_sheet(images, size)

    def architecture(self) -> str:
        """modelspec architecture: flux-1-dev (guidance embedding) or flux-1-schnell."""
        dev = self.acc.unwrap_model(self.unet).config.guidance_embeds
        return "flux-1-dev/lora" if dev else "flux-1-schnell/lora"

    def export(self, path: Path) -> Path:
        """The current LoRA as a kohya FLUX file (models/flux_format.py) with ss_* / modelspec metadata."""
        import torch

        from models.flux_format import to_kohya_flux
        from models.kohya_format import metadata, save_kohya

        s, job = self.s, self.job
        unet, _ = self.lora_states()
        tensors = to_kohya_flux(unet, alpha=s.alpha, shapes=self.flux_shapes,
                                dtype=torch.float16 if self.precision == "fp16" else None)
        settings = s.model_dump(mode="json") | {"te_lr": s.te_lr, "v_prediction": False, "zero_terminal_snr": False}
        captions: dict[str, list[str]] = {}
        for folder, caption in zip(self.folders, self.captions):
            captions.setdefault(folder, []).append(caption)
        meta = metadata(family="flux", base=s.base, rank=s.rank, alpha=s.alpha, resolution=s.resolution,
                        steps=self.step, epochs=getattr(self, "epoch", 0) + 1, max_steps=self.total,
                        output_name=job.output_name, trigger=job.trigger, captions=captions, base_hashes=self.base_hashes(),
                        repeats=dict(zip(self.folders, self.repeats)), settings=settings, started=self.started,
                        finished=time.time(),
                        buckets={f"{w}x{h}": self.example_buckets.count((w, h)) for w, h in sorted(set(self.example_buckets))},
                        extra={"ss_network_module": "networks.lora_flux", "modelspec.architecture": self.architecture(),
                               "ss_noise_offset": "None", "ss_min_snr_gamma": "None",
                               "ss_timestep_sampling": s.timestep_sampling, "ss_discrete_flow_shift": s.flow_shift,
                               "ss_guidance_scale": s.guidance, "ss_model_prediction_type": "raw",
                               "ss_ignored_settings": json.dumps(self.ignored),
                               "ss_optimizer": self.optimizer_name, "ss_character": job.character,
                               "ss_masked_loss": self.masked, "ss_mask_floor": s.mask_floor if self.masked else 0.0})
        return save_kohya(path, tensors, meta)

    def save_diffusers(self, folder: Path) -> None:
        """The LoRA in diffusers' FLUX form, with rank and alpha in its adapter metadata."""
        from diffusers import FluxPipeline

        unet, _ = self.lora_states()
        FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=unet, transformer_lora_adapter_metadata={
            "r": self.s.rank, "lora_alpha": self.s.alpha, "target_modules": sorted(self.lora_modules)})
