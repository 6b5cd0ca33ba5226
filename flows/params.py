"""The run's parameters: one pydantic model for the CLI, the YAML config, the flow and the UI form."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.frames import FramesParams
from tasks.pipelines import stages_of
from tasks.segment import SegmentParams
from tasks.embed import EmbedParams
from tasks.cluster import ClusterParams
from tasks.tier import TierParams
from tasks.select import SelectParams
from tasks.augment import AugmentParams
from tasks.caption import CaptionParams
from tasks.package import PackageParams
from tasks.validate import ValidateParams
from tasks.train import TrainParams
from tasks.evaluate import EvaluateParams

Stage = Literal[tuple(stages_of("episode"))]  # type: ignore[valid-type]
"""Stages an episode run can stop after (the `episode` pipeline's, tasks/pipelines.py)."""
LAST_STAGE: str = get_args(Stage)[-1]
"""Where a run stops by default: the end of the pipeline."""


# `validate` (the stage) shadows pydantic's deprecated BaseModel.validate; the field is what we mean.
warnings.filterwarnings("ignore", message='Field name "validate" in "RunParams" shadows', category=UserWarning)


class RunParams(BaseModel):
    """Every stage's parameters, with defaults; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    frames: FramesParams = Field(default_factory=FramesParams)
    segment: SegmentParams = Field(default_factory=SegmentParams)
    embed: EmbedParams = Field(default_factory=EmbedParams)
    cluster: ClusterParams = Field(default_factory=ClusterParams)
    tier: TierParams = Field(default_factory=TierParams)
    select: SelectParams = Field(default_factory=SelectParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    caption: CaptionParams = Field(default_factory=CaptionParams)
    package: PackageParams = Field(default_factory=PackageParams)
    validate: ValidateParams = Field(default_factory=ValidateParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the field."""


def describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"])
        given = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"  {field}: {item['msg']}{given}")
    return "\n".join(lines)


def load_params(config: Path | None = None, overrides: dict[str, Any] | None = None,
                model: type[BaseModel] | None = None) -> Any:
    """Defaults, then a YAML file, then overrides like {"frames.mode": "interval"}, validated as
    `model` (RunParams; the render and photo flows pass their own)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if config is not None:
        source = str(config)
        try:
            data = yaml.safe_load(Path(config).read_text()) or {}
        except FileNotFoundError:
            raise ParamsError(f"config file not found: {config}") from None
        except yaml.YAMLError as exc:
            raise ParamsError(f"config file {config} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ParamsError(f"config file {config} must hold a mapping of stage names to parameters")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        source = f"{source} + --set {dotted}"
    try:
        return (model or RunParams).model_validate(data)
    except ValidationError as exc:
        raise ParamsError(describe(exc, source)) from None
