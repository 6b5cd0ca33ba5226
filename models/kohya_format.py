"""LoRA files in the kohya sd-scripts key format (what A1111, ComfyUI and diffusers all load).

Keys are the module path with dots as underscores, behind a prefix: `lora_unet_` for the UNet,
`lora_te_` for the SD1.5 text encoder, `lora_te1_` / `lora_te2_` for SDXL's two. Each module has
`.lora_down.weight` (peft `lora_A`), `.lora_up.weight` (peft `lora_B`) and `.alpha` (the real
network alpha, so scale = alpha / rank). SD1.5 UNet paths keep diffusers' names (kohya trains SD1.x
on a diffusers-named UNet); SDXL paths use the original (sgm) names kohya uses for SDXL:
`input_blocks.N.1`, `middle_block.1`, `output_blocks.N.1`. Metadata are `ss_*` strings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

UNET_PREFIX = "lora_unet_"
TE_PREFIXES = {"sd15": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}
BASE_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
ARCHITECTURES = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora",
                 "flux": "flux-1-dev/lora"}

_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.attentions\.0\.(.+)$")


def sgm_module_name(module: str, layers_per_block: int) -> str:
    """The SDXL (sgm) name of a diffusers UNet module inside a transformer (attention) block.

    >>> sgm_module_name("down_blocks.1.attentions.0.proj_in", 2)
    'input_blocks.4.1.proj_in'
    """
    n = layers_per_block + 1
    if m := _DOWN.match(module):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := _UP.match(module):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := _MID.match(module):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"UNet module '{module}' is outside the attention blocks; kohya SDXL LoRA names "
                     "cover attention blocks only (target_modules must be attention/transformer layers)")


def _split(peft_key: str) -> tuple[str, str]:
    """'a.b.lora_A.weight' -> ('a.b', 'lora_down.weight')."""
    for part, kohya in ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight")):
        if peft_key.endswith(part):
            return peft_key[: -len(part)], kohya
    raise ValueError(f"not a LoRA weight key: {peft_key}")


def to_kohya(unet_state: dict[str, Any], te_states: list[dict[str, Any]], *, family: str, alpha: float,
             layers_per_block: int, dtype: Any = None) -> dict[str, Any]:
    """Kohya-format tensors from peft state dicts (`get_peft_model_state_dict` of UNet and TEs)."""
    import torch

    out: dict[str, Any] = {}
    groups = [(UNET_PREFIX, unet_state, True)] + [(p, s, False) for p, s in zip(TE_PREFIXES[family], te_states)]
    for prefix, state, is_unet in groups:
        for key, tensor in state.items():
            module, suffix = _split(key)
            if is_unet and family == "sdxl":
                module = sgm_module_name(module, layers_per_block)
            name = prefix + module.replace(".", "_")
            out[f"{name}.{suffix}"] = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def to_diffusers(unet_state: dict[str, Any], te_states: list[dict[str, Any]], scale: float) -> list[dict[str, Any]]:
    """Diffusers-format layers (alpha folded into lora_up, since that format has no alpha)."""
    folded = []
    for state in (unet_state, *te_states):
        folded.append({k: (v * scale if ".lora_B." in k else v).detach().to("cpu").contiguous() for k, v in state.items()})
    return folded


def tag_frequency(captions: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per image folder, how often each comma-separated tag occurs
    (tags stripped and lower-cased, as kohya counts them)."""
    out: dict[str, dict[str, int]] = {}
    for folder, texts in captions.items():
        counts: dict[str, int] = {}
        for text in texts:
            for tag in (t.strip().lower() for t in text.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        out[folder] = counts
    return out


def metadata(*, family: str, base: str, rank: int, alpha: float, resolution: int, steps: int, epochs: int,
             max_steps: int, output_name: str, trigger: str, captions: dict[str, list[str]],
             repeats: dict[str, int], settings: dict[str, Any], started: float, finished: float,
             buckets: dict[str, int], base_hashes: dict[str, str] | None = None,
             extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The `ss_*` (kohya) and `modelspec.*` metadata strings of a LoRA file."""
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_network_dropout": str(settings.get("dropout", 0.0)),
        "ss_base_model_version": BASE_VERSIONS[family], "ss_v2": "False",
        "ss_sd_model_name": os.path.basename(base.rstrip("/\\")) or base,
        "ss_v_parameterization": str(bool(settings.get("v_prediction"))),
        "ss_zero_terminal_snr": str(bool(settings.get("zero_terminal_snr"))),
        "ss_shuffle_caption": str(bool(settings.get("shuffle_caption"))),
        "ss_keep_tokens": str(settings.get("keep_tokens", 0)),
        "ss_caption_tag_dropout_rate": str(settings.get("caption_tag_dropout_rate", 0.0)),
        "ss_resolution": f"({resolution}, {resolution})", "ss_steps": str(steps), "ss_epoch": str(epochs),
        "ss_max_train_steps": str(max_steps), "ss_output_name": output_name,
        "ss_unet_lr": str(settings.get("unet_lr")), "ss_learning_rate": str(settings.get("unet_lr")),
        "ss_text_encoder_lr": str(settings.get("te_lr") if settings.get("train_text_encoder") else 0.0),
        "ss_network_train_unet_only": str(not settings.get("train_text_encoder")),
        "ss_lr_scheduler": str(settings.get("lr_scheduler")), "ss_lr_warmup_steps": str(settings.get("warmup_steps")),
        "ss_noise_offset": str(settings.get("noise_offset")), "ss_min_snr_gamma": str(settings.get("min_snr_gamma")),
        "ss_caption_dropout_rate": str(settings.get("caption_dropout_rate")),
        "ss_mixed_precision": str(settings.get("mixed_precision")), "ss_seed": str(settings.get("seed")),
        "ss_batch_size_per_device": str(settings.get("batch_size")),
        "ss_gradient_accumulation_steps": str(settings.get("grad_accum")),
        "ss_num_train_images": str(sum(len(v) * repeats.get(k, 1) for k, v in captions.items())),
        "ss_num_reg_images": "0",
        "ss_tag_frequency": json.dumps(tag_frequency(captions)),
        "ss_dataset_dirs": json.dumps({k: {"n_repeats": repeats.get(k, 1), "img_count": len(v)} for k, v in captions.items()}),
        "ss_bucket_info": json.dumps({"buckets": buckets}),
        "ss_training_started_at": str(started), "ss_training_finished_at": str(finished),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURES[family],
        "modelspec.implementation": "diffusers", "modelspec.title": output_name,
        "modelspec.trigger_phrase": trigger, "modelspec.resolution": f"{resolution}x{resolution}",
        "ss_training_comment": f"trained by episode2lora; trigger word: {trigger}",
    }
    meta.update(base_hashes or {})
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def model_hashes(path: Path) -> dict[str, str]:
    """kohya's hashes of a base model file: `ss_sd_model_hash` (the legacy short hash: sha256 of
    64 KiB at offset 1 MiB, 8 hex digits) and `ss_new_sd_model_hash` (sha256 of the whole file)."""
    full = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
        fh.seek(0)
        for block in iter(lambda: fh.read(1 << 20), b""):
            full.update(block)
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": full.hexdigest()}


def save_kohya(path: Path, tensors: dict[str, Any], meta: dict[str, str]) -> Path:
    """Write a kohya-format `.safetensors` atomically (temporary name, then rename)."""
    import os
    import uuid

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_kohya(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a kohya-format LoRA file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
