"""A tiny randomly-initialised FLUX.1 pipeline, for tests and the offline demo.

It has the classes of the real FLUX.1-dev pipeline (a `FluxTransformer2DModel` with one double
and one single block, a 16-channel `AutoencoderKL` that downsamples 8x, a CLIP text encoder for
the pooled embedding and a T5 encoder for the sequence, a flow-matching scheduler) at a few
hundred thousand parameters. Both text encoders share the tiny CLIP-style tokenizer of
models/tiny_sd.py (learnt here, no download). Saved with `save_pretrained`, loaded back with the
same `from_pretrained(local dir)` the real ids use. Untrained: it proves code paths, not images.

    build_tiny_flux(path)     a FluxPipeline folder (guidance embedding on, as FLUX.1-dev)
    ensure_tiny_flux(name)    the folder of `tiny-flux` / `tiny-flux-schnell`, built once
"""

from __future__ import annotations

from pathlib import Path

from models.tiny_sd import TINY_CACHE, _save, _text_config, built_once, tiny_clip_tokenizer

FLUX_VAE_SCALING = 2.8
"""Latent scaling of the tiny VAE (FLUX.1's is 0.3611 with shift 0.1159): about unit-variance latents."""


def build_tiny_flux(path: Path | str, seed: int = 0, guidance: bool = True) -> Path:
    """Build and save a tiny FLUX.1-shaped FluxPipeline (64 px images, latents 16x8x8, 16 tokens)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8, block_out_channels=(8, 16, 16, 16),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, scaling_factor=FLUX_VAE_SCALING, shift_factor=0.0, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0,
                                 pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_text_config(tokenizer)),
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer)
    return _save(pipe, path)


TINY_FLUX_BASES = {"tiny-flux": ("tiny-flux", True), "tiny-flux-schnell": ("tiny-flux-schnell", False)}
"""Base names that stand for a tiny FLUX.1 built on first use (dev: guidance embedding; schnell: none)."""


def ensure_tiny_flux(name: str, cache: Path | None = None) -> Path:
    """The folder of a tiny FLUX base (`tiny-flux`, `tiny-flux-schnell`), built once under `<repo>/.cache/`."""
    if name not in TINY_FLUX_BASES:
        raise KeyError(f"unknown tiny FLUX base '{name}'; known: {', '.join(TINY_FLUX_BASES)}")
    folder, guidance = TINY_FLUX_BASES[name]
    return built_once(Path(cache or TINY_CACHE) / folder, lambda path: build_tiny_flux(path, guidance=guidance))
