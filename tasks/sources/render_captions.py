"""Captions of renders from their file names, through the user's caption template file.

The file is YAML with `template` (and optionally `tokens`, `drop`), or plain text that is the
template; see `RenderTemplate`. `caption_from_name` fills it for one render of a sequence.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SIZE_TOKEN = re.compile(r"^(\d+)x(\d+)$")
PLACEHOLDERS = ("trigger", "name", "words", "phase", "frame", "frames", "angle")


class RenderTemplate(BaseModel):
    """How a caption is made from a render's file name (the user's caption template file).

    The file is YAML with `template` (and optionally `tokens`, `drop`), or plain text that is the
    template. Placeholders: {trigger} {name} {words} {phase} {frame} {frames} {angle}. `{words}`
    is the name's tokens as phrases: `tokens` maps a token or a run of tokens (`SENSORS_ON`) to a
    phrase (longest match first, "" drops it); other tokens are written in lower case; size
    tokens (`1024x1024`) and tokens listed in `drop` are left out.
    """

    model_config = ConfigDict(extra="forbid")

    template: str = Field(..., description="caption with {placeholders}")
    tokens: dict[str, str] = Field(default_factory=dict, description="token (or TOKEN_RUN) -> phrase")
    drop: list[str] = Field(default_factory=list, description="tokens left out of {words}")

    @field_validator("template")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        text = " ".join(value.split())
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        except ValueError as exc:
            raise ValueError(f"template is not a valid format string ({exc}): {value!r}") from None
        unknown = sorted(n for n in names if n.split(".")[0].split("[")[0] not in PLACEHOLDERS)
        if unknown or "" in names:
            raise ValueError(f"template uses unknown placeholder(s) {unknown or ['{}']}; "
                             f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        return text


def read_template(path: str | Path) -> RenderTemplate:
    """Load a caption template file (YAML with `template:`, or the plain-text template).

    Raises FileNotFoundError or ValueError naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"caption template file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    try:
        if isinstance(data, dict):
            return RenderTemplate.model_validate(data)
        return RenderTemplate(template=text.strip())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ValueError(f"caption template {path}: {problems}") from None


def token_words(sequence: str, template: RenderTemplate) -> str:
    """The name's tokens as phrases (longest mapped run first), size and dropped tokens left out."""
    tokens = [t for t in sequence.split("_") if t and not SIZE_TOKEN.match(t) and t not in template.drop]
    phrases: list[str] = []
    plain: list[str] = []
    i = 0
    while i < len(tokens):
        for j in range(len(tokens), i, -1):
            run = "_".join(tokens[i:j])
            if run in template.tokens:
                if plain:
                    phrases.append(" ".join(plain))
                    plain = []
                if template.tokens[run].strip():
                    phrases.append(template.tokens[run].strip())
                i = j
                break
        else:
            plain.append(tokens[i].lower())
            i += 1
    if plain:
        phrases.append(" ".join(plain))
    return ", ".join(phrases)


def caption_from_name(template: RenderTemplate, *, trigger: str, sequence: str, phase: str, frame: int,
                      frames: int) -> str:
    """Fill the template for one render."""
    angle = round(frame * 360 / frames) % 360 if frames else 0
    text = template.template.format(trigger=trigger, name=sequence, words=token_words(sequence, template),
                                    phase=phase, frame=frame, frames=frames, angle=angle)
    parts = [p.strip() for p in text.split(",")]
    return ", ".join(p for p in parts if p)
