"""Single-file (original Stable Diffusion / SDXL layout) checkpoints of the tiny test bases.

Diffusers reads such files with `from_single_file` and its converters (ldm -> diffusers); it
ships no writer, so `write_single_file` inverts those converters for the tiny models, using
diffusers' own key tables (`DIFFUSERS_TO_LDM_MAPPING`). The tests check the inversion by loading
the file back through diffusers and comparing every weight with the folder it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
_OPEN_CLIP = (("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
              ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn.", ".attn."))


def _sub(text: str, pairs) -> str:
    for new, old in pairs:
        text = text.replace(new, old)
    return text


def unet_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """A diffusers UNet state dict in the original layout (`input_blocks`, `middle_block`, ...)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        table.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    n = config["layers_per_block"] + 1
    with_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if key in table:
            new = table[key]
        elif p[0] == "down_blocks" and p[2] in ("resnets", "attentions"):
            block, layer = int(p[1]), int(p[3])
            rest = ".".join(p[4:])
            sub = "0." + _sub(rest, _RESNET) if p[2] == "resnets" else "1." + rest
            new = f"input_blocks.{1 + block * n + layer}.{sub}"
        elif p[0] == "down_blocks" and p[2] == "downsamplers":
            new = f"input_blocks.{(int(p[1]) + 1) * n}.0.op.{p[-1]}"
        elif p[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
            rest = ".".join(p[3:])
            new = f"middle_block.{index}.{_sub(rest, _RESNET) if p[1] == 'resnets' else rest}"
        elif p[0] == "up_blocks" and p[2] in ("resnets", "attentions"):
            block, layer = int(p[1]), int(p[3])
            rest = ".".join(p[4:])
            sub = "0." + _sub(rest, _RESNET) if p[2] == "resnets" else "1." + rest
            new = f"output_blocks.{block * n + layer}.{sub}"
        elif p[0] == "up_blocks" and p[2] == "upsamplers":
            block = int(p[1])
            new = f"output_blocks.{block * n + n - 1}.{2 if block in with_attention else 1}.conv.{p[-1]}"
        else:
            raise KeyError(f"no original-layout name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict in the original layout (`encoder.down.N.block.M`, ...)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if key in table:
            new = table[key]
        elif p[1] in ("down_blocks", "up_blocks") and p[3] == "resnets":
            level = int(p[2]) if p[1] == "down_blocks" else levels - 1 - int(p[2])
            where = "down" if p[1] == "down_blocks" else "up"
            new = f"{p[0]}.{where}.{level}.block.{p[4]}.{'.'.join(p[5:]).replace('conv_shortcut', 'nin_shortcut')}"
        elif p[1] == "down_blocks" and p[3] == "downsamplers":
            new = f"{p[0]}.down.{p[2]}.downsample.conv.{p[-1]}"
        elif p[1] == "up_blocks" and p[3] == "upsamplers":
            new = f"{p[0]}.up.{levels - 1 - int(p[2])}.upsample.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:]).replace('conv_shortcut', 'nin_shortcut')}"
        elif p[1] == "mid_block" and p[2] == "attentions":
            new = f"{p[0]}.mid.attn_1." + _sub(".".join(p[4:]), _VAE_ATTN)
            if value.ndim == 2:  # the original attention is 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise KeyError(f"no original-layout name for VAE key {key}")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(model: Any, prefix: str) -> dict[str, Any]:
    """A transformers CLIP text model in the original layout (`<prefix>text_model.*`)."""
    wrapped = hasattr(model, "text_model")
    return {f"{prefix}{'' if wrapped else 'text_model.'}{k}": v for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def open_clip_to_ldm(model: Any, prefix: str = "conditioner.embedders.1.model.") -> dict[str, Any]:
    """SDXL's second text encoder in open_clip's layout (fused q/k/v, `resblocks`, transposed projection)."""
    import torch

    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    state = model.state_dict()
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key.endswith("position_ids") or any(f".{x}_proj." in key for x in "kv"):
            continue
        if key in table:
            out[prefix + table[key]] = value.T.contiguous() if key == "text_projection.weight" else value
        elif ".q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            fused = torch.cat([state[key.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"])
            out[prefix + _sub(key.replace(".q_proj." + kind, ".in_proj_" + kind), _OPEN_CLIP)] = fused
        else:
            out[prefix + _sub(key, _OPEN_CLIP)] = value
    return out


def write_single_file(folder: Path | str, path: Path | str, *, v_pred: bool = False) -> Path:
    """Write the diffusers pipeline in `folder` as one original-layout `.safetensors` file.

    With `v_pred`, the file carries the empty `v_pred` marker v-prediction anime bases carry.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    tensors = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    if (folder / "text_encoder_2").is_dir():
        tensors.update(clip_to_ldm(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                                   "conditioner.embedders.0.transformer."))
        tensors.update(open_clip_to_ldm(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")))
    else:
        tensors.update(clip_to_ldm(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                                   "cond_stage_model.transformer."))
    if v_pred:
        tensors["v_pred"] = torch.tensor([])
    path = Path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
