"""The run form a person fills in the Prefect UI: the JSON schema of `RunParams`, made readable.

Pydantic's schema is exact but hard to fill: model names are free text, optional fields show a
"None" toggle instead of the value the run will use, and tuples are rows of unlabeled boxes.
`shape_form` rewrites the stage definitions in place (the values accepted stay the same):

- model choices (segmenter, embedder, captioner, base model) become a dropdown of known names
  with a free `custom` text as the other choice;
- an optional field loses its `None` branch; its description says what an empty field means
  (for training: the value each profile uses); an optional on/off field becomes a dropdown of
  true / false left empty (Prefect's toggle would send `false` for a field nobody touched);
- fixed-length lists get one label per item (R, G, B; min, max);
- angle brackets in descriptions are escaped (the form reads them as markdown).

Every stage stays its own group (a card in the form), in pipeline order. (Prefect's form has no
collapsible group: an `anyOf` of "defaults" and the stage renders as a raw JSON box instead.)
"""

from __future__ import annotations

import re
from typing import Any, Callable

from models.embedders import DEFAULT_MODELS
from models.lora_settings import CAPTION_FIELDS, PROFILES, TrainSettings
from models.sd_base import DEFAULT_BASE
from models.segmenters import REMBG_MODELS

MODEL_CHOICES: dict[tuple[str, str], list[str]] = {
    ("segment", "model"): list(REMBG_MODELS),
    ("embed", "embedder"): ["colour-shape", *(f"{family}:{model}" for family, model in DEFAULT_MODELS.items())],
    ("evaluate", "embedder"): ["colour-shape", *(f"{family}:{model}" for family, model in DEFAULT_MODELS.items())],
    ("caption", "captioner"): ["template", "blip2:Salesforce/blip2-opt-2.7b", "blip2:Salesforce/blip2-flan-t5-xl"],
    ("train", "base"): [DEFAULT_BASE, "stabilityai/stable-diffusion-xl-base-1.0", "tiny", "tiny-sdxl"],
}
"""Known model names per (stage, field); anything else is still accepted as `custom`."""

CUSTOM_HINT = {
    "model": "custom:<path to .onnx>, or another rembg model name",
    "embedder": "clip:/siglip:/dinov2:<Hugging Face id or folder>, or onnx:<file>",
    "captioner": "blip2:<Hugging Face id or local folder>",
    "base": "a Hugging Face id or a local diffusers folder",
}
ITEM_LABELS: dict[str, list[str]] = {
    "mean": ["R", "G", "B"], "std": ["R", "G", "B"], "background": ["R", "G", "B"],
    "brightness": ["min", "max"], "contrast": ["min", "max"], "resolution": ["width", "height"],
}
"""Labels of the items of fixed-length list fields, by field name."""
EMPTY_MEANS = "leave empty for the default"


def profile_defaults(field: str) -> str:
    """What an empty training `field` means, e.g. 'default by profile: fast 512, final 768, demo 64; ...'."""
    default = TrainSettings.model_fields[field].default
    if field in CAPTION_FIELDS:  # read from the package's dataset TOML whatever the profile
        return f"default: as the package's dataset TOML says (captions as packaged), else {default}"
    values = {name: PROFILES[name].get(field, default) for name in ("fast", "final", "demo")}
    shown = {name: "auto" if value is None else value for name, value in values.items()}
    if len(set(map(str, shown.values()))) == 1:
        return f"default (fast, final, demo): {shown['fast']}; package: the package's kohya TOML"
    return "default by profile: " + ", ".join(f"{name} {value}" for name, value in shown.items()) + \
        "; package: the package's kohya TOML"


def _drop_none(field: dict[str, Any]) -> bool:
    """Replace `anyOf: [X, null]` by X in place; True when the field was optional."""
    branches = field.get("anyOf")
    if not branches or {"type": "null"} not in branches:
        return False
    rest = [b for b in branches if b != {"type": "null"}]
    del field["anyOf"]
    if len(rest) == 1:
        field.update({k: v for k, v in rest[0].items() if k not in field})
    else:
        field["anyOf"] = rest
    if field.get("default", 0) is None:
        del field["default"]
    return True


def _unset_switch(field: dict[str, Any]) -> None:
    """An optional on/off field as a dropdown of true / false that starts empty (empty: not set).

    Prefect's toggle has no "not set": it sends `false` for a toggle nobody touched.
    """
    if field.get("type") == "boolean" and "default" not in field:
        del field["type"]
        field["enum"] = [True, False]


def _model_choice(field: dict[str, Any], name: str, known: list[str]) -> None:
    """A dropdown of known names, or a free text marked `custom`."""
    for key in ("type", "enum", "anyOf"):
        field.pop(key, None)
    field["anyOf"] = [{"title": "known model", "type": "string", "enum": known},
                      {"title": "custom", "type": "string", "description": CUSTOM_HINT.get(name, "")}]


def _label_items(field: dict[str, Any], labels: list[str]) -> None:
    items = field.get("prefixItems")
    if items and len(items) == len(labels):
        for item, label in zip(items, labels):
            item["title"] = label
        field["description"] = f"{field.get('description', '')} ({', '.join(labels)})".strip()


def _escape_brackets(field: dict[str, Any]) -> None:
    """Prefect's form renders descriptions as markdown, where `<id or folder>` would vanish as an HTML tag."""
    for part in (field, *field.get("anyOf", [])):
        if "description" in part:
            part["description"] = re.sub(r"(?<!\\)([<>])", r"\\\1", part["description"])  # once


def shape_stage(stage: str, definition: dict[str, Any]) -> None:
    """Rewrite one stage's definition (see the module docstring)."""
    _escape_brackets(definition)
    for name, field in definition.get("properties", {}).items():
        optional = _drop_none(field)
        if optional:
            meaning = profile_defaults(name) if stage == "train" and name in TrainSettings.model_fields else EMPTY_MEANS
            field["description"] = f"{field.get('description', '')}; {meaning}".lstrip("; ")
            _unset_switch(field)
        if (stage, name) in MODEL_CHOICES:
            _model_choice(field, name, MODEL_CHOICES[(stage, name)])
        if name in ITEM_LABELS:
            _label_items(field, ITEM_LABELS[name])
        _escape_brackets(field)


def shape_form(schema: dict[str, Any], resolve: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite RunParams' `schema` and the stage definitions it points to; `resolve` follows a $ref."""
    for stage, ref in schema.get("properties", {}).items():
        definition = resolve(ref)
        shape_stage(stage, definition)
        for field in definition.get("properties", {}).values():  # nested groups (package.background, ...)
            if "$ref" in field:
                shape_stage(f"{stage}.nested", resolve(field))
