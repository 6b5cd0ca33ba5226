"""The render guide's training plan, as train parameters: two LoRAs, the second fine-tuned from the first.

Stage 1 (the core LoRA, `<name>`) learns the product from the essential and sensor phases; stage 2
(`<name>_detail`) fine-tunes stage 1's LoRA on the detail phase. The plan is the train stage's own
`per_character` and `init_from` settings (`GUIDE_PLAN`, the renders run's default), keyed by `{name}`
until the run's name is known (`resolve_plan`). The package stage writes each LoRA's AI-Toolkit job
from the same settings (stage 2's job starts from stage 1's LoRA).
"""

from __future__ import annotations

from typing import Any

from tasks.sources.ingest_renders import DETAIL_SUFFIX

NAME = "{name}"
"""Stands for the product's name in the keys of `GUIDE_PLAN` (resolved by `resolve_plan`)."""
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
GUIDE_PLAN: dict[str, Any] = {
    "per_character": {
        NAME: {"max_steps": 3000, "unet_lr": 1e-4, "sample_prompts": GUIDE_PROMPTS_STAGE1},
        NAME + DETAIL_SUFFIX: {"max_steps": 1500, "unet_lr": 5e-5, "sample_prompts": GUIDE_PROMPTS_STAGE2},
    },
    "init_from": {NAME + DETAIL_SUFFIX: NAME},
}
"""The train parameters of the guide's two stages: steps, LR and sample prompts of each, stage 2 from stage 1."""


def resolve_plan(train: Any, name: str) -> Any:
    """`train` with `{name}` in its per-character keys and init_from replaced by the product's name;
    settings given under the resolved name win over the `{name}` ones, field by field."""
    def named(key: str) -> str:
        return key.replace(NAME, name)

    per_character: dict[str, Any] = {}
    for key in sorted(train.per_character, key=lambda k: NAME not in k):  # placeholders first, resolved names over them
        given = train.per_character[key]
        base = per_character.get(named(key))
        per_character[named(key)] = base.model_copy(update=given.model_dump(exclude_none=True)) if base else given
    init_from = {named(k): named(v) for k, v in train.init_from.items() if NAME in k}
    init_from.update({k: v for k, v in train.init_from.items() if NAME not in k})
    return train.model_copy(update={"per_character": per_character, "init_from": init_from})
