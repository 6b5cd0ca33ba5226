"""Parameters of the image-source runs (render folders, photo sets): one form, one model per pipeline.

`SourceParams` is what the one flow (flows/source_to_lora.py) takes: a section per source's ingest
(`renders`, `photos`; the one of the other source is ignored) and the shared dataset and training
stages once. `for_source` turns it into that source's pipeline model (`RendersRunParams`,
`PhotosRunParams`: `pipeline_params`, one field per stage of the table, whose ingest section is
`ingest` as in config files), with the source's defaults under what was given: augmentation keeps
colours and sides (product colours, faces), both package at 1024 px, photos caption as photos,
renders train the guide's two stages (tasks/sources/render_training.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, get_args

from pydantic import BaseModel, Field, model_validator

from flows.params import PipelineParams, pipeline_params, stages_model
from tasks.pipelines import PIPELINES, stages_of
from tasks.run.spec import Step
from tasks.sources.render_training import DETAIL_SUFFIX, GUIDE_PLAN, NAME, resolve_plan

Source = Literal["renders", "photos"]
"""The image sources: each a pipeline of tasks/pipelines.py whose first stage is its `ingest`."""
SourceStage = Literal[tuple(stages_of("renders"))]  # type: ignore[valid-type]
"""Stages a render or photo run can stop after (their pipelines', tasks/pipelines.py)."""
assert all(stages_of(source) == list(get_args(SourceStage)) for source in get_args(Source))

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


def moved_legacy_keys(data: dict[str, Any], legacy: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """`data` with the `legacy` keys of its `ingest` mapping moved to their place now."""
    ingest = data.get("ingest")
    if not isinstance(ingest, dict) or not set(ingest) & set(legacy):
        return data
    moved: dict[str, Any] = {}
    for key, value in ingest.items():
        if key in legacy:
            *parents, leaf = legacy[key]
            node = moved
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return merged({**data, "ingest": {k: v for k, v in ingest.items() if k not in legacy}}, moved)


def merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over `defaults`, nested mappings merged key by key."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _SourceRun(BaseModel):
    """What both sources' pipeline models share: their defaults under the given values, the name and trigger."""

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    LEGACY: ClassVar[dict[str, tuple[str, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        return merged(cls.DEFAULTS, moved_legacy_keys(data, cls.LEGACY)) if isinstance(data, dict) else data

    def with_identity(self, name: str, trigger: Optional[str]) -> Any:
        """These parameters with the ingest's name and trigger set (given ones first, then the run's name)."""
        ingest = type(self.ingest).model_validate(
            {**self.ingest.model_dump(), "name": self.ingest.name or name, "trigger": trigger or self.ingest.trigger})
        return self.model_copy(update={"ingest": ingest})


class RendersRunParams(_SourceRun, pipeline_params("renders", "RendersParamsBase", "The renders pipeline's stages.")):
    """A render folder's run: the render checks, then the shared stages, training the guide's two LoRAs."""

    DEFAULTS: ClassVar[dict[str, Any]] = RENDER_DEFAULTS
    LEGACY: ClassVar[dict[str, tuple[str, ...]]] = LEGACY_RENDER_KEYS

    def for_run(self, name: str, trigger: Optional[str] = None) -> "RendersRunParams":
        """These parameters with the product's name and trigger (default: the name) set, and `{name}` in
        the training plan resolved."""
        run = self.with_identity(name, trigger or self.ingest.trigger or self.ingest.name or name)
        return run.model_copy(update={"train": resolve_plan(run.train, run.ingest.name)})


class PhotosRunParams(_SourceRun, pipeline_params("photos", "PhotosParamsBase", "The photos pipeline's stages.")):
    """A photo set's run: the analysis thresholds, then the shared stages (FLUX guide profiles)."""

    DEFAULTS: ClassVar[dict[str, Any]] = PHOTO_DEFAULTS

    def for_run(self, name: str, trigger: Optional[str] = None) -> "PhotosRunParams":
        """These parameters with the identity's name and trigger set (the trigger is required)."""
        run = self.with_identity(name, trigger)
        if not run.ingest.trigger:
            raise ValueError("a photo set needs a trigger word (e.g. ohwx, sks, or a made-up word), got none")
        return run


SOURCE_MODELS: dict[str, type[_SourceRun]] = {"renders": RendersRunParams, "photos": PhotosRunParams}
"""Source -> its pipeline's parameter model."""


def _form_fields() -> dict[str, Any]:
    """A section per source's ingest, then the stages every source pipeline shares (once)."""
    fields: dict[str, Any] = {}
    for source in get_args(Source):
        ingest = PIPELINES[source][0].spec.params
        fields[source] = (ingest, Field(default_factory=ingest, description=f"ingest of a {source} run (ignored otherwise)"))
    for item in PIPELINES["renders"][1:]:
        if isinstance(item, Step):
            fields[item.name] = (item.spec.params, Field(default_factory=item.spec.params))
    return fields


_SourceForm = stages_model("SourceParamsBase", __base__=PipelineParams, __module__=__name__, **_form_fields())


class SourceParams(_SourceForm):
    """A render or photo run's parameters in one form: the ingest section of each source, the shared stages."""

    def for_source(self, source: str) -> Any:
        """The `source` pipeline's parameters: its ingest section as `ingest`, the source's defaults under
        every value that was given (the other source's section left out)."""
        data = self.model_dump(mode="json", exclude_unset=True)
        ingest = data.pop(source, {})
        for other in SOURCE_MODELS:
            data.pop(other, None)
        return SOURCE_MODELS[source].model_validate({**data, "ingest": ingest})

    @classmethod
    def of(cls, source: str, params: BaseModel) -> "SourceParams":
        """The form's parameters of a source pipeline's parameters (what `for_source` gives back)."""
        data = params.model_dump(mode="json", exclude_unset=True)
        data[source] = data.pop("ingest", {})
        return cls.model_validate(data)
