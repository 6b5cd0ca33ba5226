"""FLUX.1 LoRA files in kohya sd-scripts' key format (networks/lora_flux.py), from peft state dicts.

kohya names modules after BFL's original FLUX code, where diffusers splits what BFL fuses:

    double_blocks.<i>.img_attn.qkv   = attn.to_q | to_k | to_v                 (fused, 3 parts)
    double_blocks.<i>.txt_attn.qkv   = attn.add_q_proj | add_k_proj | add_v_proj (fused, 3 parts)
    double_blocks.<i>.img_attn.proj  = attn.to_out.0      txt_attn.proj = attn.to_add_out
    double_blocks.<i>.img_mlp.0 / .2 = ff.net.0.proj / ff.net.2   (txt_mlp: ff_context.*)
    double_blocks.<i>.img_mod.lin    = norm1.linear       txt_mod.lin = norm1_context.linear
    single_blocks.<i>.linear1        = attn.to_q | to_k | to_v | proj_mlp      (fused, 4 parts)
    single_blocks.<i>.linear2        = proj_out           modulation.lin = norm.linear

Keys are `lora_unet_<path with _>` + `.lora_down.weight`, `.lora_up.weight`, `.alpha`. A fused
module holds the parts' LoRAs side by side: down = the parts' downs stacked (rank n*r), up = their
ups block-diagonal, and alpha = n * alpha so that alpha / rank, the scale, stays the trained one.
A part without a LoRA is a zero block. diffusers' converter recognises the block-diagonal up and
splits it back exactly.
"""

from __future__ import annotations

import re
from typing import Any

_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def kohya_groups(module_names: list[str]) -> dict[str, tuple[str, ...]]:
    """kohya key -> the diffusers modules it stands for, for the block modules given."""
    out: dict[str, tuple[str, ...]] = {}
    for name in module_names:
        kind, index, rest = name.split(".", 2)
        table, prefix = (_DOUBLE, "double") if kind == "transformer_blocks" else (_SINGLE, "single")
        for key, parts in table.items():
            if rest in parts:
                out[f"lora_unet_{prefix}_blocks_{index}_{key}"] = tuple(f"{kind}.{index}.{p}" for p in parts)
    return out


def to_kohya_flux(state: dict[str, Any], *, alpha: float, shapes: dict[str, tuple[int, int]],
                  dtype: Any = None) -> dict[str, Any]:
    """kohya FLUX tensors from a peft transformer state dict (`<module>.lora_A.weight` / `lora_B`).

    `shapes` gives (out_features, in_features) of every block module, for the zero blocks of
    fused parts that carry no LoRA. Raises ValueError for LoRA keys outside the double/single blocks.
    """
    import torch

    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        match = _BLOCK.match(key)
        if not match:
            raise ValueError(f"LoRA key {key!r} is outside FLUX's double/single blocks: kohya's FLUX format has no "
                             "name for it (target_modules must name block projections)")
        modules.setdefault(f"{match[1]}.{match[2]}.{match[3]}", {})[match[4]] = tensor
    out: dict[str, Any] = {}
    for kohya, parts in kohya_groups(list(modules)).items():
        rank = next(modules[p]["A"].shape[0] for p in parts if p in modules)
        downs, ups = [], []
        for p in parts:
            if p in modules:
                downs.append(modules[p]["A"].float())
                ups.append(modules[p]["B"].float())
            else:
                rows, cols = shapes[p]
                downs.append(torch.zeros(rank, cols))
                ups.append(torch.zeros(rows, rank))
        down, up = torch.cat(downs), torch.block_diag(*ups)
        cast = dtype or modules[next(p for p in parts if p in modules)]["A"].dtype
        out[f"{kohya}.lora_down.weight"] = down.to(cast).contiguous()
        out[f"{kohya}.lora_up.weight"] = up.to(cast).contiguous()
        out[f"{kohya}.alpha"] = torch.tensor(float(alpha * len(parts)))
    return out


def from_kohya_flux(tensors: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The peft state dict (scale alpha / rank folded into lora_A) of a kohya FLUX file written by
    `to_kohya_flux`, for the block modules of `shapes` (name -> (out, in)): the inverse, for checks."""
    out: dict[str, Any] = {}
    for kohya, parts in kohya_groups(list(shapes)).items():
        if f"{kohya}.lora_down.weight" not in tensors:
            continue
        down, up = tensors[f"{kohya}.lora_down.weight"].float(), tensors[f"{kohya}.lora_up.weight"].float()
        rank = down.shape[0] // len(parts)
        scale = float(tensors[f"{kohya}.alpha"]) / down.shape[0]
        row = 0
        for i, p in enumerate(parts):
            rows = shapes[p][0]
            out[f"{p}.lora_A.weight"] = down[i * rank:(i + 1) * rank] * scale
            out[f"{p}.lora_B.weight"] = up[row:row + rows, i * rank:(i + 1) * rank]
            row += rows
    return out
