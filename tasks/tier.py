"""Stage `tier`: one row per cluster with size, quality, tier, kind and a recommendation.

Tiers follow the Yokai guide by cluster size (S 100+, A 50-99, B 20-49, C 15-19, D < 15; the
thresholds are parameters). A cluster of poor quality moves down one tier: low mean
sharpness, low mean alpha coverage, or many near-duplicate layers. `kind` (human / creature /
unknown, the guide's human / yokai) comes from a zero-shot prompt pair when the embedder has
a text tower (CLIP, SigLIP); otherwise it is `unknown`. `recommended` = tier in
`recommended_tiers`. `tier/manifest.parquet` is also written as `tier/clusters.parquet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.embed import EmbedParams, read_embeddings
from tasks.run.spec import GlobalStage
from tasks.run.stage import StageResult, finished, run_global_stage
from tasks.run.store import RunStore, write_table

STAGE = "tier"
VERSION = 1
TIERS: tuple[str, ...] = ("S", "A", "B", "C", "D")
Tier = Literal["S", "A", "B", "C", "D"]
UNKNOWN = "unknown"
CLUSTERS = "clusters.parquet"

SCHEMA = pa.schema([
    ("cluster_id", pa.int32()),
    ("size", pa.int64()),
    ("mean_sharpness", pa.float32()),
    ("mean_alpha_coverage", pa.float32()),
    ("duplicate_ratio", pa.float32()),
    ("mean_layer_area", pa.float32()),      # mean area_frac: layer pixels / frame pixels
    ("tier", pa.string()),
    ("kind", pa.string()),
    ("recommended", pa.bool_()),
    ("sample_paths", pa.list_(pa.string())),
])


class TierParams(BaseModel):
    """Tier size thresholds, quality demotion, kind prompts and what is recommended."""

    model_config = ConfigDict(extra="forbid")

    min_size_s: int = Field(100, ge=1, description="layers for tier S")
    min_size_a: int = Field(50, ge=1, description="layers for tier A")
    min_size_b: int = Field(20, ge=1, description="layers for tier B")
    min_size_c: int = Field(15, ge=1, description="layers for tier C (fewer: D)")
    min_sharpness: float = Field(15.0, ge=0, description="mean Laplacian variance below this demotes one tier")
    min_alpha_coverage: float = Field(0.15, ge=0, le=1, description="mean opaque fraction of the layers below this demotes one tier")
    max_duplicate_ratio: float = Field(0.9, ge=0, le=1, description="share of near-duplicate layers above this demotes one tier")
    duplicate_distance: int = Field(4, ge=0, le=64, description="perceptual-hash bits that may differ between duplicates")
    recommended_tiers: list[Tier] = Field(["S", "A", "B"], description="tiers marked recommended")
    kind_prompts: dict[str, list[str]] = Field(
        {"human": ["an anime drawing of a human character", "a cartoon person"],
         "creature": ["an anime drawing of a creature or monster", "a cartoon yokai spirit or robot"]},
        description="zero-shot prompts per kind (CLIP-type embedders only)")
    kind_margin: float = Field(0.005, ge=0, description="best kind must beat the next by this cosine margin, else unknown")
    samples: int = Field(8, ge=1, le=64, description="sample layer paths kept per cluster (contact sheets)")

    @model_validator(mode="after")
    def _ordered(self) -> "TierParams":
        sizes = [self.min_size_s, self.min_size_a, self.min_size_b, self.min_size_c]
        if sizes != sorted(sizes, reverse=True):
            raise ValueError(f"tier sizes must not increase from S to C, got S={sizes[0]} A={sizes[1]} "
                             f"B={sizes[2]} C={sizes[3]}")
        if len(self.kind_prompts) < 2 or any(not p for p in self.kind_prompts.values()):
            raise ValueError(f"kind_prompts needs at least two kinds with prompts, got {self.kind_prompts}")
        if UNKNOWN in self.kind_prompts:
            raise ValueError(f"kind_prompts cannot define the kind {UNKNOWN!r} (it means: no decision)")
        return self


# ---- rules --------------------------------------------------------------------------------------

def size_tier(size: int, params: TierParams) -> str:
    """The guide's tier for a cluster of `size` layers."""
    for tier, minimum in zip(TIERS, (params.min_size_s, params.min_size_a, params.min_size_b, params.min_size_c)):
        if size >= minimum:
            return tier
    return "D"


def quality_issues(stats: dict[str, float], params: TierParams) -> list[str]:
    """Why a cluster's quality is poor (empty when it is fine)."""
    issues = []
    if stats["mean_sharpness"] < params.min_sharpness:
        issues.append(f"blurry (mean sharpness {stats['mean_sharpness']:.1f} < {params.min_sharpness:g})")
    if stats["mean_alpha_coverage"] < params.min_alpha_coverage:
        issues.append(f"thin layers (mean alpha coverage {stats['mean_alpha_coverage']:.2f} < {params.min_alpha_coverage:g})")
    if stats["duplicate_ratio"] > params.max_duplicate_ratio:
        issues.append(f"repetitive (duplicate ratio {stats['duplicate_ratio']:.2f} > {params.max_duplicate_ratio:g})")
    return issues


def assign_tier(size: int, stats: dict[str, float], params: TierParams) -> str:
    """Size tier, moved down one tier when quality is poor (D stays D)."""
    tier = size_tier(size, params)
    if quality_issues(stats, params):
        tier = TIERS[min(TIERS.index(tier) + 1, len(TIERS) - 1)]
    return tier


def duplicate_ratio(hashes: list[str], distance: int) -> float:
    """Share of layers whose perceptual hash is within `distance` bits of an earlier layer's."""
    if len(hashes) < 2:
        return 0.0
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    kept: list[int] = []
    duplicates = 0
    for i, value in enumerate(values):
        if kept and np.bitwise_count(np.bitwise_xor(values[kept], value)).min() <= distance:
            duplicates += 1
        else:
            kept.append(i)
    return duplicates / len(values)


def classify_kinds(centroids: np.ndarray, text_embedder: Any, params: TierParams) -> list[str]:
    """Zero-shot kind per cluster centroid from the prompt sets (mean prompt vector per kind)."""
    if text_embedder is None or len(centroids) == 0:
        return [UNKNOWN] * len(centroids)
    kinds = list(params.kind_prompts)
    vectors = []
    for kind in kinds:
        v = text_embedder.embed_text(params.kind_prompts[kind]).mean(0)
        vectors.append(v / max(float(np.linalg.norm(v)), 1e-12))
    sims = centroids @ np.stack(vectors).T
    order = np.argsort(-sims, axis=1)
    out = []
    for row, rank in zip(sims, order):
        margin = row[rank[0]] - row[rank[1]]
        out.append(kinds[rank[0]] if margin >= params.kind_margin else UNKNOWN)
    return out


# ---- the stage ------------------------------------------------------------------------------------

def tier_clusters(clusters: pa.Table, embeds: pa.Table, layers: pa.Table, params: TierParams,
                  text_embedder: Any = None) -> tuple[pa.Table, dict]:
    """One row per cluster (noise excluded) with size, quality measures, tier, kind, recommendation.

    Args:
        clusters: cluster manifest (item_id, cluster_id, probability, path).
        embeds: embed manifest (item_id, embedding, sharpness, phash).
        layers: segment manifest (item_id, alpha_coverage, area_frac).
        params: tier parameters.
        text_embedder: an embedder with `embed_text` (CLIP-type) for `kind`, or None.
    Returns:
        (table with SCHEMA sorted by cluster_id, summary).
    """
    members = clusters.filter(pc.not_equal(clusters.column("cluster_id"), -1)).to_pylist()
    emb_rows = embeds.filter(pc.equal(embeds.column("kept"), True))
    emb_index = {item: i for i, item in enumerate(emb_rows.column("item_id").to_pylist())}
    vectors = read_embeddings(emb_rows)
    sharp = emb_rows.column("sharpness").to_pylist()
    phash = emb_rows.column("phash").to_pylist()
    seg = {r["item_id"]: r for r in layers.select(["item_id", "alpha_coverage", "area_frac"]).to_pylist()}
    by_cluster: dict[int, list[dict]] = {}
    for row in members:
        by_cluster.setdefault(row["cluster_id"], []).append(row)
    ids = sorted(by_cluster)
    centroids = []
    rows = []
    for cid in ids:
        rows_c = sorted(by_cluster[cid], key=lambda r: r["item_id"])
        idx = [emb_index[r["item_id"]] for r in rows_c]
        centroid = vectors[idx].mean(0)
        centroids.append(centroid / max(float(np.linalg.norm(centroid)), 1e-12))
        stats = {
            "mean_sharpness": float(np.mean([sharp[i] or 0.0 for i in idx])),
            "mean_alpha_coverage": float(np.mean([seg.get(r["item_id"], {}).get("alpha_coverage") or 0.0 for r in rows_c])),
            "duplicate_ratio": duplicate_ratio([phash[i] for i in idx if phash[i]], params.duplicate_distance),
            "mean_layer_area": float(np.mean([seg.get(r["item_id"], {}).get("area_frac") or 0.0 for r in rows_c])),
        }
        best = sorted(rows_c, key=lambda r: (-(r["probability"] or 0.0), r["item_id"]))
        picks = [best[round(j)] for j in np.linspace(0, len(best) - 1, min(params.samples, len(best)))]
        tier = assign_tier(len(rows_c), stats, params)
        rows.append({"cluster_id": cid, "size": len(rows_c), **stats, "tier": tier, "kind": UNKNOWN,
                     "recommended": tier in params.recommended_tiers,
                     "sample_paths": [r["path"] for r in picks]})
    kinds = classify_kinds(np.stack(centroids) if centroids else np.zeros((0, 1)), text_embedder, params)
    for row, kind in zip(rows, kinds):
        row["kind"] = kind
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    summary = {
        "clusters": len(rows),
        "kept": int(sum(r["size"] for r in rows)),
        "by_tier": {t: sum(r["tier"] == t for r in rows) for t in TIERS},
        "by_kind": {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})},
        "recommended": sum(r["recommended"] for r in rows),
        "demoted": sum(r["tier"] != size_tier(r["size"], params) for r in rows),
        "kind_from": getattr(text_embedder, "name", None) or "none (no text tower: unknown)",
    }
    return table, summary


def text_embedder_for(embeds: pa.Table, embed_params: EmbedParams | None) -> Any:
    """The embedder that made `embeds` when it can embed text (CLIP / SigLIP), else None.

    The embedder comes from the manifest's `embedder` column; `embed_params` only give the
    device and batch size.
    """
    from models.embedders import TEXT_FAMILIES, load_embedder, parse_spec

    names = set(embeds.filter(pc.equal(embeds.column("kept"), True)).column("embedder").to_pylist())
    if len(names) != 1:
        return None
    spec = names.pop()
    if parse_spec(spec)[0] not in TEXT_FAMILIES:
        return None
    return load_embedder(spec, **(embed_params.options() if embed_params else {}))


def run_tier(store: RunStore, params: TierParams, embed_params: EmbedParams | None = None,
             upstream: dict[str, StageResult] | None = None) -> StageResult:
    """The stage as one plain call: read cluster, embed and segment manifests, tier, commit."""
    upstream = upstream or {s: finished(store, s) for s in ("cluster", "embed", "segment")}

    def build(folder: Path) -> tuple[pa.Table, dict, list[str]]:
        embeds = store.read_manifest(upstream["embed"].stage)
        table, summary = tier_clusters(store.read_manifest(upstream["cluster"].stage), embeds,
                                       store.read_manifest(upstream["segment"].stage),
                                       params, text_embedder_for(embeds, embed_params))
        write_table(table, folder / CLUSTERS)
        return table, summary, [f"{STAGE}/{CLUSTERS}"]

    return run_global_stage(store, STAGE, VERSION, params, upstream, build)


TIER = GlobalStage(
    name=STAGE, version=VERSION, params=TierParams, inputs=("cluster", "embed", "segment"), title="tiers",
    build=lambda store, params, inputs: run_tier(store, params.tier, params.embed, inputs),
    rows=lambda store, result: store.read_manifest(STAGE).drop_columns(["sample_paths"]).to_pylist(),
)
"""The tier stage: every cluster graded S..D (and by kind)."""
