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
def ai_toolkit_config(params: Any, stage: int, folders: list[Path], training_folder: Path) -> dict:
    """The guide's AI-Toolkit FLUX LoRA job for one training stage (stage 2 starts from stage 1's LoRA)."""
    from models.ai_toolkit_format import ai_toolkit_job

    name, first = params.character_of(stage), params.character_of(1)
    prompts = [p.replace("{trigger}", params.trigger) for p in (params.stage1_prompts if stage == 1 else params.stage2_prompts)]
    return ai_toolkit_job(
        name, params.trigger, folders, training_folder, rank=params.rank,
        steps=params.stage1_steps if stage == 1 else params.stage2_steps,
        lr=params.stage1_lr if stage == 1 else params.stage2_lr, base_model=params.base_model,
        resolution=list(params.resolution), prompts=prompts, save_every=100, sample_every=100,
        init_lora=str(training_folder / first / f"{first}.safetensors") if stage == 2 else None, meta={"stage": stage})


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
