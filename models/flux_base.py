"""FLUX.1 bases (dev, schnell) for LoRA training: hub id, local diffusers folder, `tiny-flux`, or a
single-file transformer in BFL's key names (read by our converter, the rest from `base_config`).

`load_flux_base(name)` returns a `LoadedBase` of family `flux` whose `unet` slot holds the
`FluxTransformer2DModel` (the module that gets the LoRA), `text_encoders` CLIP-L (pooled) and T5
(sequence), `vae` the 16-channel VAE and `noise_scheduler` the flow-matching scheduler. The
flow-matching helpers used by the trainer (models/flux_trainer.py) and the learning check
(models/lora_check.py) live here too: embedding captions (`encode_text`), the transformer call
(`predict`), packing latents 2x2 into tokens as diffusers' FluxPipeline does, and drawing sigmas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.sd_base import BaseModelMissing, LoadedBase, _missing_message

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
T5_MAX_LENGTH = 512
"""T5 tokens of a caption (FLUX.1-dev's max_sequence_length; schnell uses 256)."""
TIMESTEP_SAMPLING = ("sigmoid", "shift", "uniform", "logit_normal")


def is_flux(name: str) -> bool:
    """True for a tiny FLUX name, a diffusers folder holding a Flux pipeline, a single-file FLUX.1
    transformer (BFL's key names), or a hub id naming FLUX."""
    from models.tiny_flux import TINY_FLUX_BASES

    if name in TINY_FLUX_BASES:
        return True
    index = Path(name) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name", "").startswith("Flux")
    if Path(name).suffix.lower() == ".safetensors" and Path(name).is_file():
        return _is_flux_file(Path(name))
    if Path(name).exists() or Path(name).suffix.lower() in (".safetensors", ".ckpt"):
        return False  # other files are Stable Diffusion checkpoints (models/sd_base.py says what is wrong)
    return "flux" in name.lower()


def _is_flux_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return any(k.removeprefix(_BFL_PREFIX) == "double_blocks.0.img_attn.qkv.weight" for k in fh.keys())
    except Exception:  # not a readable safetensors file: the SD loader reports it
        return False


# ---- single-file transformers (BFL's original key names, as FLUX.1 checkpoints are published) -----

_BFL_PREFIX = "model.diffusion_model."
_RENAMES = [  # BFL name -> diffusers name, for modules that map one to one ({i}: the block index)
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out"),
    ("double_blocks.{i}.img_mod.lin", "transformer_blocks.{i}.norm1.linear"),
    ("double_blocks.{i}.txt_mod.lin", "transformer_blocks.{i}.norm1_context.linear"),
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    ("double_blocks.{i}.img_mlp.0", "transformer_blocks.{i}.ff.net.0.proj"),
    ("double_blocks.{i}.img_mlp.2", "transformer_blocks.{i}.ff.net.2"),
    ("double_blocks.{i}.txt_mlp.0", "transformer_blocks.{i}.ff_context.net.0.proj"),
    ("double_blocks.{i}.txt_mlp.2", "transformer_blocks.{i}.ff_context.net.2"),
    ("double_blocks.{i}.img_attn.proj", "transformer_blocks.{i}.attn.to_out.0"),
    ("double_blocks.{i}.txt_attn.proj", "transformer_blocks.{i}.attn.to_add_out"),
    ("single_blocks.{i}.modulation.lin", "single_transformer_blocks.{i}.norm.linear"),
    ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
    ("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.proj_out"),
]
_FUSED = [  # BFL fused module -> the diffusers modules it splits into (rows: "inner" or "mlp")
    ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v"), ("inner",) * 3),
    ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                        "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj"), ("inner",) * 3),
    ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                   "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"),
     ("inner", "inner", "inner", "mlp")),
]
_NORM_OUT = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # (shift, scale) in BFL, (scale, shift) in diffusers


def _tables(config: dict) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[str, ...], tuple[int, ...]]]]:
    """The rename and split tables of a transformer config, block indices and widths filled in."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    widths = {"inner": inner, "mlp": int(inner * 4.0)}
    renames, fused = [], []
    for bfl, ours in _RENAMES:
        count = (config["num_layers"] if bfl.startswith("double") else config["num_single_layers"]
                 if bfl.startswith("single") else 1)
        renames += [(bfl.format(i=i), ours.format(i=i)) for i in range(count)]
    for bfl, parts, rows in _FUSED:
        count = config["num_layers"] if bfl.startswith("double") else config["num_single_layers"]
        fused += [(bfl.format(i=i), tuple(p.format(i=i) for p in parts), tuple(widths[r] for r in rows))
                  for i in range(count)]
    return renames, fused


def _suffixed(name: str) -> list[tuple[str, str]]:
    """(BFL key, diffusers key) pairs of a renamed module: a norm scale is one tensor, a linear two."""
    if name.endswith(".scale") or name.endswith(".weight"):
        return [("", "")]
    return [(".weight", ".weight"), (".bias", ".bias")]


def bfl_to_diffusers(state: dict[str, Any], config: dict) -> dict[str, Any]:
    """A FLUX.1 transformer state dict in BFL's names (a single-file checkpoint) in diffusers' names."""
    import torch

    state = {k.removeprefix(_BFL_PREFIX): v for k, v in state.items()}
    renames, fused = _tables(config)
    out: dict[str, Any] = {}
    for bfl, ours in renames:
        for a, b in _suffixed(ours):
            if bfl + a in state:
                out[ours + b] = state.pop(bfl + a)
    for bfl, parts, rows in fused:
        for suffix in (".weight", ".bias"):
            for part, tensor in zip(parts, torch.split(state.pop(bfl + suffix), list(rows), dim=0)):
                out[part + suffix] = tensor.contiguous()
    for suffix in (".weight", ".bias"):
        shift, scale = state.pop(_NORM_OUT[0] + suffix).chunk(2, dim=0)
        out[_NORM_OUT[1] + suffix] = torch.cat([scale, shift])
    if state:
        raise ValueError(f"single-file FLUX transformer has keys this converter does not know: {sorted(state)[:5]}")
    return out


def diffusers_to_bfl(state: dict[str, Any], config: dict) -> dict[str, Any]:
    """The inverse of `bfl_to_diffusers` (how a single-file checkpoint of a diffusers transformer is written)."""
    import torch

    state = dict(state)
    renames, fused = _tables(config)
    out: dict[str, Any] = {}
    for bfl, ours in renames:
        for a, b in _suffixed(ours):
            if ours + b in state:
                out[bfl + a] = state.pop(ours + b)
    for bfl, parts, _ in fused:
        for suffix in (".weight", ".bias"):
            out[bfl + suffix] = torch.cat([state.pop(p + suffix) for p in parts])
    for suffix in (".weight", ".bias"):
        scale, shift = state.pop(_NORM_OUT[1] + suffix).chunk(2, dim=0)
        out[_NORM_OUT[0] + suffix] = torch.cat([shift, scale])
    if state:
        raise ValueError(f"diffusers FLUX transformer has keys this converter does not know: {sorted(state)[:5]}")
    return out


def _transformer_from_file(path: str, config_source: str, dtype: Any) -> Any:
    """A FluxTransformer2DModel with the weights of a single BFL-named file, shaped by `config_source`."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    config = FluxTransformer2DModel.load_config(config_source, subfolder="transformer")
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(config)
    state = bfl_to_diffusers(load_file(path), dict(transformer.config))
    transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return transformer.to(dtype)


@dataclass
class FluxBase(LoadedBase):
    """A loaded FLUX.1 base: `unet` holds the FluxTransformer2DModel, `text_encoders` CLIP-L and T5."""

    def pipeline(self, scheduler: Any | None = None) -> Any:
        """A FluxPipeline over these very modules (text encoders may be gone once embeddings are cached)."""
        return flux_pipeline(self, scheduler)


def load_flux_base(name: str, *, dtype: Any = None, device: Any = "cpu", config: str | None = None) -> FluxBase:
    """Tokenizers, text encoders (frozen), transformer, VAE and scheduler of a FLUX.1 base.

    A single-file transformer takes everything else (and its own shape) from `config`, a FLUX
    diffusers folder or hub id (default: FLUX.1-dev, or -schnell for a file without guidance_in).
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from models.tiny_flux import TINY_FLUX_BASES, ensure_tiny_flux

    path = str(ensure_tiny_flux(name)) if name in TINY_FLUX_BASES else name
    dtype = dtype or torch.float32
    file = path if Path(path).suffix.lower() == ".safetensors" else None
    if file:
        from models.sd_base import _file_keys

        guided = any(k.removeprefix(_BFL_PREFIX).startswith("guidance_in.") for k in _file_keys(Path(file)))
        path = (str(ensure_tiny_flux(config)) if config in TINY_FLUX_BASES else config) or (
            FLUX_DEV if guided else FLUX_SCHNELL)
    try:
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
                      AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2")]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
                    T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)]
        transformer = (_transformer_from_file(file, path, dtype) if file else
                       FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as exc:
        if file:
            raise BaseModelMissing(
                f"single-file FLUX base '{name}' needs the configs, text encoders, tokenizers and VAE of a FLUX.1 "
                f"pipeline, read from '{path}', which is not a local diffusers folder and could not be fetched "
                f"({type(exc).__name__}: {str(exc)[:200]}). Set train.base_config to a local FLUX.1 diffusers "
                "folder, or allow downloads (unset HF_HUB_OFFLINE)") from None
        raise BaseModelMissing(_missing_message(name, exc).replace("base 'tiny'", "base 'tiny-flux'")) from None
    for module in (*encoders, transformer, vae):
        module.requires_grad_(False)
        module.to(device)
    return FluxBase(name=name, path=path, family="flux", tokenizers=tokenizers, text_encoders=encoders,
                    unet=transformer, vae=vae, noise_scheduler=scheduler, file=file)


def flux_pipeline(base: Any, scheduler: Any | None = None) -> Any:
    """A FluxPipeline over the base's very modules (text encoders may be None once embeddings are cached)."""
    from diffusers import FluxPipeline

    encoders = list(base.text_encoders) + [None] * (2 - len(base.text_encoders))
    return FluxPipeline(scheduler=scheduler or base.noise_scheduler, vae=base.vae, text_encoder=encoders[0],
                        tokenizer=base.tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=base.tokenizers[1],
                        transformer=base.unet)


def encode_text(tokenizers: list, encoders: list, captions: list[str], device: Any) -> tuple[Any, Any]:
    """(T5 sequence embeddings, CLIP-L pooled embeddings) of captions, as the trainer conditions FLUX.1:
    CLIP padded to its length, T5 to min(T5_MAX_LENGTH, the tokenizer's length)."""
    import torch

    clip, t5 = encoders
    clip_tok, t5_tok = tokenizers
    with torch.no_grad():
        ids = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        length = min(T5_MAX_LENGTH, t5_tok.model_max_length)
        ids = t5_tok(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
        return t5(ids)[0], pooled


def predict(transformer: Any, noisy: Any, sigmas: Any, embeds: Any, pooled: Any, guidance: float | None,
            dtype: Any) -> Any:
    """The transformer's packed velocity prediction for (B, C, H, W) noisy latents at noise levels `sigmas`;
    `guidance`: the guidance embedding's value (FLUX.1-dev), None for a model without one (schnell)."""
    import torch

    b, _, h, w = noisy.shape
    device = noisy.device
    guide = None if guidance is None else torch.full((b,), guidance, device=device, dtype=dtype)
    return transformer(hidden_states=pack(noisy).to(dtype), timestep=sigmas.to(dtype), guidance=guide,
                       pooled_projections=pooled.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                       txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
                       img_ids=image_ids(h, w, device, dtype), return_dict=False)[0]


# ---- flow matching ---------------------------------------------------------------------------

def pack(latents: Any) -> Any:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens, 2x2 patches, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int, device: Any, dtype: Any) -> Any:
    """Position ids (0, row, col) of the packed tokens of an h x w latent, as the pipeline makes them."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def sample_sigmas(kind: str, n: int, gen: Any, shift: float = 3.0) -> Any:
    """Noise levels sigma in (0, 1) of `n` training examples.

    uniform: U(0, 1). sigmoid: sigmoid of a standard normal (kohya's `sigmoid`, scale 1), most
    weight in the middle. logit_normal: SD3's logit-normal (mean 0, std 1), the diffusers example's
    default (the same law as sigmoid at scale 1, under the name diffusers uses). shift: sigmoid, then
    shifted towards noise by `shift` as the FLUX scheduler shifts its sigmas: s' = k s / (1 + (k - 1) s).
    """
    import torch

    if kind == "uniform":
        return torch.rand(n, generator=gen)
    if kind not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, got {kind!r}")
    sigmas = torch.sigmoid(torch.randn(n, generator=gen))
    if kind == "shift":
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas


def flow_pair(latents: Any, noise: Any, sigmas: Any) -> tuple[Any, Any]:
    """(noisy input, target) of rectified flow: (1 - s) x + s noise, and the velocity noise - x."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
    return (1 - s) * latents + s * noise, noise - latents
