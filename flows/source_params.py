"""Parameters of the image-source runs: render folders and photo sets (one model each).

Both are their pipeline's parameter model (`pipeline_params`: one field per stage of the table, the
same stage models as an episode run's) with defaults of their own: augmentation
keeps colours and sides (product colours, faces), renders package at the guide's 1024 px.
User values (YAML, --set, the UI form) are merged over these defaults field by field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import model_validator

from flows.params import pipeline_params
from tasks.pipelines import stages_of
from tasks.sources.ingest_photos import IngestPhotosParams
from tasks.sources.ingest_renders import IngestRendersParams
from tasks.sources.render_training import DETAIL_SUFFIX, GUIDE_PLAN, NAME, resolve_plan

SourceStage = Literal[tuple(stages_of("renders"))]  # type: ignore[valid-type]
"""Stages a render or photo run can stop after (their pipelines', tasks/pipelines.py)."""

SHARED_DEFAULTS: dict[str, Any] = {
    "augment": {"flip": False, "hue_deg": 0.0, "background_swap_probability": 0.0},
}
RENDER_DEFAULTS: dict[str, Any] = {**SHARED_DEFAULTS, "package": {"render": {"resolution": 1024}}, "train": GUIDE_PLAN}
LEGACY_RENDER_KEYS: dict[str, tuple[str, ...]] = {
    "stage1_steps": ("train", "per_character", NAME, "max_steps"),
    "stage1_lr": ("train", "per_character", NAME, "unet_lr"),
    "stage1_prompts": ("train", "per_character", NAME, "sample_prompts"),
    "stage2_steps": ("train", "per_character", NAME + DETAIL_SUFFIX, "max_steps"),
    "stage2_lr": ("train", "per_character", NAME + DETAIL_SUFFIX, "unet_lr"),
    "stage2_prompts": ("train", "per_character", NAME + DETAIL_SUFFIX, "sample_prompts"),
    "rank": ("package", "ai_toolkit", "rank"),
    "base_model": ("package", "ai_toolkit", "base_model"),
}
"""Training settings that render runs once kept under `ingest` -> where they live now (old configs and run
records are read through this; the training plan belongs to the train parameters)."""
PHOTO_DEFAULTS: dict[str, Any] = {
    **SHARED_DEFAULTS,
    "augment": {**SHARED_DEFAULTS["augment"], "intensity": "light"},
    "caption": {"prompts": {"human": "photo of a person, {framing}, {setting}, {lighting}, {colours}"}},
    "package": {"render": {"resolution": 1024}},
}


def moved_legacy_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with the LEGACY_RENDER_KEYS of its `ingest` mapping moved to their place now."""
    ingest = data.get("ingest")
    if not isinstance(ingest, dict) or not set(ingest) & set(LEGACY_RENDER_KEYS):
        return data
    moved: dict[str, Any] = {}
    for key, value in ingest.items():
        if key in LEGACY_RENDER_KEYS:
            *parents, leaf = LEGACY_RENDER_KEYS[key]
            node = moved
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return merged({**data, "ingest": {k: v for k, v in ingest.items() if k not in LEGACY_RENDER_KEYS}}, moved)


def merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over `defaults`, nested mappings merged key by key."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class RendersRunParams(pipeline_params("renders", "RendersParamsBase", "The renders pipeline's stages.")):
    """A render folder's run: the render checks and training stages, then the shared stages."""

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        return merged(RENDER_DEFAULTS, moved_legacy_keys(data)) if isinstance(data, dict) else data

    def for_run(self, name: str, trigger: Optional[str] = None) -> "RendersRunParams":
        """These parameters with the product's name and trigger set, and `{name}` in the training plan resolved."""
        ingest = IngestRendersParams.model_validate(
            {**self.ingest.model_dump(), "name": self.ingest.name or name,
             "trigger": trigger or self.ingest.trigger or self.ingest.name or name})
        return self.model_copy(update={"ingest": ingest, "train": resolve_plan(self.train, ingest.name)})


class PhotosRunParams(pipeline_params("photos", "PhotosParamsBase", "The photos pipeline's stages.")):
    """A photo set's run: the analysis thresholds, then the shared stages (FLUX guide profiles)."""

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        return merged(PHOTO_DEFAULTS, data) if isinstance(data, dict) else data

    def for_run(self, name: str, trigger: Optional[str] = None) -> "PhotosRunParams":
        """These parameters with the identity's name and trigger set (the trigger is required)."""
        ingest = IngestPhotosParams.model_validate(
            {**self.ingest.model_dump(), "name": self.ingest.name or name, "trigger": trigger or self.ingest.trigger})
        if not ingest.trigger:
            raise ValueError("a photo set needs a trigger word (e.g. ohwx, sks, or a made-up word), got none")
        return self.model_copy(update={"ingest": ingest})
