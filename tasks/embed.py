"""Stage `embed`: one identity vector per character layer, plus the layer's quality measures.

The kept layers of the segment manifest are embedded in shards keyed by episode (in chunks of
`shard_size` layers, `<episode>-<chunk:04d>`); a shard's fingerprint covers the embedder and
its layers, so a run that gains an episode embeds only that episode's layers. Each row also
carries the layer's sharpness (Laplacian variance inside its alpha) and a perceptual hash,
which the tier stage uses for quality and duplicate measures. Unreadable layers are
quarantined. `embed/manifest.parquet`: item_id (the layer), source_id (its frame), embedder,
embedding (fixed-size float32 list), sharpness, phash, kept, drop_reason.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator


from tasks.image_hash import perceptual_hash
from tasks.run.progress import StageProgress
from tasks.run.spec import Inputs, ShardedStage
from tasks.run.stage import Plan, Shard, StageResult, merge_shard_parts, run_shard
from tasks.run.store import QUARANTINE, RunStore, committed_identities, fingerprint, safe_name

STAGE = "embed"
VERSION = 1
LAYER_FIELDS = ("item_id", "source_id", "episode", "path")


def embed_schema(dim: int) -> pa.Schema:
    """The manifest schema for vectors of `dim` values."""
    return pa.schema([
        ("item_id", pa.string()),
        ("source_id", pa.string()),
        ("embedder", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
        ("sharpness", pa.float32()),
        ("phash", pa.string()),
        ("kept", pa.bool_()),
        ("drop_reason", pa.string()),
    ])


class EmbedParams(BaseModel):
    """Which embedder turns layers into identity vectors, and how it runs."""

    model_config = ConfigDict(extra="forbid")

    embedder: str = Field("colour-shape", description="colour-shape (offline, no weights), clip:<id or folder>, "
                                                      "siglip:<...>, dinov2:<...>, onnx:<path to .onnx>")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (transformers and onnx embedders)")
    batch_size: int = Field(32, ge=1, le=4096, description="layers per model call")
    input_size: int = Field(224, ge=8, le=4096, description="square input side for onnx models without a fixed size")
    mean: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="onnx input mean per channel (0-1 scale)")
    std: tuple[float, float, float] = Field((0.5, 0.5, 0.5), description="onnx input std per channel (0-1 scale)")
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB the layers are composited on for models")
    shard_size: int = Field(2000, ge=1, description="layers per shard (a killed run redoes at most one shard)")

    @field_validator("embedder")
    @classmethod
    def _known_embedder(cls, spec: str) -> str:
        from models.embedders import parse_spec

        try:
            parse_spec(spec)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        return spec

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        return device

    @field_validator("background")
    @classmethod
    def _rgb(cls, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= v <= 255 for v in rgb):
            raise ValueError(f"background values must be 0-255, got {rgb}")
        return rgb

    @field_validator("std")
    @classmethod
    def _std_positive(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError(f"std values must be > 0, got {std}")
        return std

    def fingerprint_settings(self) -> dict[str, Any]:
        """The settings in the stage's fingerprint: `params_affecting_output`."""
        return params_affecting_output(self)

    def options(self) -> dict[str, Any]:
        """Keyword options for `models.embedders.load_embedder`."""
        return {"device": self.device, "batch_size": self.batch_size, "input_size": self.input_size,
                "mean": self.mean, "std": self.std, "background": self.background}


def params_affecting_output(params: EmbedParams) -> dict[str, Any]:
    """Everything but device, batch and shard sizes; the embedder's model files by digest."""
    from models.embedders import embedder_identity

    settings = params.model_dump(mode="json", exclude={"device", "batch_size", "shard_size"})
    settings["embedder_identity"] = embedder_identity(params.embedder)
    return settings


# ---- measures of one layer ------------------------------------------------------------------

def layer_sharpness(layer: np.ndarray) -> float:
    """Laplacian variance of the layer's grey values inside its (eroded) alpha."""
    grey = cv2.cvtColor(np.ascontiguousarray(layer[..., :3]), cv2.COLOR_RGB2GRAY).astype(np.float32)
    inside = cv2.erode((layer[..., 3] > 127).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if inside.sum() < 16:
        return 0.0
    return float(cv2.Laplacian(grey, cv2.CV_32F)[inside].var())


def layer_phash(layer: np.ndarray) -> str:
    """64-bit perceptual hash (hex) of the layer composited on white."""
    from models.embedders import layer_on_background

    grey = cv2.cvtColor(layer_on_background(layer), cv2.COLOR_RGB2GRAY)
    return f"{perceptual_hash(grey):016x}"


# ---- one shard --------------------------------------------------------------------------------

def embed_layers(layers: list[dict], run_root: Path, embedder: Any, *, label: str = "embed") -> tuple[pa.Table, dict]:
    """Embed layer files and measure them.

    Args:
        layers: segment rows (item_id, source_id, path) of kept layers.
        run_root: the run folder (paths are relative to it).
        embedder: a models.embedders.Embedder.
        label: progress bar text.
    Returns:
        (rows with `embed_schema(embedder.dim)`, a report of counts).
    """
    from tasks.composite import read_layer

    schema = embed_schema(embedder.dim)
    rows: list[dict] = []
    batch_rows: list[dict] = []
    batch_layers: list[np.ndarray] = []
    step = max(getattr(embedder, "batch_size", 32), 1)

    def flush() -> None:
        if batch_layers:
            vectors = embedder.embed(batch_layers)
            for row, vector in zip(batch_rows, vectors):
                row["embedding"] = vector.tolist()
            batch_rows.clear()
            batch_layers.clear()

    with StageProgress(label, len(layers)) as bar:
        for layer_row in layers:
            row = {"item_id": layer_row["item_id"], "source_id": layer_row["source_id"], "embedder": embedder.name,
                   "embedding": None, "sharpness": None, "phash": None, "kept": True, "drop_reason": None}
            rows.append(row)
            try:
                layer = read_layer(run_root / layer_row["path"])
            except (ValueError, TypeError) as exc:
                row.update(kept=False, drop_reason=f"{QUARANTINE}{layer_row['path']}: {exc}")
                bar.advance()
                continue
            row.update(sharpness=layer_sharpness(layer), phash=layer_phash(layer))
            batch_rows.append(row)
            batch_layers.append(layer)
            if len(batch_layers) >= step:
                flush()
            bar.advance()
        flush()
    report = {"layers": len(rows), "kept": sum(r["kept"] for r in rows),
              "quarantined": sum(not r["kept"] for r in rows), "embedder": embedder.name, "dim": embedder.dim}
    return pa.Table.from_pylist(rows, schema=schema), report


# ---- plan, shard, merge ---------------------------------------------------------------------

def kept_layers(segment: pa.Table) -> pa.Table:
    """The segment rows that are character layers to use (kept, with a file)."""
    kept = segment.filter(pc.and_(pc.equal(segment.column("kept"), True), pc.is_valid(segment.column("path"))))
    return kept.select(list(LAYER_FIELDS)).sort_by([("episode", "ascending"), ("item_id", "ascending")])


def _layer_identity(run_root: Path, rows: list[dict]) -> str:
    """Digest of a shard's layers: ids, paths, file sizes and the fingerprints of the segment shards that
    wrote them (a re-segmented file changes it; copying or archiving the run does not)."""
    h = hashlib.sha256()
    for row, stamp in zip(rows, committed_identities(run_root, [row["path"] for row in rows])):
        h.update(f"{row['item_id']}|{row['path']}|{stamp}\n".encode())
    return h.hexdigest()


def plan_embed(store: RunStore, params: Any, inputs: Inputs) -> Plan:
    """One shard per chunk of an episode's kept layers (of the `segment` input), its payload those layers,
    fingerprinted by the embedder and the layers' files."""
    own = params.embed
    settings = params_affecting_output(own)
    by_episode: dict[str, list[dict]] = {}
    for row in kept_layers(store.read_manifest(inputs["segment"].stage)).to_pylist():
        by_episode.setdefault(row["episode"], []).append(row)
    shards = []
    for episode, rows in by_episode.items():
        for chunk, start in enumerate(range(0, len(rows), own.shard_size)):
            part = rows[start:start + own.shard_size]
            fp = fingerprint(STAGE, VERSION, settings, {"layers": _layer_identity(store.root, part)})
            shards.append(Shard(key=f"{safe_name(episode)}-{chunk:04d}", fingerprint=fp, payload=part))
    return Plan(shards=shards)


def embed_shard(store: RunStore, shard: Shard, params: Any, plan: Plan) -> StageResult:
    """Embed one shard's layers, unless that shard is already committed."""
    from models.embedders import load_embedder

    own = params.embed

    def build(out: Path, prefix: str) -> tuple[pa.Table, dict]:
        embedder = load_embedder(own.embedder, **own.options())
        return embed_layers(shard.payload, store.root, embedder, label=f"embed {shard.key}")

    return run_shard(store, STAGE, shard.key, shard.fingerprint, build)


def count_layers(table: pa.Table) -> dict[str, int]:
    """Per-part counts the merged summary adds up."""
    return {"layers": table.num_rows, "kept": int(pc.sum(table.column("kept")).as_py() or 0) if table.num_rows else 0}


def summarize(totals: dict[str, int], reports: list[dict]) -> dict:
    """The stage summary from its parts' counts and its shards' reports."""
    embedders = sorted({r["embedder"] for r in reports if r.get("layers")})
    return {
        "layers": totals.get("layers", 0),
        "kept": totals.get("kept", 0),
        "quarantined": sum(r.get("quarantined", 0) for r in reports),
        "embedder": embedders[0] if len(embedders) == 1 else embedders,
        "dim": reports[0].get("dim") if reports else None,
        "shards_embedded": len(reports),
    }


def merge_embed(store: RunStore, plan: Plan, params: Any) -> StageResult:
    """Commit the shards' rows as the parts of `embed/manifest.parquet` (an episode added: its part only)."""
    return merge_shard_parts(store, STAGE, plan.fingerprint, plan.shard_fingerprints(), embed_schema(1),
                             summarize, count_layers)


def read_embeddings(table: pa.Table) -> np.ndarray:
    """The `embedding` column as an (n, dim) float32 array (rows must be kept ones)."""
    if table.num_rows == 0:
        return np.zeros((0, 0), np.float32)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


EMBED = ShardedStage(name=STAGE, version=VERSION, params=EmbedParams, inputs=("segment",), title="embed",
                     plan=plan_embed, shard=embed_shard, merge=merge_embed)
"""The embed stage: one shard per chunk of an episode's kept layers."""
