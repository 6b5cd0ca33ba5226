"""A cluster whose members form two groups is split in two, before ids are matched (stable ids)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.cluster import ClusterParams, cluster_layers
from tasks.groups import second_group, split_two_groups
from tests.truth_layers import scores


def _groups(sizes: list[int], dim: int = 16, spread: float = 0.04, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised points around one random direction per group; (points, group of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    truth = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[truth] / np.linalg.norm(centres[truth], axis=1, keepdims=True)
    x = x + rng.normal(scale=spread, size=x.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def test_a_cluster_of_two_groups_is_split_and_one_group_is_not():
    x, truth = _groups([20, 8, 15])
    labels = np.where(truth == 1, 0, truth)  # groups 0 and 1 in one cluster, group 2 alone
    labels[-1] = -1  # noise stays noise
    split, count = split_two_groups(x, labels, min_group=3, min_silhouette=0.6)
    assert count == 1 and split[-1] == -1
    assert scores(truth[:-1].tolist(), split[:-1].tolist())["ari"] == 1.0
    assert set(split[truth == 1].tolist()) == {3}  # the group away from the medoid takes a new label
    assert split_two_groups(x, labels, min_group=9, min_silhouette=0.6)[1] == 0  # 8 members: too few to split
    one = x[truth == 0]
    assert not second_group(one, 3, 0.6).any()  # one group: nothing away from the medoid


def _tables(x: np.ndarray, names: list[str]) -> tuple[pa.Table, pa.Table]:
    embeds = pa.table({"item_id": names, "source_id": ["f"] * len(names), "embedder": ["colour-shape"] * len(names),
                       "embedding": pa.array(x.tolist(), pa.list_(pa.float32(), x.shape[1])), "kept": [True] * len(names)})
    return embeds, pa.table({"item_id": names, "path": [f"{n}.png" for n in names]})


def test_the_cluster_stage_splits_two_groups_and_their_ids_stay_across_reruns():
    x, truth = _groups([30, 12, 20], seed=3)
    names = [f"l{i:03d}" for i in range(len(x))]
    merge_all = dict(merge_threshold=2.0, min_cluster_size=5, incremental=False,  # merging joins every cluster...
                     split_silhouette=0.6)
    first = 42  # groups 0 and 1 first
    table, centroids, _ = cluster_layers(*_tables(x[:first], names[:first]), ClusterParams(**merge_all))
    got = np.array(table.column("cluster_id").to_pylist())
    assert len(set(got.tolist()) - {-1}) == 2  # ...and the split gives the two groups back
    assert scores(truth[:first].tolist(), got.tolist())["ari"] > 0.95
    unsplit, _, _ = cluster_layers(*_tables(x[:first], names[:first]), ClusterParams(**{**merge_all, "split_silhouette": None}))
    assert len(set(unsplit.column("cluster_id").to_pylist()) - {-1}) == 1
    ids = {g: int(np.bincount(got[truth[:first] == g][got[truth[:first] == g] >= 0]).argmax()) for g in (0, 1)}
    again, _, summary = cluster_layers(*_tables(x[:first], names[:first]), ClusterParams(**merge_all), centroids)
    assert again.column("cluster_id").to_pylist() == got.tolist() and summary["matched_ids"] == 2
    grown, _, _ = cluster_layers(*_tables(x, names), ClusterParams(**{**merge_all, "merge_threshold": 0.0}), centroids)
    ids_now = np.array(grown.column("cluster_id").to_pylist())
    for g in (0, 1):  # a full clustering with a third group: the split-off group keeps its id
        members = ids_now[:first][truth[:first] == g]
        assert np.bincount(members[members >= 0]).argmax() == ids[g]
