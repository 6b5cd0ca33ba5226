"""Stage `augment`: more images for small characters, every op and its parameters recorded.

A character with between `min_original` and `max_original` layers is brought to
`round(n * multiplier)` images with the Yokai guide's multipliers (5-10 layers: 6-8x,
11-15: 4-5x, 16-20: 3-4x, 21-30: 1.5-2x; `intensity` picks the low end, the middle or the
high end). Each new image is one original layer with a random draw of: horizontal flip (off
for characters listed as asymmetric), rotation, crop 95-100 %, brightness, contrast, hue
shift, an optional slight blur, and sometimes a background swap (the character is later
rendered onto a background layer of the same run instead of the plain colour). The seed's
ranges are the limits; `intensity` scales them (light 0.5, medium 0.75, heavy 1.0).

The draws come from a generator seeded by (seed, character, copy number), are rounded and
stored as JSON in `ops`, and `apply_ops(layer, ops)` reproduces an image from them exactly.
Originals are passed on unchanged (their rows point at the select stage's files); a head or
upper-body crop (`crop`) is an original like a layer, in the group of the layer it was cut from,
so a layer and its crops land on the same side of the validation split. One shard per character: `augment/shards/<character>/images/<original>_augNN.png` (RGBA).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator


from tasks.run.progress import StageProgress
from tasks.composite import background_layers, read_layer, to_uint8
from tasks.run.spec import Inputs, ShardedStage
from tasks.run.stage import Plan, Shard, StageResult, merge_shards, rows_by_character, rows_digest, run_shard
from tasks.run.store import QUARANTINE, RunStore, fingerprint, safe_name

STAGE = "augment"
VERSION = 2  # 2: column `crop`; a crop's group is its layer

MULTIPLIERS: tuple[tuple[int, float, float], ...] = ((10, 6.0, 8.0), (15, 4.0, 5.0), (20, 3.0, 4.0), (30, 1.5, 2.0))
"""(largest layer count of the band, low multiplier, high multiplier); counts above 30 use the last band."""
POSITION = {"light": 0.0, "medium": 0.5, "heavy": 1.0}
STRENGTH = {"light": 0.5, "medium": 0.75, "heavy": 1.0}

SCHEMA = pa.schema([
    ("item_id", pa.string()),          # original: the select item id; new image: <original>:augNN
    ("source_id", pa.string()),        # the select item id of the original layer
    ("group_id", pa.string()),         # the layer a row derives from (keeps splits leak-free)
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("kind", pa.string()),
    ("cluster_id", pa.int64()),
    ("augmented", pa.bool_()),
    ("ops", pa.string()),              # JSON of the exact op parameters ({} for originals)
    ("background_path", pa.string()),  # background layer to render onto (background swap), else null
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("path", pa.string()),             # RGBA layer, run-relative
    ("crop", pa.string()),             # full | upper_body | head (the select row's; full when it has none)
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
])


class AugmentParams(BaseModel):
    """Which characters are augmented, how much, and with which ops."""

    model_config = ConfigDict(extra="forbid")

    min_original: int = Field(5, ge=1, description="characters with fewer layers are not augmented")
    max_original: int = Field(30, ge=1, description="characters with more layers are not augmented")
    intensity: Literal["light", "medium", "heavy"] = Field("medium", description="multiplier position and op strength")
    flip: bool = Field(True, description="allow horizontal flips")
    asymmetric: list[str] = Field(default_factory=list, description="characters never flipped (asymmetric designs)")
    rotation_deg: float = Field(5.0, ge=0, le=45, description="largest rotation, degrees either way")
    brightness: tuple[float, float] = Field((0.8, 1.2), description="brightness factor range")
    contrast: tuple[float, float] = Field((0.9, 1.1), description="contrast factor range")
    hue_deg: float = Field(10.0, ge=0, le=180, description="largest hue shift, degrees either way")
    crop_min: float = Field(0.95, gt=0.5, le=1.0, description="smallest crop, as a share of each side")
    blur_probability: float = Field(0.2, ge=0, le=1, description="chance of a slight Gaussian blur")
    blur_sigma: float = Field(0.8, ge=0, le=5, description="largest blur sigma, pixels")
    background_swap_probability: float = Field(0.3, ge=0, le=1, description="chance of rendering onto a background layer")
    seed: int = Field(0, description="same seed, same images")

    @model_validator(mode="after")
    def _check(self) -> "AugmentParams":
        if self.min_original > self.max_original:
            raise ValueError(f"min_original ({self.min_original}) must be <= max_original ({self.max_original})")
        for name in ("brightness", "contrast"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < low <= high, got {(lo, hi)}")
        return self


# ---- how many ------------------------------------------------------------------------------

def multiplier(n_images: int, intensity: str) -> float:
    """The seed's multiplier for a character with n original images."""
    for top, low, high in MULTIPLIERS:
        if n_images <= top:
            break
    return low + (high - low) * POSITION[intensity]


def target_count(n_images: int, params: AugmentParams) -> int:
    """How many images (originals included) a character has after augmentation."""
    if not params.min_original <= n_images <= params.max_original:
        return n_images
    return max(n_images, round(n_images * multiplier(n_images, params.intensity)))


# ---- which ops -----------------------------------------------------------------------------

def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def draw_ops(params: AugmentParams, character: str, copy: int, backgrounds: list[str]) -> dict[str, Any]:
    """The op parameters of one new image (deterministic in seed, character and copy number)."""
    rng = np.random.default_rng([params.seed, _stable_int(character), copy])
    s = STRENGTH[params.intensity]

    def span(lo: float, hi: float) -> float:  # the range shrunk towards 1.0 by the strength
        return float(rng.uniform(1 - (1 - lo) * s, 1 + (hi - 1) * s))

    can_flip = params.flip and character not in params.asymmetric
    ops = {
        "flip": bool(can_flip and rng.random() < 0.5),
        "rotate": round(float(rng.uniform(-1, 1)) * params.rotation_deg * s, 3),
        "crop": round(float(rng.uniform(1 - (1 - params.crop_min) * s, 1.0)), 4),
        "crop_x": round(float(rng.random()), 4),
        "crop_y": round(float(rng.random()), 4),
        "brightness": round(span(*params.brightness), 4),
        "contrast": round(span(*params.contrast), 4),
        "hue": round(float(rng.uniform(-1, 1)) * params.hue_deg * s, 3),
        "blur": 0.0,
        "background": None,
    }
    if rng.random() < params.blur_probability:
        ops["blur"] = round(float(rng.uniform(0.3, max(0.3, params.blur_sigma * s))), 3)
    if backgrounds and rng.random() < params.background_swap_probability:
        ops["background"] = backgrounds[int(rng.integers(len(backgrounds)))]
    return ops


# ---- applying them -------------------------------------------------------------------------

def apply_ops(layer: np.ndarray, ops: dict[str, Any]) -> np.ndarray:
    """Apply recorded ops to an RGBA uint8 layer; same input and ops, same output."""
    img = layer.astype(np.float32) / 255.0
    img[..., :3] *= img[..., 3:]  # premultiplied: geometry never drags hidden colours in
    if ops.get("flip"):
        img = img[:, ::-1]
    h, w = img.shape[:2]
    if ops.get("rotate"):
        matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), float(ops["rotate"]), 1.0)
        img = cv2.warpAffine(np.ascontiguousarray(img), matrix, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    crop = float(ops.get("crop", 1.0))
    if crop < 1.0:
        cw, ch = max(1, round(w * crop)), max(1, round(h * crop))
        x0, y0 = round((w - cw) * float(ops.get("crop_x", 0.5))), round((h - ch) * float(ops.get("crop_y", 0.5)))
        img = img[y0:y0 + ch, x0:x0 + cw]
    alpha = img[..., 3:]
    rgb = np.where(alpha > 1e-6, img[..., :3] / np.maximum(alpha, 1e-6), 0.0).astype(np.float32)
    rgb = _photometric(rgb, alpha[..., 0] > 0.03, ops)
    img = np.concatenate([rgb * alpha, alpha], axis=2)
    if ops.get("blur"):
        img = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), float(ops["blur"]))
    alpha = img[..., 3:]
    rgb = np.where(alpha > 1e-6, img[..., :3] / np.maximum(alpha, 1e-6), 0.0)
    return to_uint8(np.concatenate([rgb, alpha], axis=2))


def _photometric(rgb: np.ndarray, mask: np.ndarray, ops: dict[str, Any]) -> np.ndarray:
    """Brightness, contrast (about the character's mean) and hue shift, on straight RGB in 0..1."""
    rgb = rgb * float(ops.get("brightness", 1.0))
    contrast = float(ops.get("contrast", 1.0))
    if contrast != 1.0 and mask.any():
        mean = rgb[mask].mean(axis=0)
        rgb = (rgb - mean) * contrast + mean
    rgb = np.clip(rgb, 0.0, 1.0).astype(np.float32)
    if ops.get("hue"):
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # float input: H in degrees 0..360
        hsv[..., 0] = np.mod(hsv[..., 0] + float(ops["hue"]), 360.0)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return rgb


# ---- one character ---------------------------------------------------------------------------

def augment_character(root: Path, rows: list[dict], params: AugmentParams, backgrounds: list[str],
                      out: Path, prefix: str) -> tuple[pa.Table, dict]:
    """Pass a character's originals on and write its new images into `out/images/`.

    Args:
        root: the run folder (paths in rows are relative to it).
        rows: the character's select rows (item_id, character, trigger, kind, cluster_id, path).
        params: augmentation parameters.
        backgrounds: run-relative background layers a swap may use.
        out: folder to write into (a shard's temporary folder); `prefix` is its run-relative path.
    Returns:
        (manifest rows with SCHEMA, report dict).
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    layers: list[tuple[dict, np.ndarray]] = []
    for row in sorted(rows, key=lambda r: r["item_id"]):
        crop = row.get("crop") or "full"
        group = row["item_id"] if crop == "full" else row.get("source_id") or row["item_id"]
        base = {"item_id": row["item_id"], "source_id": row["item_id"], "group_id": group, "crop": crop,
                "character": row["character"], "trigger": row["trigger"], "kind": row.get("kind") or "unknown",
                "cluster_id": row.get("cluster_id"), "augmented": False, "ops": "{}", "background_path": None,
                "path": row["path"], "kept": True, "drop_reason": None, "width": None, "height": None}
        try:
            layer = read_layer(root / row["path"])
        except ValueError as exc:
            base.update(kept=False, drop_reason=f"{QUARANTINE}{row['path']}: {exc}")
            records.append(base)
            continue
        base.update(height=layer.shape[0], width=layer.shape[1])
        records.append(base)
        layers.append((base, layer))
    n = len(layers)
    target = target_count(n, params) if n else 0
    with StageProgress(f"augment {rows[0]['character'] if rows else ''}", target - n) as bar:
        for copy in range(target - n):
            original, layer = layers[copy % n]
            ops = draw_ops(params, original["character"], copy, backgrounds)
            image = apply_ops(layer, ops)
            name = f"{safe_name(original['item_id'], max_len=100)}_aug{copy // n:02d}.png"
            Image.fromarray(image, "RGBA").save(out / "images" / name, compress_level=3)
            records.append({**original, "item_id": f"{original['item_id']}:aug{copy // n:02d}", "augmented": True,
                            "ops": json.dumps(ops, sort_keys=True), "background_path": ops["background"],
                            "path": f"{prefix}/images/{name}", "height": image.shape[0], "width": image.shape[1]})
            bar.advance()
    report = {"character": rows[0]["character"] if rows else "", "originals": n, "images": target,
              "augmented": target - n, "multiplier": round(target / n, 3) if n else 0.0,
              "quarantined": sum(not r["kept"] for r in records)}
    return pa.Table.from_pylist(records, schema=SCHEMA), report


# ---- plan, shard, merge ---------------------------------------------------------------------

def plan_augment(store: RunStore, params: Any, inputs: Inputs) -> Plan:
    """One shard per character of the `images` input (select's kept rows, or ingest's), its payload its
    rows, fingerprinted by them, the parameters and the background layers of the `backgrounds` input."""
    rows = store.read_manifest(inputs["images"].stage).to_pylist()
    if rows and "kept" in rows[0]:
        rows = [r for r in rows if r["kept"]]
    own = params.augment
    swaps = own.background_swap_probability > 0 and "backgrounds" in inputs
    backgrounds = background_layers(store, inputs["backgrounds"].stage) if swaps else []
    settings = own.model_dump(mode="json")
    shards = []
    for character, mine in rows_by_character(rows).items():
        fp = fingerprint(STAGE, VERSION, settings, {"rows": rows_digest(mine), "backgrounds": json.dumps(backgrounds)})
        shards.append(Shard(key=safe_name(character), fingerprint=fp, payload=mine))
    return Plan(shards=shards, payload=backgrounds)


def augment_shard(store: RunStore, shard: Shard, params: Any, plan: Plan) -> StageResult:
    """Augment one character into its shard, unless that shard is already committed."""
    return run_shard(store, STAGE, shard.key, shard.fingerprint, lambda out, prefix: augment_character(
        store.root, shard.payload, params.augment, plan.payload, out, prefix))


def merge_augment(store: RunStore, plan: Plan, params: Any) -> StageResult:
    """Merge the characters' shards into `augment/manifest.parquet`."""
    def merge(tables: list[pa.Table], reports: list[dict]) -> tuple[pa.Table, dict, list[str]]:
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        summary = {
            "characters": len(reports),
            "originals": sum(r["originals"] for r in reports),
            "augmented": sum(r["augmented"] for r in reports),
            "kept": sum(r["images"] for r in reports),
            "quarantined": sum(r["quarantined"] for r in reports),
            "backgrounds": len(plan.payload),
            "multipliers": {r["character"]: r["multiplier"] for r in reports},
        }
        return table, summary, []

    return merge_shards(store, STAGE, plan.fingerprint, plan.shard_fingerprints(), merge)


AUGMENT = ShardedStage(name=STAGE, version=VERSION, params=AugmentParams, inputs=("images",), optional=("backgrounds",),
                       title="augment", plan=plan_augment, shard=augment_shard, merge=merge_augment)
"""The augment stage: one shard per character of the images it is handed (`select` or `ingest`)."""
