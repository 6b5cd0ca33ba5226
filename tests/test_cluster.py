"""The `cluster` stage: determinism, merging, stable ids across runs, quality on known identities."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from tasks.cluster import (CENTROIDS, CLUSTER, ClusterParams, centroid_table, cluster_embeddings, cluster_layers,
                           match_ids, merge_close_clusters, read_previous_centroids)
from tasks.run.spec import run_stage
from tasks.run.store import RunStore
from tests.stages import run_params, run_plain
from tests.truth_layers import commit_in_parts, commit_truth_segment, scores

# Floors set from what the colour-shape embedder achieves on the generated footage (true
# layers of 3 episodes, every 2nd frame): ARI 0.95, purity 1.0, noise 0.03 when measured.
ARI_FLOOR, PURITY_FLOOR, NOISE_CEILING = 0.85, 0.97, 0.10


def blobs(n_per: int = 40, k: int = 5, dim: int = 32, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] / np.linalg.norm(centres[labels], axis=1, keepdims=True) + rng.normal(scale=spread, size=(k * n_per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_clustering_is_deterministic_for_a_seed():
    x, truth = blobs()
    a, b = cluster_embeddings(x, ClusterParams(seed=7)), cluster_embeddings(x, ClusterParams(seed=7))
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.map_xy, b.map_xy)
    assert np.array_equal(a.probabilities, b.probabilities)
    assert scores(truth.tolist(), a.labels.tolist())["ari"] > 0.95
    sizes = Counter(a.labels.tolist())
    assert [k for k, _ in sorted(sizes.items(), key=lambda kv: -kv[1]) if k >= 0] == sorted(k for k in sizes if k >= 0)


def test_too_few_layers_are_noise_not_an_error():
    x, _ = blobs(n_per=1, k=3)
    result = cluster_embeddings(x, ClusterParams())
    assert result.labels.tolist() == [-1, -1, -1] and result.map_xy.shape == (3, 2)
    empty = cluster_embeddings(np.zeros((0, 8), np.float32), ClusterParams())
    assert len(empty.labels) == 0


def test_close_clusters_merge_and_far_ones_do_not():
    x, truth = blobs(n_per=20, k=3, spread=0.01)
    split = truth.copy()
    split[:10] = 3  # cluster 0 cut in two pieces: same centroid region
    merged, count = merge_close_clusters(x, split, 0.05)
    assert count == 1 and len(set(merged.tolist())) == 3
    assert scores(truth.tolist(), merged.tolist())["ari"] == pytest.approx(1.0)
    unmerged, count = merge_close_clusters(x, split, 0.0)
    assert count == 0 and np.array_equal(unmerged, split)


def test_ids_match_an_earlier_run_and_new_clusters_get_unused_ids():
    x, truth = blobs(n_per=10, k=4)
    centroids = {k: x[truth == k].mean(0) / np.linalg.norm(x[truth == k].mean(0)) for k in range(4)}
    earlier = centroid_table({10 + k: v for k, v in centroids.items() if k < 3}, {10 + k: 10 for k in range(3)},
                             "colour-shape", None, x.shape[1])
    retired = centroid_table({20: -centroids[0]}, {20: 5}, "colour-shape", None, x.shape[1])
    previous = pa.concat_tables([earlier, retired.set_column(3, "active", pa.array([False]))])
    shuffled = {0: centroids[2], 1: centroids[3], 2: centroids[0], 3: centroids[1]}  # new labels, same clusters
    mapping, matched = match_ids(shuffled, previous, "colour-shape", 0.8)
    assert matched == 3
    assert mapping == {0: 12, 1: 21, 2: 10, 3: 11}  # cluster 3 of old is new: next id after the max (20)
    other, matched = match_ids(shuffled, previous, "clip:other", 0.8)
    assert matched == 0 and sorted(other.values()) == [21, 22, 23, 24]  # other space: no match, no id reuse


def test_parameters_are_checked_up_front():
    with pytest.raises(ValidationError, match="min_cluster_size"):
        ClusterParams(min_cluster_size=1)
    with pytest.raises(ValidationError, match="n_components"):
        ClusterParams(n_components=1)
    with pytest.raises(ValidationError, match="extra"):
        ClusterParams(nneighbours=5)


def test_mixed_embedders_are_refused():
    x, _ = blobs(n_per=3, k=2, dim=4)
    embeds = pa.table({"item_id": [f"l{i}" for i in range(6)], "source_id": ["f"] * 6,
                       "embedder": ["colour-shape"] * 3 + ["clip:x"] * 3,
                       "embedding": pa.array(x.tolist(), pa.list_(pa.float32(), 4)), "kept": [True] * 6})
    with pytest.raises(ValueError, match="mixes embedders"):
        cluster_layers(embeds, pa.table({"item_id": ["l0"], "path": ["p"]}), ClusterParams())


# ---- on generated footage with known identities -----------------------------------------------

def _majority_ids(store: RunStore, identities: dict[str, str]) -> dict[str, int]:
    table = store.read_manifest("cluster").to_pylist()
    votes: dict[str, Counter] = {}
    for row in table:
        if row["cluster_id"] >= 0:
            votes.setdefault(identities[row["item_id"]], Counter())[row["cluster_id"]] += 1
    return {who: c.most_common(1)[0][0] for who, c in votes.items()}


@pytest.fixture(scope="module")
def incremental_run(tmp_path_factory, episode, two_episodes):
    """One run clustered twice: first with one episode, then with two more (ids must persist)."""
    store = RunStore(tmp_path_factory.mktemp("runs"), "grow")
    _, first_ids = commit_truth_segment(store, [episode, two_episodes[0]], stride=2)
    run_plain(store, "embed", after="segment")
    first = run_plain(store, "cluster", after="embed")
    before = _majority_ids(store, first_ids)
    centroids_before = read_previous_centroids(store.stage_dir("cluster"))
    table, identities = commit_truth_segment(store, [episode, *two_episodes], stride=2)
    run_plain(store, "embed", after="segment")
    second = run_plain(store, "cluster", after="embed")
    return store, identities, before, centroids_before, first, second


def test_cluster_ids_persist_when_episodes_are_added(incremental_run):
    store, identities, before, centroids_before, first, second = incremental_run
    after = _majority_ids(store, identities)
    assert first.recomputed and second.recomputed
    assert set(before) == set(after) and len(set(before.values())) == len(before)
    assert after == before  # every character kept its cluster id
    assert second.summary["matched_ids"] == len(before) == first.summary["new_ids"]
    stored = store.stage_dir("cluster") / CENTROIDS
    assert stored.is_file() and centroids_before.num_rows == first.summary["clusters"]


def test_clustering_quality_on_known_identities(incremental_run):
    store, identities, *_ = incremental_run
    table = store.read_manifest("cluster")
    assert table.schema.names == ["item_id", "source_id", "cluster_id", "probability", "umap_x", "umap_y", "path"]
    got = scores([identities[i] for i in table.column("item_id").to_pylist()], table.column("cluster_id").to_pylist())
    print(f"colour-shape on true layers: {got}")
    assert got["ari"] >= ARI_FLOOR and got["purity"] >= PURITY_FLOOR and got["noise"] <= NOISE_CEILING
    assert got["clusters"] == len(set(identities.values()))
    assert all((store.root / p).is_file() for p in table.column("path").to_pylist())


# ---- series scale: sampled fit, incremental placement, drift ----------------------------------

def _embeds(x: np.ndarray, names: list[str]) -> tuple[pa.Table, pa.Table]:
    embeds = pa.table({"item_id": names, "source_id": ["f"] * len(names), "embedder": ["colour-shape"] * len(names),
                       "embedding": pa.array(x.tolist(), pa.list_(pa.float32(), x.shape[1])), "kept": [True] * len(names)})
    return embeds, pa.table({"item_id": names, "path": [f"{n}.png" for n in names]})


def _reload(table: pa.Table, tmp_path, name: str) -> pa.Table:
    """Through Parquet, as the stage does between runs (the fit record lives in the metadata)."""
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / name)
    return pq.read_table(tmp_path / name)


def test_a_fit_on_a_sample_places_the_other_layers():
    x, truth = blobs(n_per=80, k=5)
    result = cluster_embeddings(x, ClusterParams(fit_layers=120))
    assert scores(truth.tolist(), result.labels.tolist())["ari"] > 0.95
    assert "place" in result.seconds and result.map_xy.shape == (400, 2)


def test_new_layers_are_placed_into_existing_clusters_until_drift(tmp_path, monkeypatch):
    x, truth = blobs(n_per=40, k=5, seed=1)
    first_n = 4 * 40  # groups 0-3 clustered first; group 4 arrives later
    names = [f"l{i:04d}" for i in range(len(x))]
    embeds, layers = _embeds(x[:first_n], names[:first_n])
    table, centroids, summary = cluster_layers(embeds, layers, ClusterParams())
    assert summary["mode"] == "full" and summary["clusters"] == 4
    centroids, placement = _reload(centroids, tmp_path, "c.parquet"), _reload(table, tmp_path, "p.parquet")
    before = dict(zip(table.column("item_id").to_pylist(), table.column("cluster_id").to_pylist()))

    same_characters = blobs(n_per=50, k=5, seed=1)[0][:200:5]  # new draws around the centres of groups 0-3
    more = np.concatenate([x[:first_n], same_characters])
    more_names = names[:first_n] + [f"m{i:04d}" for i in range(len(more) - first_n)]
    table2, _, summary2 = cluster_layers(*_embeds(more, more_names), ClusterParams(), centroids, placement)
    assert summary2["mode"] == "incremental" and summary2["placed"] == 40 and summary2["new_ids"] == 0
    after = dict(zip(table2.column("item_id").to_pylist(), table2.column("cluster_id").to_pylist()))
    assert all(after[n] == before[n] for n in before)  # earlier layers keep their ids
    new_truth = np.repeat(np.arange(5), 50)[:200:5]
    by_group = {g: before[names[int(np.flatnonzero(truth == g)[0])]] for g in range(4)}
    assert [after[n] for n in more_names[first_n:]] == [by_group[g] for g in new_truth]

    unseen = np.concatenate([x[:first_n], x[first_n:]])  # 40 layers of a character never seen before
    table3, _, summary3 = cluster_layers(*_embeds(unseen, names), ClusterParams(), centroids, placement)
    assert summary3["mode"] == "full" and summary3["full_because"].startswith("drift")
    assert summary3["clusters"] == 5 and summary3["matched_ids"] == 4  # a full re-clustering still keeps the ids
    third = dict(zip(table3.column("item_id").to_pylist(), table3.column("cluster_id").to_pylist()))
    assert all(third[n] == before[n] for n in before if before[n] >= 0)

    _, _, grown = cluster_layers(*_embeds(more, more_names), ClusterParams(refit_growth=0.1), centroids, placement)
    assert grown["mode"] == "full" and grown["full_because"].startswith("growth")
    _, _, off = cluster_layers(*_embeds(more, more_names), ClusterParams(incremental=False), centroids, placement)
    assert off["mode"] == "full"
    import tasks.cluster

    monkeypatch.setattr(tasks.cluster, "VERSION", tasks.cluster.VERSION + 1)  # a new clustering: no placing into the old
    _, _, newer = cluster_layers(*_embeds(more, more_names), ClusterParams(), centroids, placement)
    assert newer["mode"] == "full" and "version" in newer["full_because"]


def test_incremental_placement_on_generated_footage(tmp_path, episode, two_episodes):
    """A new episode's true layers go into the clusters its characters already have; old layers keep theirs;
    only the new episode's embeddings are decoded and only its manifest parts written."""
    store = RunStore(tmp_path / "runs", "series")
    _, first_ids = commit_truth_segment(store, [episode, two_episodes[0]], stride=2)
    run_plain(store, "embed", after="segment")
    full = run_plain(store, "cluster", after="embed").summary
    assert full["mode"] == "full" and full["embeddings_read"] == full["layers"]
    first = store.read_manifest("cluster")
    first_parts = store.manifest_parts("cluster")
    before = dict(zip(first.column("item_id").to_pylist(), first.column("cluster_id").to_pylist()))
    character_ids = _majority_ids(store, first_ids)
    _, identities = commit_truth_segment(store, [episode, *two_episodes], stride=2)
    run_plain(store, "embed", after="segment")
    second = run_plain(store, "cluster", after="embed")
    print(second.summary)
    assert second.summary["mode"] == "incremental" and second.summary["placed"] > 0
    assert second.summary["embeddings_read"] == second.summary["placed"] < second.summary["layers"]
    parts = store.manifest_parts("cluster")
    assert set(parts) > set(first_parts) and all(parts[k] == first_parts[k] for k in first_parts)  # not rewritten
    table = store.read_manifest("cluster").to_pylist()
    assert all(before[r["item_id"]] == r["cluster_id"] for r in table if r["item_id"] in before)
    new = [r for r in table if r["item_id"] not in before]
    known = [r for r in new if identities[r["item_id"]] in character_ids]
    right = sum(r["cluster_id"] == character_ids[identities[r["item_id"]]] for r in known)
    assert len(new) == second.summary["placed"] and known
    assert right / len(known) >= 0.9, (right, len(known))


def _commit_episodes(store: RunStore, x: np.ndarray, per_episode: int) -> dict:
    """Embed and segment manifests in parts of `per_episode` layers, as the stages' merges commit them."""
    names = [f"l{i:04d}" for i in range(len(x))]
    for name in names:
        (store.root / f"{name}.png").touch()
    tables = dict(zip(("embed", "segment"), _embeds(x, names)))
    return commit_in_parts(store, {stage: {f"ep{i:02d}": table.slice(i * per_episode, per_episode)
                                           for i in range(len(x) // per_episode)} for stage, table in tables.items()})


def test_centroids_left_by_a_killed_attempt_are_not_placed_into(tmp_path):
    """Placing trusts the earlier clustering only when its parts were committed after its centroids."""
    import os

    x, _ = blobs(n_per=40, k=4, seed=4)
    x = x[np.random.default_rng(0).permutation(len(x))]
    store = RunStore(tmp_path, "r")
    store.root.mkdir(parents=True)
    assert run_stage(CLUSTER, store, run_params(), _commit_episodes(store, x[:80], 40)).summary["mode"] == "full"
    placed = run_stage(CLUSTER, store, run_params(), _commit_episodes(store, x[:120], 40)).summary
    assert placed["mode"] == "incremental" and placed["embeddings_read"] == 40
    centroids = store.stage_dir("cluster") / CENTROIDS
    later = os.stat(centroids).st_mtime_ns + 10**9
    os.utime(centroids, ns=(later, later))  # an attempt rewrote them and was killed before its commit
    again = run_stage(CLUSTER, store, run_params(), _commit_episodes(store, x, 40)).summary
    assert again["mode"] == "full" and again["full_because"] == "the earlier clustering was not committed"
    assert store.read_manifest("cluster").num_rows == len(x)


def test_clusters_whose_faces_agree_merge_at_a_looser_distance_and_others_do_not():
    import json

    from tasks.cluster import FACE_MERGE, merge_same_faces

    rng = np.random.default_rng(0)
    base = np.eye(4, 64, dtype=np.float32)

    def group(direction: np.ndarray, n: int) -> np.ndarray:
        x = direction + rng.normal(0, 0.01, (n, 64)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    bust = base[0]
    full = base[0] * 0.88 + base[1] * 0.47  # 0.12 cosine distance from the bust: one character, two framings
    x = np.vstack([group(bust, 5), group(full, 5), group(full, 5)])
    labels = np.repeat([0, 1, 2], 5)
    face = lambda hair, eyes: json.dumps({"hair": hair, "eyes": eyes, "skin": [250, 230, 220]})  # noqa: E731
    dark_blue = face([40, 40, 60], [60, 90, 200])
    faces = [dark_blue] * 10 + [face([230, 200, 90], [60, 90, 200])] * 5  # cluster 2: the same build, blonde
    threshold = 0.08 * FACE_MERGE
    merged, count = merge_same_faces(x, labels, faces, threshold)
    assert count == 1 and len(set(merged[:10])) == 1 and merged[10] != merged[0]
    assert merge_same_faces(x, labels, faces, 0.08)[1] == 0  # the plain threshold keeps the framings apart
    faceless = [dark_blue] * 5 + [None] * 10  # most of cluster 1 without a face: no face evidence to merge on
    assert merge_same_faces(x, labels, faceless, threshold)[1] == 0
