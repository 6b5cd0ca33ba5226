"""Stage `tier`: one row per cluster with size, quality, tier, kind, purity and a recommendation.

Hygiene first: each cluster's members are scored by their cosine distance to the cluster's
medoid; a member further than `outlier_mads` robust deviations (median + MAD) is trimmed to
noise (a layer cut from a glued one already beyond `cut_outlier_mads`; an uncut layer that
moves like a character, score >= `moving_score`, only beyond `moving_outlier_mads`), and a
member whose segment `character_score` is below `min_character_score` is not character
material. So is a still, faceless member that recurs at the same place, looking the same, in at
least `recurrence_shots` shots of the whole run (any episode; `recurs_in`): set scenery (a sun, a
sign, the window of a recurring room) loses RECURRENCE_PENALTY of its score. The run-wide test
reads the `shot_id` and `look` segment keeps per layer and compares each layer only with the
layers whose boxes could overlap it, so adding an episode costs its own layers, not a rerun of
segment. `kind` is `character` when at least `character_share` of the members are character
material (one without a motion cue, from a shot of one sampled frame, counts half), `scenery`
when at most `scenery_share` are, else `mixed`; only character clusters are recommended.
`evidence` is the share of the members that are character material (one without a motion or
face cue counts half; trimmed ones count 0), over all members: the scenery a cluster holds, used
or not, tells how far its appearance is a character's. `purity` estimates the share of true
character layers among those `select` will take from it: 0 at `purity_floor` evidence or below,
rising linearly to 1 at `character_share` (issue 22: the mean character score of the used layers
it was before ignored the cluster's scenery and trimmed members: mean absolute error 0.27, bias
+0.13 on the test footage; benchmarks/purity.py compares the two with the footage truth).
`tier/members.parquet` holds the per-layer verdicts (typicality, outlier, used) that `select` and
the report read.

Tiers follow the Yokai guide by cluster size (S 100+, A 50-99, B 20-49, C 15-19, D < 15; the
thresholds are parameters). A cluster of poor quality moves down one tier: low mean
sharpness, low mean alpha coverage, or many near-duplicate layers. `kind` (human / creature /
unknown, the guide's human / yokai) comes from a zero-shot prompt pair when the embedder has
a text tower (CLIP, SigLIP); otherwise it is `unknown`. `recommended` = tier in
`recommended_tiers` and kind `character`. `tier/manifest.parquet` is also written as
`tier/clusters.parquet`. The zero-shot human / creature result is kept as `sub_kind`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.embed import EmbedParams, read_embeddings
from tasks.groups import face_signature, medoid, same_faces, second_group
from tasks.run.spec import GlobalStage, Inputs
from tasks.run.store import RunStore, write_table

STAGE = "tier"
VERSION = 7  # 7: a cluster's second group is kept when it shows the same face as the first; 6: recurring set scenery judged over the whole run (was: inside one segment shard); 5: purity from the evidence over all members (issue 22); 4: faces as evidence of kind
MOVING = 0.15
"""Share of a layer's pixels moving against its shot at which the report counts it as moving."""
RECURRENCE_PENALTY = 0.5
"""Character score taken off a still layer that recurs at the same place across shots."""
TIERS: tuple[str, ...] = ("S", "A", "B", "C", "D")
Tier = Literal["S", "A", "B", "C", "D"]
UNKNOWN = "unknown"
CLUSTERS = "clusters.parquet"
MEMBERS = "members.parquet"
KINDS: tuple[str, ...] = ("character", "scenery", "mixed")
EMBED_OPTIONS: tuple[str, ...] = ("device", "batch_size", "input_size", "mean", "std", "background")
"""The embed parameters the text embedder is loaded with (`EmbedParams.options`): what tier reads of them."""

SCHEMA = pa.schema([
    ("cluster_id", pa.int32()),
    ("size", pa.int64()),
    ("mean_sharpness", pa.float32()),
    ("mean_alpha_coverage", pa.float32()),
    ("duplicate_ratio", pa.float32()),
    ("mean_layer_area", pa.float32()),      # mean area_frac: layer pixels / frame pixels
    ("tier", pa.string()),
    ("kind", pa.string()),                  # character / scenery / mixed
    ("sub_kind", pa.string()),              # human / creature / unknown (zero-shot, CLIP-type embedders)
    ("evidence", pa.float32()),             # character evidence over all members (trimmed: 0, no cue: 1/2)
    ("purity", pa.float32()),               # estimated share of true character layers among the used ones
    ("used", pa.int64()),                   # layers select may take (not trimmed, character material)
    ("trimmed", pa.int64()),                # outliers trimmed to noise
    ("faces", pa.int64()),                  # members that hold an anime face (segment `faces`)
    ("moving", pa.int64()),                 # members that move against their shot (segment `motion`)
    ("cut_by_frame", pa.int64()),           # members that touch the frame's edge (segment `cut_edges`)
    ("glue_trimmed", pa.int64()),           # members whose glued static parts were trimmed (`kept_share` < 1)
    ("recurring", pa.int64()),              # members that recur at the same place in recurrence_shots shots (set scenery)
    ("recommended", pa.bool_()),
    ("sample_paths", pa.list_(pa.string())),
    ("atypical_ids", pa.list_(pa.string())),    # least typical used layers first (for review)
    ("atypical_paths", pa.list_(pa.string())),
])
MEMBER_SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("cluster_id", pa.int32()),
    ("distance", pa.float32()),             # cosine distance to the cluster medoid
    ("typicality", pa.float32()),           # robust z of that distance (high: atypical)
    ("character_score", pa.float32()),      # segment's, less RECURRENCE_PENALTY when it recurs as set scenery
    ("recurs_in", pa.int32()),              # shots of the run where it lies at the same place, looking the same
    ("outlier", pa.bool_()),
    ("used", pa.bool_()),                   # select may take it
    ("path", pa.string()),
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
    min_character_score: float = Field(0.5, ge=0, le=1, description="layers whose segment character_score is below "
                                       "this are not character material (scenery, glued or ghost parts)")
    character_share: float = Field(0.7, gt=0, le=1, description="a cluster is kind 'character' when at least this "
                                   "share of its members are character material")
    face_share: float = Field(0.3, gt=0, le=1, description="a cluster is kind 'character' when at least this share "
                              "of its members hold an anime face, whatever their motion")
    scenery_share: float = Field(0.3, ge=0, lt=1, description="a cluster is kind 'scenery' when at most this share "
                                 "of its members are character material (between the two: 'mixed')")
    purity_floor: float = Field(0.6, ge=0, lt=1, description="a cluster whose character evidence (share of its "
                                "members that are character material, one without a cue counting half, a trimmed "
                                "one 0) is at most this has purity 0; it rises linearly to 1 at character_share. "
                                "Tuned on the sample, 2 generated and 2 anime episodes (benchmarks/purity.py)")
    outlier_mads: float = Field(4.5, gt=0, description="members further from the medoid than the median distance plus "
                                "this many robust deviations (1.4826 MAD) are trimmed to noise")
    cut_outlier_mads: float = Field(2.5, gt=0, description="the same, stricter, for layers cut from a glued layer "
                                    "(segment split_from): a cut that does not look like its cluster is usually scenery")
    moving_score: float = Field(0.8, ge=0, le=1, description="uncut layers whose character_score is at least this (they "
                                "move against their shot as a character does) are trimmed only beyond moving_outlier_mads")
    moving_outlier_mads: float = Field(12.0, gt=0, description="the outlier distance, in robust deviations, for layers that "
                                       "move like a character: in a small, tight cluster the MAD is tiny, and the same "
                                       "character in another pose or with a bit of scenery lies 5-10 deviations out")
    split_silhouette: float = Field(0.6, ge=-1, le=1, description="a cluster whose members form two groups with a mean "
                                    "silhouette of at least this has the group away from the medoid trimmed to noise "
                                    "(cluster.split_silhouette makes it a cluster of its own instead)")
    min_group: int = Field(3, ge=2, description="the smaller of two groups needs at least this many members to split")
    recurrence_shots: int = Field(3, ge=0, description="a layer that does not move, holds no face and lies at the same "
                                  "place, looking the same, in at least this many shots of the run is set scenery "
                                  "(0: off)")

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
        if self.purity_floor >= self.character_share:
            raise ValueError(f"purity_floor must be < character_share, got {self.purity_floor} >= {self.character_share}")
        if self.scenery_share >= self.character_share:
            raise ValueError(f"scenery_share must be < character_share, got {self.scenery_share} >= {self.character_share}")
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
    kept = np.empty_like(values)  # the hashes kept so far, in their first kept.size slots
    count = duplicates = 0
    for value in values:
        if count and np.bitwise_count(np.bitwise_xor(kept[:count], value)).min() <= distance:
            duplicates += 1
        else:
            kept[count] = value
            count += 1
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


def typicality(x: np.ndarray, outlier_mads: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per member of one cluster (rows of L2-normalised `x`): (cosine distance to the medoid,
    robust z of that distance, outlier flag)."""
    if len(x) < 3:
        zeros = np.zeros(len(x), np.float32)
        return zeros, zeros, np.zeros(len(x), bool)
    dist = np.clip(1.0 - x @ x[medoid(x)], 0.0, 2.0).astype(np.float32)
    centre = float(np.median(dist))
    spread = max(1.4826 * float(np.median(np.abs(dist - centre))), 1e-3)
    z = ((dist - centre) / spread).astype(np.float32)
    return dist, z, z > outlier_mads


def cluster_kind(character_scores: list[float], params: TierParams, cues: list[bool] | None = None,
                 faces: list[bool] | None = None) -> str:
    """character / scenery / mixed from the share of members that are character material.

    `cues`: per member, whether its score rests on a cue (motion, or a face). Character material
    without one (a shot of one sampled frame: nothing showed it moving) counts half towards
    `character`, so a small cluster whose character evidence is mostly unseen layers is `mixed`.
    `faces`: per member, whether it holds an anime face; `face_share` of them make a `character`
    (anime is limited animation: a figure that stands and talks shows its face, not motion).
    """
    if not character_scores:
        return "scenery"
    if faces and float(np.mean(faces)) >= params.face_share:
        return "character"
    if character_evidence(character_scores, params, cues) >= params.character_share:
        return "character"
    material = [s >= params.min_character_score for s in character_scores]
    return "scenery" if float(np.mean(material)) <= params.scenery_share else "mixed"


def character_evidence(character_scores: list[float], params: TierParams, cues: list[bool] | None = None,
                       trimmed: list[bool] | None = None) -> float:
    """Mean over members: 1 for character material with a cue (`cues`, default all), 1/2 without one,
    0 for a member that is not character material or is `trimmed` (default none). 0 for no members."""
    if not character_scores:
        return 0.0
    cues = [True] * len(character_scores) if cues is None else cues
    trimmed = [False] * len(character_scores) if trimmed is None else trimmed
    return float(np.mean([0.0 if t or s < params.min_character_score else (1.0 if c else 0.5)
                          for s, c, t in zip(character_scores, cues, trimmed)]))


def estimate_purity(evidence: float, params: TierParams) -> float:
    """A cluster's estimated share of true character layers among its used ones, from its `evidence` over
    all members (`character_evidence` with the trimmed ones): 0 at `purity_floor` or below, 1 at
    `character_share` or above, linear between.

    On the test footage (benchmarks/purity.py) a cluster whose members are partly scenery or were
    trimmed was scenery, a fragment or a second character even where its used layers moved like a
    character: their own scores cannot tell, the company they keep does.
    """
    return float(np.clip((evidence - params.purity_floor) / (params.character_share - params.purity_floor), 0.0, 1.0))


# ---- the stage ------------------------------------------------------------------------------------

class _Evidence:
    """What the tier stage reads per layer: embeddings (by item id), sharpness, hashes, segment rows."""

    def __init__(self, embeds: pa.Table, layers: pa.Table, recurrence_shots: int = 0) -> None:
        rows = embeds.filter(pc.equal(embeds.column("kept"), True))
        self.index = {item: i for i, item in enumerate(rows.column("item_id").to_pylist())}
        self.vectors = read_embeddings(rows)
        self.sharpness = rows.column("sharpness").to_pylist()
        self.phash = rows.column("phash").to_pylist()
        fields = [f for f in ("item_id", "alpha_coverage", "area_frac", "character_score", "split_from", "motion",
                              "faces", "face_colours", "cut_edges", "kept_share") if f in layers.column_names]
        self.segment = {r["item_id"]: r for r in layers.select(fields).to_pylist()}
        self.recurs = recurrence(layers) if recurrence_shots else {}
        self.recurrence_shots = recurrence_shots

    def seg(self, item_id: str, field: str, default: Any = None) -> Any:
        """A layer's segment value (default when the layer or the column is missing)."""
        return self.segment.get(item_id, {}).get(field, default)

    def set_scenery(self, item_id: str) -> bool:
        """A still, faceless layer that recurs in `recurrence_shots` shots of the run: part of the set."""
        return bool(self.recurrence_shots) and self.recurs.get(item_id, 1) >= self.recurrence_shots \
            and not self.seg(item_id, "faces") and (self.seg(item_id, "motion") or 0.0) < MOVING

    def score(self, item_id: str) -> float:
        """A layer's character score: segment's (1 when unscored), less RECURRENCE_PENALTY for set scenery."""
        score = self.seg(item_id, "character_score")
        score = 1.0 if score is None else float(score)
        return max(0.0, score - RECURRENCE_PENALTY) if self.set_scenery(item_id) else score


def recurrence(layers: pa.Table) -> dict[str, int]:
    """Per kept layer with a shot and a look: in how many shots of the whole run it lies at the same
    place, looking the same (tasks/characterness.recurring_shots)."""
    from tasks.characterness import recurring_shots

    if "look" not in layers.column_names:
        return {}  # a segment manifest from before looks were kept
    known = pc.and_(pc.and_(pc.equal(layers.column("kept"), True), pc.is_valid(layers.column("look"))),
                    pc.is_valid(layers.column("shot_id")))
    rows = layers.filter(pc.fill_null(known, False))
    if not rows.num_rows:
        return {}
    size = np.stack([rows.column("width").to_numpy(), rows.column("height").to_numpy()], 1).astype(np.float64)
    boxes = np.array(rows.column("bbox").to_pylist(), np.float64) / np.tile(size, 2)
    looks = pc.list_flatten(rows.column("look")).to_numpy().reshape(rows.num_rows, -1)
    shots = list(zip(rows.column("episode").to_pylist(), rows.column("shot_id").to_pylist()))
    return dict(zip(rows.column("item_id").to_pylist(), recurring_shots(shots, boxes, looks).tolist()))


def _outliers(x: np.ndarray, scores: list[float], cut: np.ndarray, params: TierParams,
              faces: list[str | None] | None = None) -> tuple[np.ndarray, ...]:
    """(distance to the medoid, robust z, outlier flag) per member: stricter for cut layers, looser for
    moving ones, and the group away from the medoid when the members form two, unless both groups show
    one face (`faces`: segment's `face_colours` per member; tasks/groups.same_faces): one character as a
    bust close-up and at full length."""
    dist, z, outlier = typicality(x, params.outlier_mads)
    moving = ~cut & (np.array(scores) >= params.moving_score)
    outlier &= ~moving | (z > params.moving_outlier_mads)
    outlier |= cut & (z > params.cut_outlier_mads)
    away = second_group(x, params.min_group, params.split_silhouette)
    if away.any() and faces is not None and same_faces(
            face_signature([f for f, a in zip(faces, away) if a]), face_signature([f for f, a in zip(faces, away) if not a])):
        away[:] = False
    return dist, z, outlier | away


def tier_cluster(cid: int, rows_c: list[dict], ev: _Evidence, params: TierParams
                 ) -> tuple[dict, list[dict], np.ndarray]:
    """One cluster's tier row (SCHEMA, `sub_kind` unknown), its members' verdicts (MEMBER_SCHEMA) and its
    unit centroid. `rows_c`: its cluster manifest rows in item_id order."""
    items = [r["item_id"] for r in rows_c]
    idx = [ev.index[item] for item in items]
    x = ev.vectors[idx]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centroid = x.mean(0)
    stats = {
        "mean_sharpness": float(np.mean([ev.sharpness[i] or 0.0 for i in idx])),
        "mean_alpha_coverage": float(np.mean([ev.seg(item, "alpha_coverage") or 0.0 for item in items])),
        "duplicate_ratio": duplicate_ratio([ev.phash[i] for i in idx if ev.phash[i]], params.duplicate_distance),
        "mean_layer_area": float(np.mean([ev.seg(item, "area_frac") or 0.0 for item in items])),
    }
    scores = [ev.score(item) for item in items]
    cut = np.array([ev.seg(item, "split_from") is not None for item in items])
    dist, z, outlier = _outliers(x, scores, cut, params, [ev.seg(item, "face_colours") for item in items])
    faces = [bool(ev.seg(item, "faces")) for item in items]
    cues = [ev.seg(item, "motion", 0.0) is not None or f  # unscored layers: no cue needed
            or ev.seg(item, "character_score") is None for item, f in zip(items, faces)]
    kind = cluster_kind([s for s, o in zip(scores, outlier) if not o], params,
                        [c for c, o in zip(cues, outlier) if not o], [f for f, o in zip(faces, outlier) if not o])
    used = [not o and s >= params.min_character_score and kind != "scenery" for s, o in zip(scores, outlier)]
    verdicts = [{"item_id": r["item_id"], "cluster_id": cid, "distance": float(d), "typicality": float(t),
                 "character_score": s, "recurs_in": ev.recurs.get(r["item_id"]), "outlier": bool(o), "used": bool(u),
                 "path": r["path"]}
                for r, d, t, s, o, u in zip(rows_c, dist, z, scores, outlier, used)]
    taken = [s for s, u in zip(scores, used) if u]
    evidence = character_evidence(scores, params, cues, list(outlier))
    atypical = [rows_c[i] for i in sorted((i for i, u in enumerate(used) if u), key=lambda i: -z[i])][:params.samples]
    best = sorted(rows_c, key=lambda r: (-(r["probability"] or 0.0), r["item_id"]))
    picks = [best[round(j)] for j in np.linspace(0, len(best) - 1, min(params.samples, len(best)))]
    tier = assign_tier(len(taken), stats, params)
    row = {"cluster_id": cid, "size": len(rows_c), **stats, "tier": tier, "kind": kind, "sub_kind": UNKNOWN,
           "evidence": evidence, "purity": estimate_purity(evidence, params) if taken else 0.0, "used": len(taken),
           "trimmed": int(outlier.sum()), "faces": int(sum(faces)),
           "cut_by_frame": sum(bool(ev.seg(item, "cut_edges")) for item in items),
           "glue_trimmed": sum((ev.seg(item, "kept_share") or 1.0) < 1.0 for item in items),
           "recurring": sum(ev.set_scenery(item) for item in items),
           "moving": sum((ev.seg(item, "motion") or 0.0) >= MOVING for item in items),
           "recommended": tier in params.recommended_tiers and kind == "character",
           "sample_paths": [r["path"] for r in picks],
           "atypical_ids": [r["item_id"] for r in atypical], "atypical_paths": [r["path"] for r in atypical]}
    return row, verdicts, centroid / max(float(np.linalg.norm(centroid)), 1e-12)


def tier_clusters(clusters: pa.Table, embeds: pa.Table, layers: pa.Table, params: TierParams,
                  text_embedder: Any = None) -> tuple[pa.Table, dict, pa.Table]:
    """One row per cluster (noise excluded) with size, quality, tier, kind, purity, recommendation.

    Args:
        clusters: cluster manifest (item_id, cluster_id, probability, path).
        embeds: embed manifest (item_id, embedding, sharpness, phash).
        layers: segment manifest (item_id, alpha_coverage, area_frac, character_score; a null
            score, from a segmenter run that did not score, counts as character material).
        params: tier parameters.
        text_embedder: an embedder with `embed_text` (CLIP-type) for `sub_kind`, or None.
    Returns:
        (table with SCHEMA sorted by cluster_id, summary, per-layer verdicts with MEMBER_SCHEMA).
    """
    ev = _Evidence(embeds, layers, params.recurrence_shots)
    by_cluster: dict[int, list[dict]] = {}
    for row in clusters.filter(pc.not_equal(clusters.column("cluster_id"), -1)).to_pylist():
        by_cluster.setdefault(row["cluster_id"], []).append(row)
    rows, verdicts, centroids = [], [], []
    for cid in sorted(by_cluster):
        row, mine, centroid = tier_cluster(cid, sorted(by_cluster[cid], key=lambda r: r["item_id"]), ev, params)
        rows.append(row)
        verdicts += mine
        centroids.append(centroid)
    sub_kinds = classify_kinds(np.stack(centroids) if centroids else np.zeros((0, 1)), text_embedder, params)
    for row, sub_kind in zip(rows, sub_kinds):
        row["sub_kind"] = sub_kind
    summary = {
        "clusters": len(rows),
        "kept": int(sum(r["size"] for r in rows)),
        "used": int(sum(r["used"] for r in rows)),
        "trimmed": int(sum(r["trimmed"] for r in rows)),
        "recurring": int(sum(r["recurring"] for r in rows)),
        "by_tier": {t: sum(r["tier"] == t for r in rows) for t in TIERS},
        "by_kind": {k: sum(r["kind"] == k for r in rows) for k in KINDS},
        "by_sub_kind": {k: sum(r["sub_kind"] == k for r in rows) for k in sorted({r["sub_kind"] for r in rows})},
        "recommended": sum(r["recommended"] for r in rows),
        "demoted": sum(r["tier"] != size_tier(r["used"], params) for r in rows),
        "kind_from": getattr(text_embedder, "name", None) or "none (no text tower: unknown)",
    }
    return pa.Table.from_pylist(rows, schema=SCHEMA), summary, pa.Table.from_pylist(verdicts, schema=MEMBER_SCHEMA)


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


def build_tier(store: RunStore, params: Any, inputs: Inputs, folder: Path) -> tuple[pa.Table, dict, list[str]]:
    """Read the cluster, embed and segment manifests, tier the clusters (`sub_kind` with the embedder of the
    embed manifest, loaded with the embed stage's options), write `clusters.parquet` and `members.parquet`."""
    embeds = store.read_manifest(inputs["embed"].stage)
    table, summary, verdicts = tier_clusters(store.read_manifest(inputs["cluster"].stage), embeds,
                                             store.read_manifest(inputs["segment"].stage),
                                             params.tier, text_embedder_for(embeds, params.embed))
    write_table(table, folder / CLUSTERS)
    write_table(verdicts, folder / MEMBERS)
    return table, summary, [f"{STAGE}/{CLUSTERS}", f"{STAGE}/{MEMBERS}"]


TIER = GlobalStage(
    name=STAGE, version=VERSION, params=TierParams, inputs=("cluster", "embed", "segment"), title="tiers",
    reads=(STAGE, *(f"embed.{option}" for option in EMBED_OPTIONS)), build=build_tier,
    rows=lambda store, result: store.read_manifest(STAGE).drop_columns(["sample_paths", "atypical_ids", "atypical_paths"]).to_pylist(),
)
"""The tier stage: every cluster graded S..D (and by kind)."""
