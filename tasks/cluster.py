"""Stage `cluster`: group character layers by identity, with ids that survive new episodes.

The kept layers' embeddings are reduced with PCA (`pca_components`) and UMAP (umap-learn) to
`n_components` dimensions and clustered with HDBSCAN (scikit-learn, over the k-nearest-neighbour
graph so that large runs stay near-linear); noise stays `cluster_id = -1`. Clusters whose
centroids (in the embedding space) are closer than `merge_threshold` (cosine distance,
average linkage) are merged, since HDBSCAN often splits one character by pose or shot; a
cluster whose members form two groups is split in two when `split_silhouette` is set
(tasks/groups.py; off by default, the tier stage trims the second group instead). A
second, 2-D UMAP over the same neighbour graph gives the map the report draws.

Ids: clusters are numbered by size; when the stage folder holds the previous result
(`cluster/centroids.parquet`), new clusters are matched to the old ones by centroid cosine
similarity (Hungarian assignment, `scipy.optimize.linear_sum_assignment`), so a cluster the
user named keeps its id; an unmatched cluster gets a never-used id. Everything is
deterministic for a `seed`. (`episode2lora clean NAME --stage cluster` forgets the ids.)

Series scale: above `fit_layers` layers UMAP and HDBSCAN see an even sample and the rest join
the nearest cluster centroid (within `place_slack` x the cluster's radius). When episodes are
added to a clustered run, the earlier layers keep their clusters and only the new layers are
placed. The manifest is stored in parts, one per embed part (episode); the centroid table holds
the radii, the members' embedding sums, where each cluster sits on the map, and the record of the
last full clustering with the embed parts it has seen. The embed parts it has not seen are the new
layers: only they are read and written (a new cluster part), the other parts stay as they are,
so the stage's time follows the new episode, not the run. The run is clustered in full again
when an earlier embed part changed or is gone, when the
share of new layers that fit no cluster drifts above the share at the last fit by
`refit_unplaced`, or when the run has grown by `refit_growth` since then (doubling: total work
stays linear).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.groups import face_signature, same_faces, split_two_groups
from tasks.run.spec import GlobalStage, Inputs
from tasks.run.stage import StageResult
from tasks.run.store import RunStore, write_table

STAGE = "cluster"
VERSION = 4  # 4: clusters whose faces have the same hair and eye colours merge at FACE_MERGE x merge_threshold
NOISE = -1
CENTROIDS = "centroids.parquet"
FIT_KEY = "episode2lora.fit"

SCHEMA = pa.schema([
    ("item_id", pa.string()),        # the layer
    ("source_id", pa.string()),      # the layer's frame
    ("cluster_id", pa.int32()),      # -1: noise
    ("probability", pa.float32()),   # HDBSCAN membership strength
    ("umap_x", pa.float32()),
    ("umap_y", pa.float32()),
    ("path", pa.string()),           # the RGBA layer, run-relative
])


def centroid_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("cluster_id", pa.int32()),
        ("embedder", pa.string()),
        ("size", pa.int64()),
        ("active", pa.bool_()),      # false: a cluster of an earlier run not seen now (its id stays reserved)
        ("centroid", pa.list_(pa.float32(), dim)),
        ("radius", pa.float32()),    # 95th percentile of the members' cosine distance to the centroid
        ("weight", pa.float32()),    # length of the members' embedding sum (centroid x weight = the sum)
    ])


class ClusterParams(BaseModel):
    """UMAP, HDBSCAN, merging and id matching."""

    model_config = ConfigDict(extra="forbid")

    n_components: int = Field(8, ge=2, le=100, description="UMAP dimensions HDBSCAN clusters in")
    n_neighbors: int = Field(15, ge=2, le=500, description="UMAP neighbourhood size (larger: more global structure)")
    pca_components: int = Field(64, ge=0, description="PCA to this many dimensions before UMAP (0: off); "
                                                       "makes the neighbour search of large runs much faster")
    min_dist: float = Field(0.0, ge=0.0, le=1.0, description="UMAP min_dist for the clustering embedding")
    n_epochs: int | None = Field(None, ge=10, description="UMAP optimisation epochs (None: umap's default, "
                                                          "500 below 10k layers, 200 above)")
    map_min_dist: float = Field(0.1, ge=0.0, le=1.0, description="UMAP min_dist for the 2-D map of the report")
    min_cluster_size: int = Field(5, ge=2, description="HDBSCAN: smallest group that counts as a cluster")
    min_samples: int | None = Field(3, ge=1, description="HDBSCAN: neighbours a core point needs (None: min_cluster_size)")
    merge_threshold: float = Field(0.08, ge=0.0, le=2.0,
                                   description="merge clusters whose centroids are within this cosine distance "
                                               "(average linkage; 0 disables; depends on the embedder)")
    split_silhouette: float | None = Field(None, ge=-1, le=1,
                                           description="split a cluster whose members form two groups (2-means by "
                                                       "cosine, each of at least min_cluster_size) with a mean "
                                                       "silhouette of at least this (e.g. 0.6; None: never split, the "
                                                       "tier stage trims the second group instead: on the generated "
                                                       "footage a split cut one character in two by facing)")
    match_threshold: float = Field(0.9, ge=-1.0, le=1.0,
                                   description="a new cluster takes an earlier run's id when their centroids' "
                                               "cosine similarity is at least this")
    seed: int = Field(0, ge=0, description="random seed (UMAP); the result is deterministic for a seed")
    fit_layers: int = Field(20000, ge=0, description="fit UMAP + HDBSCAN on at most this many layers (an even "
                                                     "random sample); the rest join the found clusters by nearest "
                                                     "centroid (0: fit on all layers)")
    place_slack: float = Field(1.5, gt=0, description="a placed layer joins its nearest cluster when its cosine "
                                                      "distance to the centroid is within this multiple of the "
                                                      "cluster's radius, else it is noise")
    incremental: bool = Field(True, description="place the layers of new episodes into the existing clusters "
                                                "instead of clustering the whole run again (until a drift check fails)")
    refit_unplaced: float = Field(0.15, ge=0, le=1, description="cluster in full when the share of new layers "
                                                                "that fit no cluster exceeds the share at the "
                                                                "last full clustering by more than this")
    refit_growth: float = Field(1.0, gt=0, description="cluster in full once the layers placed since the last "
                                                       "full clustering exceed this fraction of it (1: when the "
                                                       "run has doubled; total work stays linear)")


# ---- clustering -------------------------------------------------------------------------------

@dataclass
class Clustering:
    """Per layer: label (-1 noise), probability and 2-D map position."""

    labels: np.ndarray
    probabilities: np.ndarray
    map_xy: np.ndarray
    merged: int = 0
    seconds: dict[str, float] | None = None


def _umap(x: np.ndarray, n_components: int, params: ClusterParams, min_dist: float, *, knn: Any = None,
          n_epochs: int | None = None) -> tuple[np.ndarray, Any]:
    """UMAP embedding of `x`; also returns the neighbour graph of large inputs for reuse (else None)."""
    import umap

    n = len(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap warns that a seed disables parallelism: intended
        reducer = umap.UMAP(n_components=n_components, n_neighbors=min(params.n_neighbors, n - 1),
                            min_dist=min_dist, metric="euclidean", random_state=params.seed, n_epochs=n_epochs,
                            init="spectral" if n > n_components + 2 else "random",
                            precomputed_knn=knn if knn is not None else (None, None, None))
        embedding = reducer.fit_transform(x)
    knn_out = None  # small inputs use exact distances and have no neighbour graph to reuse
    if getattr(reducer, "_knn_indices", None) is not None:
        knn_out = (reducer._knn_indices, reducer._knn_dists, reducer._knn_search_index)
    return np.asarray(embedding, np.float32), knn_out


def _pca(x: np.ndarray, components: int) -> np.ndarray:
    """PCA to `components` dimensions when that is fewer than the embedding has (0: unchanged).

    Through the eigenvectors of the d x d scatter matrix: exact, deterministic, and fast for
    many layers of a few hundred dimensions.
    """
    if not components or x.shape[1] <= components or len(x) <= components:
        return x
    centred = x.astype(np.float64) - x.mean(0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    return (centred @ vectors[:, ::-1][:, :components]).astype(np.float32)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    if len(x) < 2:
        return np.zeros((len(x), 2), np.float32)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:2].T
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out.astype(np.float32)


def hdbscan_on_neighbours(z: np.ndarray, min_cluster_size: int, min_samples: int,
                          neighbours: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """HDBSCAN over the symmetric k-nearest-neighbour graph of `z` (sparse precomputed distances).

    Only neighbour distances enter the minimum spanning tree, so time grows near-linearly
    instead of with n^2. Separate components of the graph are joined by edges longer than any
    other, which only connects them at the root of the cluster tree. Returns (labels, probabilities).
    """
    from scipy.sparse.csgraph import connected_components
    from sklearn.cluster import HDBSCAN
    from sklearn.neighbors import NearestNeighbors

    n = len(z)
    k = min(n - 1, max(neighbours, min_samples + 1))
    graph = NearestNeighbors(n_neighbors=k).fit(z).kneighbors_graph(mode="distance")
    graph.data = graph.data.astype(np.float64) + 1e-9  # keep zero distances (duplicates) as edges
    graph = graph.maximum(graph.T).tolil()
    count, component = connected_components(graph, directed=False)
    if count > 1:
        bridge = float(graph.tocsr().data.max()) * 10.0
        heads = [int(np.flatnonzero(component == c)[0]) for c in range(count)]
        for a, b in zip(heads[:-1], heads[1:]):
            graph[a, b] = graph[b, a] = bridge
    model = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, metric="precomputed", copy=False)
    model.fit(graph.tocsr())
    return model.labels_.astype(np.int64), model.probabilities_.astype(np.float32)


def merge_close_clusters(x: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """Join clusters whose centroids are within `threshold` cosine distance (average linkage).

    Returns (new labels, number of clusters merged away).
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    ids = sorted(set(labels.tolist()) - {NOISE})
    if threshold <= 0 or len(ids) < 2:
        return labels, 0
    means = centroids_of(x, labels)
    centroids = np.stack([means[k] for k in ids])
    groups = fcluster(linkage(centroids, method="average", metric="cosine"), threshold, criterion="distance")
    lookup = {k: int(g) for k, g in zip(ids, groups)}
    merged = np.array([lookup[v] if v != NOISE else NOISE for v in labels.tolist()], dtype=np.int64)
    return merged, len(ids) - len(set(groups.tolist()))


FACE_MERGE = 1.5
"""Clusters whose members mostly hold faces of the same hair and eye colours merge up to this many times
`merge_threshold` apart: one character as a bust close-up and at full length embeds farther apart than
one framing does (anime test footage, colour-shape embedder: 0.10-0.12 between one character's framings,
0.13 between two different characters, 0.16 between one face in two outfits)."""


def merge_same_faces(x: np.ndarray, labels: np.ndarray, faces: list[str | None], threshold: float
                     ) -> tuple[np.ndarray, int]:
    """Join clusters whose faces agree (tasks/groups.same_faces) and whose centroids are
    within `threshold` cosine distance; a cluster without faces is left as it is.

    Returns (new labels, number of clusters merged away)."""
    members: dict[int, list[str | None]] = {}
    for label, face in zip(labels.tolist(), faces):
        if label != NOISE:
            members.setdefault(label, []).append(face)
    signatures = {k: sig for k, v in members.items() if (sig := face_signature(v)) is not None}
    ids = sorted(signatures)
    if threshold <= 0 or len(ids) < 2:
        return labels, 0
    means = centroids_of(x, labels)
    unit = {k: _l2(means[k][None])[0] for k in ids}
    root = {k: k for k in ids}

    def find(k: int) -> int:
        while root[k] != k:
            k = root[k]
        return k

    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            close = 1.0 - float(unit[a] @ unit[b]) <= threshold
            if close and same_faces(signatures[a], signatures[b]):
                root[find(b)] = find(a)
    lookup = {k: find(k) for k in ids}
    merged = np.array([lookup.get(v, v) for v in labels.tolist()], dtype=np.int64)
    return merged, len(ids) - len(set(lookup.values()))


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0.. by size (largest first; ties by first member), noise stays -1."""
    ids, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    order = sorted((k for k in range(len(ids)) if ids[k] != NOISE), key=lambda k: (-sizes[k], first[k]))
    lookup = np.full(len(ids), NOISE, np.int64)
    lookup[order] = np.arange(len(order))
    return lookup[np.searchsorted(ids, labels)] if len(labels) else labels.astype(np.int64)


MAP_EPOCHS = 100
"""At most this many optimisation epochs for the report's 2-D map (a picture, not a result)."""


def cluster_embeddings(x: np.ndarray, params: ClusterParams, faces: list[str | None] | None = None) -> Clustering:
    """PCA -> UMAP -> HDBSCAN -> merge -> numbering by size, plus a 2-D map. Deterministic for `params.seed`.

    Above `params.fit_layers` layers the clustering is fitted on an even random sample of that
    size and the other layers are placed into its clusters (`place_layers`), so time and memory
    grow linearly beyond the sample.

    Args:
        x: (n, d) L2-normalised embeddings.
        params: clustering parameters.
        faces: each layer's face colours (segment's `face_colours`), for `merge_same_faces` (None: not used).
    Returns:
        a Clustering (labels 0.. by size, -1 noise; `seconds` per phase).
    """
    n = len(x)
    if not params.fit_layers or n <= params.fit_layers:
        return _fit(x, params, faces)
    sample = np.sort(np.random.default_rng(params.seed).choice(n, params.fit_layers, replace=False))
    fitted = _fit(x[sample], params, None if faces is None else [faces[i] for i in sample])
    clock = time.perf_counter()
    labels = np.full(n, NOISE, np.int64)
    probabilities = np.zeros(n, np.float32)
    labels[sample], probabilities[sample] = fitted.labels, fitted.probabilities
    rest = np.setdiff1d(np.arange(n), sample)
    centroids = centroids_of(x[sample], fitted.labels)
    radii = cluster_radii(x[sample], fitted.labels, centroids)
    labels[rest], probabilities[rest] = place_layers(x[rest], centroids, radii, params.place_slack)
    map_xy = np.zeros((n, 2), np.float32)
    map_xy[sample] = fitted.map_xy
    map_xy[rest] = map_positions(labels[rest], map_frame(fitted.labels, fitted.map_xy), params.seed)
    seconds = {**(fitted.seconds or {}), "place": round(time.perf_counter() - clock, 3)}
    return Clustering(_by_size(labels), probabilities, map_xy, fitted.merged, seconds)


def _fit(x: np.ndarray, params: ClusterParams, faces: list[str | None] | None = None) -> Clustering:
    """The full clustering of `x` (every layer enters UMAP and HDBSCAN)."""
    n = len(x)
    seconds: dict[str, float] = {}
    if n < max(params.min_cluster_size, 2):
        return Clustering(np.full(n, NOISE, np.int64), np.zeros(n, np.float32), _pca_2d(x), 0, seconds)
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = round(now - clock, 3)
        clock = now

    compact = _pca(x, params.pca_components)
    lap("pca")
    knn, manifold = None, n > params.n_components + 2 and n > 4
    if manifold:
        reduced, knn = _umap(compact, params.n_components, params, params.min_dist, n_epochs=params.n_epochs)
    else:  # too few layers for a manifold: cluster the embeddings themselves
        reduced = compact
    lap("umap")
    min_samples = max(1, min(params.min_samples or params.min_cluster_size, n - 1))
    labels, probabilities = hdbscan_on_neighbours(reduced, params.min_cluster_size, min_samples)
    lap("hdbscan")
    labels, merged = merge_close_clusters(x, labels, params.merge_threshold)
    if faces is not None:
        labels, by_face = merge_same_faces(x, labels, faces, params.merge_threshold * FACE_MERGE)
        merged += by_face
    if params.split_silhouette is not None:  # before ids are matched: a split-off group gets its own stable id
        labels = split_two_groups(x, labels, params.min_cluster_size, params.split_silhouette)[0]
    labels = _by_size(labels)
    lap("merge")
    if manifold:
        map_epochs = min(params.n_epochs or MAP_EPOCHS, MAP_EPOCHS)
        map_xy = _umap(compact, 2, params, params.map_min_dist, knn=knn, n_epochs=map_epochs)[0]
    else:
        map_xy = _pca_2d(x)
    lap("map")
    return Clustering(labels, probabilities, map_xy, merged, seconds)


# ---- placing layers into existing clusters -----------------------------------------------------

def members_of(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Row indices of each label's members, from one sort (not one scan per label)."""
    order = np.argsort(labels, kind="stable")
    ids, starts = np.unique(labels[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(k): order[a:b] for k, a, b in zip(ids, starts, ends)}


def cluster_radii(x: np.ndarray, labels: np.ndarray, centroids: dict[int, np.ndarray]) -> dict[int, float]:
    """Per cluster, the 95th percentile of its members' cosine distance to its centroid."""
    members = members_of(labels)
    empty = np.zeros(0, np.int64)
    return {k: float(np.quantile(1.0 - x[members.get(k, empty)] @ c, 0.95)) if len(members.get(k, empty)) else 0.0
            for k, c in centroids.items()}


def place_layers(x: np.ndarray, centroids: dict[int, np.ndarray], radii: dict[int, float], slack: float,
                 chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Put each layer into its nearest cluster (cosine) when within `slack` x that cluster's radius.

    Time is proportional to len(x) x the number of clusters. Returns (labels with -1 for layers
    that fit no cluster, probabilities: 1 at the centroid falling to 0 at the edge).
    """
    labels = np.full(len(x), NOISE, np.int64)
    probabilities = np.zeros(len(x), np.float32)
    if not centroids or not len(x):
        return labels, probabilities
    ids = np.array(sorted(centroids), np.int64)
    matrix = np.stack([centroids[k] for k in ids]).astype(np.float32)
    reach = slack * np.maximum(np.array([radii[k] for k in ids], np.float32), 1e-3)
    for start in range(0, len(x), chunk):
        sims = x[start:start + chunk] @ matrix.T
        best = sims.argmax(1)
        distance = 1.0 - sims[np.arange(len(best)), best]
        inside = distance <= reach[best]
        labels[start:start + chunk] = np.where(inside, ids[best], NOISE)
        probabilities[start:start + chunk] = np.where(inside, np.clip(1.0 - distance / reach[best], 0.0, 1.0), 0.0)
    return labels, probabilities


def map_frame(labels: np.ndarray, xy: np.ndarray) -> dict:
    """Where each cluster sits on the 2-D map (mean and spread of its members' positions), and the whole
    map's: what `map_positions` scatters placed layers by, small enough to keep with the centroids."""
    if not len(xy):
        return {"clusters": {}, "all": [0.0, 0.0, 1.0, 1.0]}
    ids, which = np.unique(labels, return_inverse=True)  # per-cluster mean and spread in one pass
    count = np.bincount(which)[:, None]
    mean = np.stack([np.bincount(which, xy[:, d]) for d in (0, 1)], 1) / count
    spread = np.sqrt(np.maximum(np.stack([np.bincount(which, xy[:, d] ** 2) for d in (0, 1)], 1) / count - mean ** 2, 0))
    clusters = {str(int(k)): [*map(float, mean[i]), *map(float, spread[i])] for i, k in enumerate(ids) if k != NOISE}
    return {"clusters": clusters, "all": [*map(float, xy.mean(0)), *map(float, xy.std(0))]}


def map_positions(labels: np.ndarray, frame: dict, seed: int) -> np.ndarray:
    """2-D map positions for placed layers: scattered around their cluster's members on the map.

    A picture only (placed layers never enter UMAP): the cluster's mean position plus noise of
    its spread (`map_frame`); noise layers scatter around the whole map's centre.
    """
    rng = np.random.default_rng(seed + len(labels))
    out = np.zeros((len(labels), 2), np.float32)
    for k, mine in members_of(labels).items():
        centre = frame["clusters"].get(str(int(k)), frame["all"]) if k != NOISE else frame["all"]
        out[mine] = np.array(centre[:2]) + rng.normal(size=(len(mine), 2)) * (np.array(centre[2:]) + 1e-3)
    return out


# ---- ids that persist -------------------------------------------------------------------------

def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cluster_sums(x: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Sum of the members' embeddings per cluster id (noise excluded)."""
    from scipy.sparse import csr_matrix

    clustered = np.flatnonzero(labels != NOISE)
    ids, rows = np.unique(labels[clustered], return_inverse=True)
    if not len(ids):
        return {}
    members = csr_matrix((np.ones(len(clustered), np.float32), (rows, clustered)), shape=(len(ids), len(x)))
    return dict(zip(ids.tolist(), np.asarray(members @ x, np.float32)))


def centroids_of(x: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Normalised mean embedding per cluster id (noise excluded): the sum's direction."""
    return {k: _l2(v[None])[0] for k, v in cluster_sums(x, labels).items()}


def match_ids(new: dict[int, np.ndarray], previous: pa.Table | None, embedder: str,
              threshold: float) -> tuple[dict[int, int], int]:
    """Map new cluster labels to stable ids: an earlier run's id where centroids match, else a fresh id.

    Args:
        new: label -> centroid of this run's clusters.
        previous: the earlier `centroids.parquet` (any embedder), or None.
        embedder: this run's embedder; centroids of another embedder are not comparable.
        threshold: minimum cosine similarity for a match.
    Returns:
        (label -> stable id, number of labels that kept an earlier id).
    """
    from scipy.optimize import linear_sum_assignment

    labels = sorted(new)
    old_ids: list[int] = []
    next_id = 0
    mapping: dict[int, int] = {}
    if previous is not None and previous.num_rows:
        next_id = int(pc.max(previous.column("cluster_id")).as_py()) + 1
        same = previous.filter(pc.equal(previous.column("embedder"), embedder))
        dim_ok = same.num_rows and same.schema.field("centroid").type.list_size == (len(next(iter(new.values()))) if new else -1)
        if dim_ok and labels:
            old_ids = same.column("cluster_id").to_pylist()
            old = _l2(np.asarray(same.column("centroid").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                 np.float32).reshape(len(old_ids), -1))
            sim = np.stack([new[k] for k in labels]) @ old.T
            rows, cols = linear_sum_assignment(-sim)
            for r, c in zip(rows, cols):
                if sim[r, c] >= threshold:
                    mapping[labels[r]] = int(old_ids[c])
    matched = len(mapping)
    for k in labels:  # unmatched: fresh ids in size order (labels are numbered by size)
        if k not in mapping:
            mapping[k] = next_id
            next_id += 1
    return mapping, matched


def read_previous_centroids(folder: Path) -> pa.Table | None:
    path = folder / CENTROIDS
    try:
        return pq.read_table(path)
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None


def centroid_table(centroids: dict[int, np.ndarray], sizes: dict[int, int], embedder: str,
                   previous: pa.Table | None, dim: int, radii: dict[int, float] | None = None,
                   fit: dict | None = None, weights: dict[int, float] | None = None) -> pa.Table:
    """This run's centroids (active) plus earlier ones not seen now (inactive, ids kept reserved).

    `fit` (when given) is kept in the table's metadata: what incremental placement needs to know
    about the last full clustering.
    """
    radii, weights = radii or {}, weights or {}
    rows = [{"cluster_id": k, "embedder": embedder, "size": sizes[k], "active": True, "centroid": v.tolist(),
             "radius": radii.get(k), "weight": weights.get(k)} for k, v in sorted(centroids.items())]
    if previous is not None and previous.num_rows and previous.schema.field("centroid").type.list_size == dim:
        for row in previous.to_pylist():
            if row["cluster_id"] not in centroids:
                rows.append({"weight": None, **row, "active": False})
    schema = centroid_schema(dim)
    if fit is not None:
        schema = schema.with_metadata({FIT_KEY: json.dumps(fit, sort_keys=True)})
    return pa.Table.from_pylist(rows, schema=schema)


def _fit_settings(params: ClusterParams) -> dict:
    """What a clustering depends on: the stage's version and its parameters (not the ones deciding when to
    cluster again)."""
    return {"version": VERSION,
            **params.model_dump(mode="json", exclude={"incremental", "refit_unplaced", "refit_growth", "match_threshold"})}


def _previous_fit(previous: pa.Table | None, params: ClusterParams) -> tuple[dict | None, str]:
    """The last full clustering's record when new layers may be placed into it, else (None, why not)."""
    if not params.incremental:
        return None, "incremental placement is off"
    if previous is None:
        return None, "no earlier clustering"
    meta = previous.schema.metadata or {}
    fit = json.loads(meta[FIT_KEY.encode()]) if FIT_KEY.encode() in meta else {}
    if "map" not in fit or "weight" not in previous.schema.names:
        return None, "the earlier clustering has no placement record"
    if fit.get("settings") != _fit_settings(params):
        return None, "the clustering parameters or the stage's version changed"
    return fit, ""


@dataclass
class _Outcome:
    """A clustering of some layers (all of them, or the new ones placed) and the clusters after it."""

    clustering: Clustering
    fit: dict
    centroids: dict[int, np.ndarray]
    radii: dict[int, float]
    weights: dict[int, float]
    sizes: dict[int, int]
    matched: int
    merged: int = 0


def _full_fit(x: np.ndarray, embedder: str, params: ClusterParams, previous: pa.Table | None,
              faces: list[str | None] | None = None) -> _Outcome:
    """Cluster all layers and give the clusters the earlier run's ids where their centroids match."""
    result = cluster_embeddings(x, params, faces)
    sums = cluster_sums(x, result.labels)
    centroids = {k: _l2(v[None])[0] for k, v in sums.items()}
    mapping, matched = match_ids(centroids, previous, embedder, params.match_threshold)
    stable = np.array([mapping.get(v, NOISE) for v in result.labels.tolist()], dtype=np.int64)
    centroids = {mapping[k]: v for k, v in centroids.items()}
    radii = cluster_radii(x, stable, centroids)
    placed, _ = place_layers(x, centroids, radii, params.place_slack)
    ids, counts = np.unique(stable[stable != NOISE], return_counts=True)
    noise = int((stable == NOISE).sum())
    fit = {"settings": _fit_settings(params), "embedder": embedder, "fitted_layers": len(x), "placed_since_fit": 0,
           "baseline_unplaced": round(float((placed == NOISE).mean()) if len(x) else 0.0, 4),
           "map": map_frame(stable, result.map_xy), "layers": len(x), "noise": noise}
    return _Outcome(Clustering(stable, result.probabilities, result.map_xy, result.merged, result.seconds), fit,
                    centroids, radii, {mapping[k]: float(np.linalg.norm(v)) for k, v in sums.items()},
                    dict(zip(ids.tolist(), counts.tolist())), matched, result.merged)


def _place_new(x: np.ndarray, previous: pa.Table, fit: dict, params: ClusterParams) -> tuple[_Outcome | None, str]:
    """Place new layers into the earlier clusters; (None, reason) when a full clustering is due.

    Time follows the new layers only: a grown cluster's centroid moves by the new members' sum (the
    stored weight x centroid is the old members' sum); its radius becomes the size-weighted mean of
    the old radius and the new members' 95th-percentile distance; earlier layers are not read.
    """
    active = previous.filter(pc.equal(previous.column("active"), True))
    ids = active.column("cluster_id").to_pylist()
    if len(x) and x.shape[1] != previous.schema.field("centroid").type.list_size:
        return None, "the embedder changed"
    matrix = np.asarray(active.column("centroid").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                        np.float32).reshape(len(ids), -1)
    centroids, radii = dict(zip(ids, matrix)), dict(zip(ids, active.column("radius").to_pylist()))
    weights, sizes = dict(zip(ids, active.column("weight").to_pylist())), dict(zip(ids, active.column("size").to_pylist()))
    placed, probabilities = place_layers(x, centroids, radii, params.place_slack)
    unplaced = float((placed == NOISE).mean()) if len(x) else 0.0
    if unplaced - fit["baseline_unplaced"] > params.refit_unplaced:
        return None, f"drift: {unplaced:.0%} of the new layers fit no cluster ({fit['baseline_unplaced']:.0%} at the fit)"
    since = fit["placed_since_fit"] + len(x)
    if since > params.refit_growth * fit["fitted_layers"]:
        return None, f"growth: {since} layers placed since the last full clustering of {fit['fitted_layers']}"
    for k, mine in members_of(placed).items():  # only the clusters that grew move
        if k == NOISE:
            continue
        total = centroids[k] * weights[k] + x[mine].sum(0)
        centroids[k], weights[k] = _l2(total[None])[0], float(np.linalg.norm(total))
        spread = float(np.quantile(1.0 - x[mine] @ centroids[k], 0.95))
        radii[k] = (radii[k] * sizes[k] + spread * len(mine)) / (sizes[k] + len(mine))
        sizes[k] += len(mine)
    noise = int((placed == NOISE).sum())
    fit = {**fit, "placed_since_fit": since, "unplaced": round(unplaced, 4), "layers": fit["layers"] + len(x),
           "noise": fit["noise"] + noise}
    clustering = Clustering(placed, probabilities, map_positions(placed, fit["map"], params.seed))
    return _Outcome(clustering, fit, centroids, radii, weights, sizes, matched=len(centroids)), ""


def _layer_rows(kept: pa.Table, clustering: Clustering, layers: pa.Table) -> pa.Table:
    """Manifest rows (SCHEMA) of the layers `kept` (item_id, source_id), with their layer files from `layers`."""
    n = kept.num_rows
    path_rows = pc.index_in(kept.column("item_id"), value_set=layers.column("item_id").combine_chunks())
    return pa.table({
        "item_id": kept.column("item_id"),
        "source_id": kept.column("source_id"),
        "cluster_id": pa.array(clustering.labels, pa.int32()),
        "probability": pa.array(clustering.probabilities, pa.float32()),
        "umap_x": pa.array(clustering.map_xy[:, 0] if n else [], pa.float32()),
        "umap_y": pa.array(clustering.map_xy[:, 1] if n else [], pa.float32()),
        "path": layers.column("path").take(path_rows),
    }, schema=SCHEMA)


def _results(outcome: _Outcome, embedder: str, previous: pa.Table | None, dim: int, why_full: str | None,
             extra_fit: dict | None = None) -> tuple[pa.Table, dict]:
    """The centroid table (with the fit record) and the stage summary of an outcome."""
    fit = {**outcome.fit, **(extra_fit or {})}
    n, noise = fit["layers"], fit["noise"]
    summary = {
        "layers": n, "kept": n, "clusters": len(outcome.centroids), "noise": noise,
        "noise_fraction": round(noise / n if n else 0.0, 4),
        "merged": outcome.merged, "matched_ids": outcome.matched, "new_ids": len(outcome.centroids) - outcome.matched,
        "embedder": embedder, "seconds": outcome.clustering.seconds or {},
        "mode": "full" if why_full is not None else "incremental",
        "placed": fit["placed_since_fit"] if why_full is None else 0,
        "full_because": why_full,
    }
    table = centroid_table(outcome.centroids, outcome.sizes, embedder, previous, dim, outcome.radii, fit, outcome.weights)
    return table, summary


def _kept_embeds(embeds: pa.Table) -> tuple[pa.Table, str, np.ndarray]:
    """The kept rows, by item id, their one embedder (ValueError when the manifest mixes several), and
    where each came from (its row in `embeds`)."""
    rows = np.flatnonzero(embeds.column("kept").to_numpy(zero_copy_only=False))
    kept = embeds.take(pa.array(rows))
    order = pc.sort_indices(kept.column("item_id")).to_numpy()
    kept = kept.take(pa.array(order))
    embedders = pc.unique(kept.column("embedder")).to_pylist()
    if len(embedders) > 1:
        raise ValueError(f"the embed manifest mixes embedders {sorted(embedders)}; re-run the embed stage")
    return kept, embedders[0] if embedders else "", rows[order]


# ---- the stage ----------------------------------------------------------------------------------

def cluster_layers(embeds: pa.Table, layers: pa.Table, params: ClusterParams,
                   previous: pa.Table | None = None, placement: pa.Table | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """Cluster the kept layers of an embed manifest, or place new layers into the earlier clusters.

    With the earlier result (`previous` centroids and its manifest as `placement`) and
    `params.incremental`, the earlier layers keep their clusters and only the layers not in
    `placement` are placed; the whole run is clustered again when the parameters or embedder
    changed, when earlier layers are gone, when too many new layers fit no cluster (drift) or when
    the run has grown by `refit_growth`. (The stage does the same by manifest parts: `build_cluster`.)

    Args:
        embeds: embed manifest (item_id, source_id, embedder, kept, embedding).
        layers: segment manifest (item_id, path; face_colours, when there, for `merge_same_faces`).
        params: clustering parameters.
        previous: the earlier run's centroid table, for id matching (None: ids from 0).
        placement: the earlier run's cluster manifest, for incremental placement.
    Returns:
        (cluster manifest with SCHEMA, centroid table, summary).
    """
    from tasks.embed import read_embeddings

    kept, embedder, _ = _kept_embeds(embeds)
    items = kept.column("item_id").combine_chunks()
    dim = embeds.schema.field("embedding").type.list_size
    fit, why_full = _previous_fit(previous, params) if placement is not None else (None, "no earlier clustering")
    if fit is not None and fit["embedder"] != embedder:
        fit, why_full = None, "the embedder changed"
    outcome = None
    if fit is not None:
        rows = pc.index_in(items, value_set=placement.column("item_id").combine_chunks())
        old = rows.is_valid().to_numpy(zero_copy_only=False)
        if old.sum() < placement.num_rows:
            why_full = f"{placement.num_rows - int(old.sum())} layers of the earlier clustering are gone"
        else:
            new = ~old
            outcome, why_full = _place_new(read_embeddings(kept.filter(pa.array(new))), previous, fit, params)
    if outcome is not None:
        rows = pc.fill_null(rows, 0)  # the new layers' rows are filled in below
        placed = outcome.clustering
        labels = placement.column("cluster_id").take(rows).to_numpy().astype(np.int64)
        probs = placement.column("probability").take(rows).to_numpy().astype(np.float32)
        map_xy = np.stack([placement.column(c).take(rows).to_numpy() for c in ("umap_x", "umap_y")], 1).astype(np.float32)
        labels[new], probs[new], map_xy[new] = placed.labels, placed.probabilities, placed.map_xy
        outcome.clustering = Clustering(labels, probs, map_xy)
        why_full = None
    else:
        outcome = _full_fit(read_embeddings(kept), embedder, params, previous, faces_of(kept, layers))
    centroids, summary = _results(outcome, embedder, previous, dim, why_full)
    return _layer_rows(kept, outcome.clustering, layers), centroids, summary


def faces_of(kept: pa.Table, layers: pa.Table) -> list[str | None] | None:
    """Each kept layer's `face_colours` from the segment manifest `layers` (None: the column is not there)."""
    if "face_colours" not in layers.column_names:
        return None
    colours = dict(zip(layers.column("item_id").to_pylist(), layers.column("face_colours").to_pylist()))
    return [colours.get(item) for item in kept.column("item_id").to_pylist()]


EMBED_COLUMNS = ["item_id", "source_id", "embedder", "kept", "embedding"]


def _embed_parts(store: RunStore, embed: StageResult) -> dict[str, str]:
    """The embed manifest's parts (key -> digest); a one-file manifest is one part, "all"."""
    from tasks.run.store import StageNotDoneError

    if (store.marker(embed.stage) or {}).get("manifest_digest") != embed.manifest_digest:
        raise StageNotDoneError(f"stage '{embed.stage}' of run '{store.name}' changed or is not done; run it again")
    parts = store.manifest_parts(embed.stage)
    return {k: e["digest"] for k, e in parts.items()} if parts else {"all": embed.manifest_digest}


def _read_kept(store: RunStore, stage: str, keys: list[str]) -> tuple[pa.Table, str, np.ndarray]:
    """The kept embed rows of the parts `keys` (by item id), their embedder, and each row's part (its
    index in `keys`)."""
    index = store.manifest_parts(stage)
    if index:
        table = store.read_parts(stage, keys, columns=EMBED_COLUMNS)
        part = np.repeat(np.arange(len(keys)), [index[k]["rows"] for k in keys])
    else:  # a one-file manifest: one part, "all"
        table = store.read_manifest(stage, columns=EMBED_COLUMNS)
        part = np.zeros(table.num_rows, np.int64)
    kept, embedder, rows = _kept_embeds(table)
    return kept, embedder, part[rows]


def _split_parts(table: pa.Table, part: np.ndarray, keys: list[str]) -> dict[str, pa.Table]:
    """`table`'s rows by the part each came from (`part`: an index into `keys`; every key gets a part)."""
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(len(keys) + 1))
    grouped = table.take(pa.array(order))
    return {k: grouped.slice(bounds[i], bounds[i + 1] - bounds[i]) for i, k in enumerate(keys)}


def _committed_after(centroids: Path, manifest: Path) -> bool:
    """The manifest's parts index was committed after the centroids were written (the build writes them
    first): else the centroids are those of an attempt killed before its commit, not of these parts."""
    from tasks.run.store import PARTS_INDEX

    index = manifest / PARTS_INDEX
    return index.is_file() and centroids.is_file() and index.stat().st_mtime_ns >= centroids.stat().st_mtime_ns


def build_cluster(store: RunStore, params: Any, inputs: Inputs, folder: Path
                  ) -> tuple[dict[str, pa.Table | None], dict, list[str]]:
    """Cluster the kept layers of the `embed` input (or place a new episode's), match ids; the manifest
    in parts, one per embed part (episode), layer files from the `segment` input.

    When the earlier clustering may take new layers (`_previous_fit`), the embed parts it has not seen
    are the new layers: only they are read (embeddings, and their layer files from the segment
    manifest's parts that hold them), placed and written as new parts; the other parts are kept as
    they are, so adding an episode costs that episode. An embed part that changed or went away means a
    full clustering. `summary["embeddings_read"]` counts the embeddings decoded.
    """
    from tasks.embed import read_embeddings

    own = params.cluster
    embed, segment = inputs["embed"].stage, inputs["segment"].stage
    previous = read_previous_centroids(folder)  # the last result, read before it is replaced
    (folder / "placement.parquet").unlink(missing_ok=True)  # cluster VERSION 2 kept this; the manifest holds it now
    digests = _embed_parts(store, inputs["embed"])
    fit, why_full = _previous_fit(previous, own)
    outcome = None
    if fit is not None:
        seen = fit.get("parts", {})
        changed = [k for k, d in seen.items() if digests.get(k) != d]
        if not set(seen) <= set(store.committed_parts(STAGE)) or \
                not _committed_after(folder / CENTROIDS, store.manifest_path(STAGE)):
            why_full = "the earlier clustering was not committed"
        elif changed:
            why_full = f"{len(changed)} embed part(s) of the earlier clustering changed or are gone ({changed[0]}, ...)"
        else:
            new_keys = [k for k in digests if k not in seen]
            kept, embedder, part_of = _read_kept(store, embed, new_keys)
            if kept.num_rows and embedder != fit["embedder"]:
                why_full = "the embedder changed"
            else:
                outcome, why_full = _place_new(read_embeddings(kept), previous, fit, own)
    if outcome is not None:
        layers = store.read_items(segment, kept.column("item_id"), ["path"])
        parts = {k: None for k in seen} | _split_parts(_layer_rows(kept, outcome.clustering, layers), part_of, new_keys)
        embedder, why_full = fit["embedder"], None
    else:
        kept, embedder, part_of = _read_kept(store, embed, list(digests))
        faces = ["face_colours"] if "face_colours" in store.manifest_columns(segment) else []
        layers = store.read_manifest(segment, columns=["item_id", "path", *faces])
        outcome = _full_fit(read_embeddings(kept), embedder, own, previous, faces_of(kept, layers))
        parts = _split_parts(_layer_rows(kept, outcome.clustering, layers), part_of, list(digests))
    dim = kept.schema.field("embedding").type.list_size
    centroids, summary = _results(outcome, embedder, previous, dim, why_full, {"parts": digests})
    summary["embeddings_read"] = kept.num_rows
    write_table(centroids, folder / CENTROIDS)
    return parts, summary, [f"{STAGE}/{CENTROIDS}"]


CLUSTER = GlobalStage(
    name=STAGE, version=VERSION, params=ClusterParams, inputs=("embed", "segment"), title="clusters",
    build=build_cluster,
)
"""The cluster stage: the run's layers grouped by identity."""
