"""The run's parameters: one pydantic model for the CLI, the YAML config, the flow and the UI form."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, ValidationError, create_model, model_serializer
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema as cs

from tasks.pipelines import PIPELINES, stages_of
from tasks.run.spec import Step
from tasks.run.yaml_file import read_yaml_mapping

Stage = Literal[tuple(stages_of("episode"))]  # type: ignore[valid-type]
"""Stages an episode run can stop after (the `episode` pipeline's, tasks/pipelines.py)."""
LAST_STAGE: str = get_args(Stage)[-1]
"""Where a run stops by default: the end of the pipeline."""


class PipelineParams(BaseModel):
    """The base of every run's parameters: unknown fields rejected, no nulls, a readable UI form."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: Any) -> Any:
        """Optional fields left empty (None) are left out: the form and the API then never see null."""
        return _drop_nones(handler(self))

    @classmethod
    def __get_pydantic_json_schema__(cls, core: cs.CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The schema of the UI form: model dropdowns, labeled lists, no None toggles (flows/form.py)."""
        from flows.form import shape_form

        schema = handler(core)
        shape_form(handler.resolve_ref_schema(schema), handler.resolve_ref_schema)
        return schema


def _drop_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    return value


def pipeline_params(source: str, name: str, doc: str) -> type[BaseModel]:
    """The parameter model of a source's pipeline: one field per stage, typed by the stage spec's
    parameter model with its defaults; unknown fields are rejected. The one base of every run's parameters."""
    fields: dict[str, Any] = {step.name: (step.spec.params, Field(default_factory=step.spec.params))
                              for step in PIPELINES[source] if isinstance(step, Step)}
    return stages_model(name, __base__=PipelineParams, __doc__=doc, __module__=__name__, **fields)


def stages_model(name: str, **options: Any) -> type[BaseModel]:
    """`create_model` of a model with a field per stage (the stage `validate` shadows pydantic's deprecated
    BaseModel.validate: that warning is expected)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message='Field name "validate" in ".*" shadows', category=UserWarning)
        return create_model(name, **options)


RunParams = pipeline_params("episode", "RunParams", "Every stage's parameters, with defaults; unknown fields are rejected.")
"""An episode run's parameters (frames ... evaluate, in the pipeline's order)."""


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
        data = read_yaml_mapping(config, "config", "of stage names to parameters", ParamsError)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents, start=1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[:depth])
                raise ParamsError(f"--set {dotted}: {where} is {node!r} in {source}, not a mapping of parameters")
        node[leaf] = value
        source = f"{source} + --set {dotted}"
    try:
        return (model or RunParams).model_validate(data)
    except ValidationError as exc:
        raise ParamsError(describe(exc, source)) from None
