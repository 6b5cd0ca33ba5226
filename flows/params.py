"""The run's parameters: one pydantic model for the CLI, the YAML config, the flow and the UI form."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.frames import FramesParams
from tasks.segment import SegmentParams

Stage = Literal["frames", "segment"]
"""Stages a run can stop after (grows as stages land)."""


class RunParams(BaseModel):
    """Every stage's parameters, with defaults; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    frames: FramesParams = Field(default_factory=FramesParams)
    segment: SegmentParams = Field(default_factory=SegmentParams)


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the field."""


def describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"])
        given = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"  {field}: {item['msg']}{given}")
    return "\n".join(lines)


def load_params(config: Path | None = None, overrides: dict[str, Any] | None = None) -> RunParams:
    """Defaults, then a YAML file, then overrides like {"frames.mode": "interval"}."""
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
        return RunParams.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(describe(exc, source)) from None
