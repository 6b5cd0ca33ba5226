"""Start a training from an earlier LoRA instead of fresh layers (fine-tuning, e.g. a detail stage).

`load_init_lora` sets the peft LoRA layers just added to a UNet (and trained text encoders) to
the weights of a kohya-format LoRA file, the format our trainer exports. Keys are matched through
the export's own naming (`models.kohya_format.to_kohya`), so whatever the trainer writes it can
read back. The file's strength is kept: `lora_up` is rescaled from the file's alpha / rank to the
new training's alpha / rank. Ranks must agree, and every layer must be in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class InitLoraMismatch(ValueError):
    """The LoRA file does not fit the layers of this training (rank, modules, text encoders)."""


def _kohya_key(peft_key: str, tensor: Any, te_index: int | None, family: str, layers_per_block: int) -> str:
    """The kohya-format key the export gives a peft key (lora_A -> lora_down, lora_B -> lora_up)."""
    from models.kohya_format import to_kohya

    unet = {peft_key: tensor} if te_index is None else {}
    tes = [] if te_index is None else [{}] * te_index + [{peft_key: tensor}]
    names = to_kohya(unet, tes, family=family, alpha=1.0, layers_per_block=layers_per_block)
    return next(k for k in names if not k.endswith(".alpha"))


def load_init_lora(unet: Any, text_encoders: list[Any], path: str | Path, *, family: str, alpha: float) -> int:
    """Load a kohya-format LoRA file into freshly added LoRA layers. Returns the tensors loaded.

    Args:
        unet: the UNet with its LoRA adapter added; text_encoders: those with adapters (trained ones).
        path: the LoRA file; family: "sd15" or "sdxl"; alpha: this training's LoRA alpha.
    Raises:
        FileNotFoundError when the file is missing; InitLoraMismatch when it does not fit.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from models.kohya_format import read_kohya

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_lora file not found: {path}")
    tensors, _ = read_kohya(path)
    layers_per_block = unet.config.layers_per_block
    used: set[str] = set()
    loaded = 0
    for te_index, module in [(None, unet)] + list(enumerate(text_encoders)):
        state = get_peft_model_state_dict(module, save_embedding_layers=False)
        new, missing = {}, []
        for key, current in state.items():
            name = _kohya_key(key, current, te_index, family, layers_per_block)
            if name not in tensors:
                missing.append(name)
                continue
            value = tensors[name].to(current.dtype)
            if value.shape != current.shape:
                raise InitLoraMismatch(f"init_lora {path.name}: {name} has shape {tuple(value.shape)}, this training "
                                       f"needs {tuple(current.shape)}; set rank to the file's rank ({min(value.shape)})")
            if name.endswith("lora_up.weight"):
                alpha_key = name[: -len(".lora_up.weight")] + ".alpha"
                file_alpha = float(tensors[alpha_key]) if alpha_key in tensors else float(value.shape[1])
                value = value * (file_alpha / alpha)  # same rank: keep (file alpha / rank) x up @ down
            new[key] = value
            used.add(name)
        if missing:
            raise InitLoraMismatch(f"init_lora {path.name} lacks {len(missing)} layer(s) this training has "
                                   f"(e.g. {missing[0]}); train with the same target_modules as the file")
        set_peft_model_state_dict(module, new)
        loaded += len(new)
    extra = [k for k in tensors if not k.endswith(".alpha") and k not in used]
    if extra:
        where = "text-encoder" if any(k.startswith("lora_te") for k in extra) else "other"
        raise InitLoraMismatch(f"init_lora {path.name} has {len(extra)} {where} layer(s) this training lacks "
                               f"(e.g. {extra[0]})" + ("; set train_text_encoder true to continue them"
                                                       if where == "text-encoder" else ""))
    return loaded
