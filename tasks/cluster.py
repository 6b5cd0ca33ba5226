"""Stage `cluster`: group character layers by identity, with ids that survive new episodes.

The kept layers' embeddings are reduced with PCA (`pca_components`) and UMAP (umap-learn) to
`n_components` dimensions and clustered with HDBSCAN (scikit-learn, over the k-nearest-neighbour
graph so that large runs stay near-linear); noise stays `cluster_id = -1`. Clusters whose
centroids (in the embedding space) are closer than `merge_threshold` (cosine distance,
average linkage) are merged, since HDBSCAN often splits one character by pose or shot. A
second, 2-D UMAP over the same neighbour graph gives the map the report draws.

Ids: clusters are numbered by size; when the stage folder holds the previous result
(`cluster/centroids.parquet`), new clusters are matched to the old ones by centroid cosine
similarity (Hungarian assignment, `scipy.optimize.linear_sum_assignment`), so a cluster the
user named keeps its id; an unmatched cluster gets a never-used id. Everything is
deterministic for a `seed`. (`episode2lora clean NAME --stage cluster` forgets the ids.)
"""

from __future__ import annotations

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

from tasks.run.spec import GlobalStage
from tasks.run.stage import StageResult, finished, run_global_stage
from tasks.run.store import RunStore, write_table

STAGE = "cluster"
VERSION = 1
NOISE = -1
CENTROIDS = "centroids.parquet"

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
    match_threshold: float = Field(0.9, ge=-1.0, le=1.0,
                                   description="a new cluster takes an earlier run's id when their centroids' "
                                               "cosine similarity is at least this")
    seed: int = Field(0, ge=0, description="random seed (UMAP); the result is deterministic for a seed")


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
    centroids = _l2(np.stack([x[labels == k].mean(0) for k in ids]))
    groups = fcluster(linkage(centroids, method="average", metric="cosine"), threshold, criterion="distance")
    lookup = {k: int(g) for k, g in zip(ids, groups)}
    merged = np.array([lookup[v] if v != NOISE else NOISE for v in labels.tolist()], dtype=np.int64)
    return merged, len(ids) - len(set(groups.tolist()))


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0.. by size (largest first; ties by first member), noise stays -1."""
    ids = [k for k in dict.fromkeys(labels.tolist()) if k != NOISE]
    sizes = {k: int((labels == k).sum()) for k in ids}
    order = sorted(ids, key=lambda k: (-sizes[k], int(np.flatnonzero(labels == k)[0])))
    lookup = {k: i for i, k in enumerate(order)}
    return np.array([lookup.get(v, NOISE) for v in labels.tolist()], dtype=np.int64)


MAP_EPOCHS = 100
"""At most this many optimisation epochs for the report's 2-D map (a picture, not a result)."""


def cluster_embeddings(x: np.ndarray, params: ClusterParams) -> Clustering:
    """PCA -> UMAP -> HDBSCAN -> merge -> numbering by size, plus a 2-D map. Deterministic for `params.seed`.

    Args:
        x: (n, d) L2-normalised embeddings.
        params: clustering parameters.
    Returns:
        a Clustering (labels 0.. by size, -1 noise; `seconds` per phase).
    """
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
    labels = _by_size(labels)
    lap("merge")
    if manifold:
        map_epochs = min(params.n_epochs or MAP_EPOCHS, MAP_EPOCHS)
        map_xy = _umap(compact, 2, params, params.map_min_dist, knn=knn, n_epochs=map_epochs)[0]
    else:
        map_xy = _pca_2d(x)
    lap("map")
    return Clustering(labels, probabilities, map_xy, merged, seconds)


# ---- ids that persist -------------------------------------------------------------------------

def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def centroids_of(x: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Normalised mean embedding per cluster id (noise excluded)."""
    ids = sorted(set(labels.tolist()) - {NOISE})
    return {k: _l2(x[labels == k].mean(0, keepdims=True))[0] for k in ids}


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
                   previous: pa.Table | None, dim: int) -> pa.Table:
    """This run's centroids (active) plus earlier ones not seen now (inactive, ids kept reserved)."""
    rows = [{"cluster_id": k, "embedder": embedder, "size": sizes[k], "active": True, "centroid": v.tolist()}
            for k, v in sorted(centroids.items())]
    if previous is not None and previous.num_rows and previous.schema.field("centroid").type.list_size == dim:
        for row in previous.to_pylist():
            if row["cluster_id"] not in centroids:
                rows.append({**row, "active": False})
    return pa.Table.from_pylist(rows, schema=centroid_schema(dim))


# ---- the stage ----------------------------------------------------------------------------------

def cluster_layers(embeds: pa.Table, layers: pa.Table, params: ClusterParams,
                   previous: pa.Table | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """Cluster the kept layers of an embed manifest.

    Args:
        embeds: embed manifest (item_id, source_id, embedder, embedding, kept).
        layers: segment manifest (item_id, path) for the layer files.
        params: clustering parameters.
        previous: the earlier run's centroid table, for id matching (None: ids from 0).
    Returns:
        (cluster manifest with SCHEMA, centroid table, summary).
    """
    from tasks.embed import read_embeddings

    kept = embeds.filter(pc.equal(embeds.column("kept"), True)).sort_by("item_id")
    x = read_embeddings(kept)
    dim = x.shape[1] if x.size else embeds.schema.field("embedding").type.list_size
    embedders = sorted(set(kept.column("embedder").to_pylist()))
    if len(embedders) > 1:
        raise ValueError(f"the embed manifest mixes embedders {embedders}; re-run the embed stage")
    embedder = embedders[0] if embedders else ""
    result = cluster_embeddings(x, params)
    centroids = centroids_of(x, result.labels)
    mapping, matched = match_ids(centroids, previous, embedder, params.match_threshold)
    stable = np.array([mapping.get(v, NOISE) for v in result.labels.tolist()], dtype=np.int64)
    stable_centroids = {mapping[k]: v for k, v in centroids.items()}
    sizes = {mapping[k]: int((result.labels == k).sum()) for k in centroids}
    paths = dict(zip(layers.column("item_id").to_pylist(), layers.column("path").to_pylist()))
    items = kept.column("item_id").to_pylist()
    table = pa.table({
        "item_id": items,
        "source_id": kept.column("source_id").to_pylist(),
        "cluster_id": pa.array(stable, pa.int32()),
        "probability": pa.array(result.probabilities, pa.float32()),
        "umap_x": pa.array(result.map_xy[:, 0] if len(items) else [], pa.float32()),
        "umap_y": pa.array(result.map_xy[:, 1] if len(items) else [], pa.float32()),
        "path": [paths.get(i) for i in items],
    }, schema=SCHEMA)
    n = len(items)
    summary = {
        "layers": n, "kept": n, "clusters": len(centroids), "noise": int((stable == NOISE).sum()),
        "noise_fraction": round(float((stable == NOISE).mean()) if n else 0.0, 4),
        "merged": result.merged, "matched_ids": matched, "new_ids": len(centroids) - matched,
        "embedder": embedder, "seconds": result.seconds or {},
    }
    return table, centroid_table(stable_centroids, sizes, embedder, previous, dim), summary


def run_cluster(store: RunStore, params: ClusterParams, upstream: dict[str, StageResult] | None = None) -> StageResult:
    """The stage as one plain call: read embed + segment, cluster, match ids, commit."""
    upstream = upstream or {s: finished(store, s) for s in ("embed", "segment")}

    def build(folder: Path) -> tuple[pa.Table, dict, list[str]]:
        previous = read_previous_centroids(folder)  # the last result, read before it is replaced
        embeds, segments = (store.read_manifest(upstream[role].stage) for role in ("embed", "segment"))
        table, centroids, summary = cluster_layers(embeds, segments, params, previous)
        write_table(centroids, folder / CENTROIDS)
        return table, summary, [f"{STAGE}/{CENTROIDS}"]

    return run_global_stage(store, STAGE, VERSION, params, upstream, build)


CLUSTER = GlobalStage(
    name=STAGE, version=VERSION, params=ClusterParams, inputs=("embed", "segment"), title="clusters",
    build=lambda store, params, inputs: run_cluster(store, params.cluster, inputs),
)
"""The cluster stage: the run's layers grouped by identity."""
