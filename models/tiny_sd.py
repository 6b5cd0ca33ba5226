"""Tiny randomly-initialised Stable Diffusion 1.5 / SDXL pipelines, for tests and the offline demo.

They have the classes and shapes of the real models (a Stable Diffusion 1.5 / SDXL pipeline)
at a few hundred thousand parameters, are saved with `save_pretrained` and loaded back through
the same `from_pretrained(local dir)` the real ids use. They are untrained stand-ins: what they
generate is noise-like; they exist so that the code paths run end to end on a CPU.

    build_tiny_sd15(path)     a StableDiffusionPipeline folder
    build_tiny_sdxl(path)     a StableDiffusionXLPipeline folder (two text encoders)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
TINY_CACHE = REPO / ".cache"
TINY_VERSION = 4
"""Bumped whenever a builder changes, so cached tiny models are rebuilt."""

_WORDS = (  # caption words the tiny tokenizer learns as one token each
    "a an the of with and in on at by from to wearing holding standing sitting running walking jumping "
    "smiling angry sad happy looking viewer side front back three quarter view close up portrait full body "
    "upper cowboy shot simple white black grey background outdoors indoors park street forest beach city room "
    "bedroom classroom night day sunset rain snow red blue green yellow orange purple pink brown cyan "
    "hair eyes dress shirt jacket hat scarf cat dog fox ghost yokai robot boy girl man woman child creature "
    "character anime cartoon style solo 1girl 1boy pose arms raised crossed hands pocket dynamic "
    "lighting soft hard shadow detailed sharp blurry high quality masterpiece trigger token ohwx sks"
).split()


def tiny_clip_tokenizer():
    """A CLIPTokenizer (byte-level, CLIP's `</w>` word ends) whose BPE merges are learnt from `_WORDS`
    until each is one token; other words fall back to shorter pieces and bytes.

    Learnt here in a few lines, with ties broken by the pair itself, so every build gives the same
    tokenizer (the `tokenizers` trainer breaks ties in hash order, which changes per process).
    """
    from collections import Counter

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*alphabet, *(char + "</w>" for char in alphabet)])}
    words = [[*word[:-1], word[-1] + "</w>"] for word in sorted(set(_WORDS))]
    merges: list[tuple[str, str]] = []
    while pairs := Counter(pair for symbols in words for pair in zip(symbols, symbols[1:])):
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = [_merge(symbols, best) for symbols in words]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """`symbols` with each occurrence of `pair`, left to right, joined into one symbol."""
    out: list[str] = []
    for symbol in symbols:
        if out and (out[-1], symbol) == pair:
            out[-1] += symbol
        else:
            out.append(symbol)
    return out


def _text_config(tokenizer, hidden_size: int = 32, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )


VAE_SCALING = 3.2
"""Latent scaling of the tiny VAE: as SD's 0.18215 does for its VAE, it brings the latents of
ordinary images to about unit variance (this random VAE's raw latents have a std of ~0.3), so
that noise and image weigh in the tiny models as they do in the real ones."""


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=64, scaling_factor=VAE_SCALING,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type="epsilon")


def _save(pipe, path: Path) -> Path:
    """Save into a temporary folder and rename, so a half-written model is never picked up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    pipe.save_pretrained(tmp)
    (tmp / "episode2lora_tiny.json").write_text(json.dumps({"version": TINY_VERSION}))
    (tmp / "README.md").write_text(
        "Tiny randomly-initialised stand-in model built by episode2lora (models/tiny.py).\n"
        "It is NOT a trained model: use a real base (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) for real LoRAs.\n")
    try:
        os.rename(tmp, path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_sd15(path: Path | str, seed: int = 0) -> Path:
    """Build and save a tiny SD1.5-shaped StableDiffusionPipeline (64 px, latents 16x16)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, path)


def build_tiny_sdxl(path: Path | str, seed: int = 0) -> Path:
    """Build and save a tiny SDXL-shaped StableDiffusionXLPipeline (two CLIP text encoders).

    As in SDXL, the second text encoder is wider than the first (48 vs 32 here), which is also
    how diffusers' single-file loading tells the two apart.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + 48, norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, hidden_size=48)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(),
    )
    return _save(pipe, path)


TINY_BASES = {"tiny": ("tiny-sd15", build_tiny_sd15), "tiny-sd15": ("tiny-sd15", build_tiny_sd15),
              "tiny-sdxl": ("tiny-sdxl", build_tiny_sdxl)}
"""Base-model names that stand for a tiny model built on first use under `<repo>/.cache/`."""


def ensure_tiny_base(name: str, cache: Path | None = None) -> Path:
    """The folder of a tiny base model (`tiny`, `tiny-sd15`, `tiny-sdxl`), built once."""
    if name not in TINY_BASES:
        raise KeyError(f"unknown tiny base '{name}'; known: {', '.join(TINY_BASES)}")
    folder, build = TINY_BASES[name]
    return built_once(Path(cache or TINY_CACHE) / folder, build)


def built_once(path: Path, build: Callable[[Path], Path]) -> Path:
    """`path`, built by `build(path)` unless a build of this TINY_VERSION is there (an older one is replaced)."""
    stamp = path / "episode2lora_tiny.json"
    if path.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("version") != TINY_VERSION):
        stale = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex[:6]}")
        os.rename(path, stale)  # built by an older builder: rebuild
        shutil.rmtree(stale, ignore_errors=True)
    if not (path / "model_index.json").is_file():
        build(path)
    return path

