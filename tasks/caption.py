"""Stage `caption`: one caption per dataset image, trigger word first.

Each kept image of the augment stage is rendered as it will be packaged (tasks/composite.py)
and described by a captioner (models/captioners.py) with a prompt for the character's kind.
A post-processor then enforces the caption rules of the seeds: the trigger word first,
then what varies (pose, framing, setting, lighting, expression); prompt echoes, repeated
words and configured words (e.g. the identity's fixed features) are removed, the text is
trimmed to `max_words`. A head or upper-body crop (`crop`) is framed "portrait" / "upper body"
right after the trigger, in place of any framing the captioner said.

Work is sharded per character in chunks of `shard_size` images (`<character>-<chunk:04d>`);
a committed shard is never captioned again, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


from tasks.run.progress import StageProgress
from tasks.composite import RenderSpec, read_row_images
from tasks.composite import render as render_image
from tasks.run.spec import Inputs, ShardedStage
from tasks.run.stage import Plan, Shard, StageResult, merge_shards, rows_by_character, rows_digest, run_shard
from tasks.run.store import QUARANTINE, RunStore, fingerprint, safe_name

STAGE = "caption"
VERSION = 4  # 2: template framing from the edges a figure was cut at (portrait, cropped); 3: crops' framing; 4: crumbs dropped

SCHEMA = pa.schema([
    ("item_id", pa.string()),          # the augment row's item id (the image)
    ("source_id", pa.string()),        # the augment row it came from (same image)
    ("group_id", pa.string()),
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("kind", pa.string()),
    ("augmented", pa.bool_()),
    ("path", pa.string()),             # the RGBA layer the caption belongs to
    ("background_path", pa.string()),  # rendered onto this background layer (null: plain colour)
    ("crop", pa.string()),             # full | upper_body | head
    ("prompt", pa.string()),
    ("raw_caption", pa.string()),
    ("caption", pa.string()),
    ("captioner", pa.string()),
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
])

STOPWORDS = frozenset(
    "a an the and or of with in on at to by for from is are its it this that his her their as into".split()
)


class CaptionParams(BaseModel):
    """Which captioner, which prompts, and the caption rules."""

    model_config = ConfigDict(extra="forbid")

    captioner: str = Field("template", description="'template' (offline) or 'blip2:<hf id or local folder>'")
    prompts: dict[str, str] = Field(default_factory=dict,
                                    description="prompt per kind (human/creature/unknown); missing kinds use the captioner's defaults")
    batch_size: int = Field(8, ge=1, le=256, description="images per captioner call")
    max_new_tokens: int = Field(40, ge=1, le=512, description="longest generated caption, tokens")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="auto (bf16/fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    shard_size: int = Field(64, ge=1, description="images per shard (the unit of resume)")
    max_words: int = Field(40, ge=3, le=300, description="captions are trimmed to this many words")
    drop_words: list[str] = Field(default_factory=list, description="words removed from every caption (e.g. fixed features)")

    @field_validator("captioner")
    @classmethod
    def _known(cls, value: str) -> str:
        from models.captioners import CAPTIONERS

        name = value.partition(":")[0]
        if name not in CAPTIONERS:
            raise ValueError(f"unknown captioner '{name}'; known captioners: {', '.join(CAPTIONERS)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        """`captions_from` (a stage name) is now the pipeline's `given_captions` input (tasks/pipelines.py):
        dropped from old configs and run records when it named `ingest` or nothing, refused otherwise."""
        if isinstance(data, dict) and "captions_from" in data:
            data = dict(data)
            if data.pop("captions_from") not in (None, "ingest"):
                raise ValueError("captions_from is no longer a parameter: the pipeline table binds the caption stage's "
                                 "given_captions input (tasks/pipelines.py); remove it")
        return data

    @field_validator("prompts")
    @classmethod
    def _kinds(cls, value: dict[str, str]) -> dict[str, str]:
        from models.captioners import KINDS

        for kind in value:
            if kind not in KINDS:
                raise ValueError(f"prompts: unknown kind '{kind}'; kinds are {', '.join(KINDS)}")
        return value


# ---- caption rules -----------------------------------------------------------------------------

def finish_caption(raw: str, trigger: str, *, prompt: str = "", drop_words: list[str] = (), max_words: int = 40) -> str:
    """Apply the caption rules: `trigger, description` with a clean, short description.

    Removes an echoed prompt, the trigger itself (it goes first), configured words, words
    repeated back to back, repeated phrases and repeated content words; trims to `max_words`.
    """
    text = raw.replace("\n", " ")
    if prompt:
        answer = prompt.rsplit("Answer:", 1)[0]
        text = text.replace(prompt, " ").replace(answer, " ") if answer.strip() else text.replace(prompt, " ")
    text = re.sub(r"^\s*(question|answer)\s*:", " ", text, flags=re.I)
    if trigger:
        text = re.sub(rf"(?<![\w]){re.escape(trigger)}(?![\w])", " ", text, flags=re.I)
    for word in drop_words:
        text = re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", " ", text, flags=re.I)
    phrases, seen_phrases, seen_words, count = [], set(), set(), 0
    for phrase in re.split(r"[,;.!?]+", text):
        words = []
        for word in re.findall(r"[\w'-]+", phrase):
            key = word.lower()
            if words and words[-1].lower() == key:
                continue
            if key not in STOPWORDS and key in seen_words:
                continue
            seen_words.add(key)
            words.append(word)
        while words and words[-1].lower() in STOPWORDS:
            words.pop()
        phrase_text = " ".join(words)
        if not phrase_text or phrase_text.lower() in seen_phrases:
            continue
        if count + len(words) > max_words:
            words = words[:max(0, max_words - count)]
            phrase_text = " ".join(words)
            if phrase_text:
                phrases.append(phrase_text)
            break
        seen_phrases.add(phrase_text.lower())
        phrases.append(phrase_text)
        count += len(words)
    return ", ".join([trigger, *phrases]) if trigger else ", ".join(phrases)


def frame_caption(caption: str, trigger: str, crop: str | None, *, drop_words: list[str] = (),
                  max_words: int = 40) -> str:
    """A crop's caption: its framing ("portrait" for head, "upper body" for upper_body crops) right
    after the trigger, any other framing phrase removed; other captions unchanged."""
    from models.captioners import CROP_FRAMING, FRAMINGS

    word = CROP_FRAMING.get(crop or "full")
    if word is None:
        return caption
    phrases = caption.split(", ")
    if trigger and phrases[:1] == [trigger]:
        phrases = phrases[1:]
    rest = [p for p in phrases if p.strip().lower() not in FRAMINGS]
    return finish_caption(", ".join([word, *rest]), trigger, drop_words=drop_words, max_words=max_words)


def load_captioner(params: CaptionParams):
    """The captioner named by params (the registry in models/captioners.py builds it once per process)."""
    from models.captioners import captioner

    return captioner(params.captioner, device=params.device, dtype=params.dtype,
                     max_new_tokens=params.max_new_tokens, batch_size=params.batch_size)


def prompt_for(kind: str, params: CaptionParams, defaults: dict[str, str]) -> str:
    return params.prompts.get(kind) or defaults.get(kind) or defaults["unknown"]


# ---- one shard ----------------------------------------------------------------------------------

def caption_images(root, rows: list[dict], params: CaptionParams, render: RenderSpec, captioner) -> tuple[pa.Table, dict]:
    """Render and caption a shard's images.

    Args:
        root: the run folder (paths in rows are relative to it).
        rows: augment rows (item_id, character, trigger, kind, path, background_path, ...); a row's
            `given_caption` (from the `given_captions` input) is kept as its caption instead of captioning it.
        params: caption parameters; render: the packaged image canvas.
        captioner: an object with `caption(images, prompts)` and `default_prompts`.
    Returns:
        (manifest rows with SCHEMA, report dict).
    """
    records, images, prompts, pending, given = [], [], [], [], 0
    for row in rows:
        record = {name: row.get(name) for name in SCHEMA.names}
        record.update(source_id=row["item_id"], captioner=captioner.name, kept=True, drop_reason=None)
        try:
            layer, background = read_row_images(root, row)
        except ValueError as exc:
            record.update(kept=False, drop_reason=f"{QUARANTINE}{exc}")
            records.append(record)
            continue
        if row.get("given_caption"):
            record.update(raw_caption=row["given_caption"], caption=row["given_caption"], captioner="given")
            records.append(record)
            given += 1
            continue
        image = Image.fromarray(render_image(layer, background, render), "RGBA")
        record["prompt"] = prompt_for(row.get("kind") or "unknown", params, captioner.default_prompts)
        records.append(record)
        images.append(image)
        prompts.append(record["prompt"])
        pending.append(record)
    with StageProgress(f"caption {rows[0]['character'] if rows else ''}", len(images)) as bar:
        for start in range(0, len(images), params.batch_size):
            chunk = slice(start, start + params.batch_size)
            raws = captioner.caption(images[chunk], prompts[chunk])
            for record, raw in zip(pending[chunk], raws):
                record["raw_caption"] = raw
                caption = finish_caption(raw, record["trigger"], prompt=record["prompt"],
                                         drop_words=params.drop_words, max_words=params.max_words)
                record["caption"] = frame_caption(caption, record["trigger"], record["crop"],
                                                  drop_words=params.drop_words, max_words=params.max_words)
            bar.advance(len(raws))
    report = {"images": len(rows), "captioned": len(pending) + given, "given": given,
              "quarantined": len(rows) - len(pending) - given}
    return pa.Table.from_pylist(records, schema=SCHEMA), report


# ---- plan, shard, merge ---------------------------------------------------------------------------

def shard_settings(params: CaptionParams, render: RenderSpec, given_captions: str | None) -> dict:
    """What decides a shard's captions (batching, shard size and device do not); the stage bound to the
    `given_captions` input under its old name `captions_from`, so committed shards keep their fingerprints."""
    own = params.model_dump(mode="json", exclude={"batch_size", "shard_size", "device"})
    return {"params": {**own, "captions_from": given_captions}, "render": render.model_dump(mode="json")}


def plan_caption(store: RunStore, params: Any, inputs: Inputs) -> Plan:
    """Chunk each character's kept images (of the `augment` input) into shards of `shard_size`; an image
    whose original has a `caption` in the `given_captions` input keeps it."""
    rows = [r for r in store.read_manifest(inputs["augment"].stage).to_pylist() if r["kept"]]
    given_captions = inputs["given_captions"].stage if "given_captions" in inputs else None
    if given_captions:
        source = store.read_manifest(given_captions)
        given = dict(zip(source.column("item_id").to_pylist(), source.column("caption").to_pylist()))
        for row in rows:
            row["given_caption"] = given.get(row["group_id"] or row["item_id"])
    own = params.caption
    settings = shard_settings(own, params.package.render, given_captions)
    shards = []
    for character, mine in rows_by_character(rows).items():
        for n, start in enumerate(range(0, len(mine), own.shard_size)):
            chunk = mine[start:start + own.shard_size]
            fp = fingerprint(STAGE, VERSION, settings, {"rows": rows_digest(chunk)})
            shards.append(Shard(key=f"{safe_name(character)}-{n:04d}", fingerprint=fp, payload=chunk))
    return Plan(shards=shards)


def caption_shard(store: RunStore, shard: Shard, params: Any, plan: Plan) -> StageResult:
    """Caption one shard, unless it is already committed (the model loads only when needed)."""
    return run_shard(store, STAGE, shard.key, shard.fingerprint, lambda out, prefix: caption_images(
        store.root, shard.payload, params.caption, params.package.render, load_captioner(params.caption)))


def merge_caption(store: RunStore, plan: Plan, params: Any) -> StageResult:
    """Merge the shards into `caption/manifest.parquet`."""
    def merge(tables: list[pa.Table], reports: list[dict]) -> tuple[pa.Table, dict, list[str]]:
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        summary = {"shards": len(reports), "kept": sum(r["captioned"] for r in reports),
                   "quarantined": sum(r["quarantined"] for r in reports)}
        return table, summary, []

    return merge_shards(store, STAGE, plan.fingerprint, plan.shard_fingerprints(), merge)


CAPTION = ShardedStage(name=STAGE, version=VERSION, params=CaptionParams, inputs=("augment",),
                       optional=("given_captions",), reads=("caption", "package.render"), tags=("gpu",),
                       title="caption", plan=plan_caption, shard=caption_shard, merge=merge_caption)
"""The caption stage: shards of each character's images, each image captioned as it will be packaged."""
