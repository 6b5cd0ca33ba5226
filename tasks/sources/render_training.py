"""The render guide's training plan: two stages, their AI-Toolkit jobs and the train stage's settings.

Stage 1 (the core LoRA, `<name>`) learns the product from the essential and sensor phases; stage 2
(`<name>_detail`) fine-tunes stage 1's LoRA on the detail phase. `ai_toolkit_config` writes the
guide's FLUX job for a stage (stage 2 starts from stage 1's file); `staged_train_params` gives
our train stage the same plan (steps, LR and sample prompts per LoRA, stage 2 initialised from
stage 1's finished LoRA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


GUIDE_PROMPTS_STAGE1 = [
    "{trigger} health smartwatch rotating 360 degrees, black device with glossy screen, 33mm square design, white background",
    "{trigger} smartwatch closeup, copper magnetic connectors visible, 6 golden pins, ring frame detail",
    "{trigger} smartwatch with biometric sensors active, green LED lights glowing, bottom view, health monitoring",
    "{trigger} smartwatch with powerbank attached, modular battery system, green LED indicator, complete assembly",
    "{trigger} smartwatch core device only, LED display screen, speaker and button visible, side view",
]
"""The sample prompts of the guide's AI-Toolkit config (its product name replaced by the trigger)."""
GUIDE_PROMPTS_STAGE2 = [
    "{trigger} smartwatch copper connectors closeup, 6 golden pins, top view",
    "{trigger} smartwatch button and speaker detail, side profile, closeup",
    "{trigger} smartwatch display screen closeup, glossy surface, reflections",
]
"""The guide's test prompts of stage 2 (detail enhancement)."""
NEGATIVE = "blurry, low quality, distorted, deformed, watermark, text, logo"


def ai_toolkit_config(params: Any, stage: int, folders: list[Path], training_folder: Path) -> dict:
    """The guide's AI-Toolkit FLUX LoRA job for one training stage (stage 2 starts from stage 1's LoRA)."""
    name = params.character_of(stage)
    prompts = [p.replace("{trigger}", params.trigger) for p in (params.stage1_prompts if stage == 1 else params.stage2_prompts)]
    network: dict[str, Any] = {"type": "lora", "linear": params.rank, "linear_alpha": params.rank}
    if stage == 2:
        first = params.character_of(1)
        network["pretrained_lora_path"] = str(training_folder / first / f"{first}.safetensors")
    size = list(params.resolution)
    return {
        "job": "extension",
        "config": {
            "name": name,
            "process": [{
                "type": "sd_trainer", "training_folder": str(training_folder), "device": "cuda:0",
                "trigger_word": params.trigger, "network": network,
                "save": {"dtype": "float16", "save_every": 100, "max_step_saves_to_keep": 3},
                "datasets": [{"folder_path": str(f), "caption_ext": "txt", "caption_dropout_rate": 0.05,
                              "shuffle_tokens": False, "cache_latents_to_disk": True, "resolution": size}
                             for f in folders],
                "train": {"batch_size": 1, "steps": params.stage1_steps if stage == 1 else params.stage2_steps,
                          "gradient_accumulation_steps": 1, "train_unet": True, "train_text_encoder": False,
                          "gradient_checkpointing": True, "noise_scheduler": "flowmatch", "optimizer": "adamw8bit",
                          "lr": params.stage1_lr if stage == 1 else params.stage2_lr, "lr_scheduler": "constant",
                          "ema_config": {"use_ema": True, "ema_decay": 0.99}, "dtype": "bf16"},
                "model": {"name_or_path": params.base_model, "is_flux": True, "quantize": True},
                "sample": {"sampler": "flowmatch", "sample_every": 100, "width": size[0], "height": size[1],
                           "prompts": prompts, "neg": NEGATIVE, "seed": 42, "walk_seed": True,
                           "guidance_scale": 4.0, "sample_steps": 20},
            }],
        },
        "meta": {"name": name, "version": "1.0", "stage": stage},
    }


def staged_train_params(train: Any, params: Any) -> Any:
    """The train stage's parameters for the guide's two stages: steps, LR and sample prompts of each
    LoRA, and stage 2 starting from stage 1's finished LoRA (`TrainParams.per_character`, `init_from`).
    Settings the user gave per character are kept."""
    from models.lora_settings import SettingsOverrides

    first, second = params.character_of(1), params.character_of(2)
    staged = {first: SettingsOverrides(max_steps=params.stage1_steps, unet_lr=params.stage1_lr,
                                       sample_prompts=list(params.stage1_prompts)),
              second: SettingsOverrides(max_steps=params.stage2_steps, unet_lr=params.stage2_lr,
                                        sample_prompts=list(params.stage2_prompts))}
    for character, given in train.per_character.items():
        base = staged.get(character, SettingsOverrides())
        staged[character] = base.model_copy(update=given.model_dump(exclude_none=True))
    return train.model_copy(update={"per_character": staged, "init_from": {second: first, **train.init_from}})
