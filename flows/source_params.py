"""Parameters of the image-source runs: render folders and photo sets (one model each).

Both compose the same stage parameters as episodes from `ingest` on (augment, caption, package,
validate, train), with defaults of their own: captions come from the ingest stage, augmentation
keeps colours and sides (product colours, faces), renders package at the guide's 1024 px.
User values (YAML, --set, the UI form) are merged over these defaults field by field.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.augment import AugmentParams
from tasks.caption import CaptionParams
from tasks.sources.ingest_photos import IngestPhotosParams
from tasks.sources.ingest_renders import IngestRendersParams
from tasks.package import PackageParams
from tasks.pipelines import stages_of
from tasks.sources.render_training import staged_train_params
from tasks.train import TrainParams
from tasks.validate import ValidateParams

SourceStage = Literal[tuple(stages_of("renders"))]  # type: ignore[valid-type]
"""Stages a render or photo run can stop after (their pipelines', tasks/pipelines.py)."""

for _model in ("_SourceParams", "RendersRunParams", "PhotosRunParams"):  # `validate` shadows BaseModel.validate
    warnings.filterwarnings("ignore", message=f'Field name "validate" in "{_model}" shadows', category=UserWarning)

SHARED_DEFAULTS: dict[str, Any] = {
    "augment": {"flip": False, "hue_deg": 0.0, "background_swap_probability": 0.0},
    "caption": {"captions_from": "ingest"},
}
RENDER_DEFAULTS: dict[str, Any] = {**SHARED_DEFAULTS, "package": {"render": {"resolution": 1024}}}
PHOTO_DEFAULTS: dict[str, Any] = {
    **SHARED_DEFAULTS,
    "augment": {**SHARED_DEFAULTS["augment"], "intensity": "light"},
    "caption": {**SHARED_DEFAULTS["caption"],
                "prompts": {"human": "photo of a person, {framing}, {setting}, {lighting}, {colours}"}},
    "package": {"render": {"resolution": 1024}},
}


def merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over `defaults`, nested mappings merged key by key."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _SourceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    augment: AugmentParams = Field(default_factory=AugmentParams)
    caption: CaptionParams = Field(default_factory=CaptionParams)
    package: PackageParams = Field(default_factory=PackageParams)
    validate: ValidateParams = Field(default_factory=ValidateParams)
    train: TrainParams = Field(default_factory=TrainParams)


class RendersRunParams(_SourceParams):
    """A render folder's run: the render checks and training stages, then the shared stages."""

    ingest: IngestRendersParams = Field(default_factory=IngestRendersParams)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        return merged(RENDER_DEFAULTS, data) if isinstance(data, dict) else data

    def for_run(self, name: str, trigger: Optional[str] = None) -> "RendersRunParams":
        """These parameters with the product's name and trigger set and the two training stages resolved."""
        ingest = IngestRendersParams.model_validate(
            {**self.ingest.model_dump(), "name": self.ingest.name or name,
             "trigger": trigger or self.ingest.trigger or self.ingest.name or name})
        return self.model_copy(update={"ingest": ingest, "train": staged_train_params(self.train, ingest)})


class PhotosRunParams(_SourceParams):
    """A photo set's run: the analysis thresholds, then the shared stages (FLUX guide profiles)."""

    ingest: IngestPhotosParams = Field(default_factory=IngestPhotosParams)

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
