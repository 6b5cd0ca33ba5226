"""Two groups in one cluster: found by 2-means on cosine similarity and kept when they are apart.

`second_group` finds, among a cluster's L2-normalised embeddings, the group away from the
medoid when the members form two groups (mean silhouette at least a threshold, each group at
least `min_group` members). `split_two_groups` makes that group a cluster of its own; the
cluster stage calls it (when `cluster.split_silhouette` is set) after HDBSCAN and merging,
before ids are matched to an earlier run, so the new group gets a stable id the usual way. The
tier stage calls `second_group` on every cluster and trims what it finds to noise.
"""

from __future__ import annotations

import numpy as np

NOISE = -1


def medoid(x: np.ndarray) -> int:
    """The row of L2-normalised `x` with the largest summed cosine similarity to all rows (without the
    n x n matrix: the summed similarities are `x @ x.sum(0)`)."""
    return int(np.argmax(x @ x.sum(0)))


def second_group(x: np.ndarray, min_group: int, min_silhouette: float) -> np.ndarray:
    """Members of the group away from the medoid when rows of L2-normalised `x` form two groups
    (2-means by cosine, started from the medoid and the member furthest from it, with a mean
    silhouette of at least `min_silhouette`); otherwise no member."""
    none = np.zeros(len(x), bool)
    if len(x) < 2 * min_group:
        return none
    centre = medoid(x)
    centres = x[[centre, int(np.argmin(x @ x[centre]))]]
    for _ in range(20):
        side = np.argmax(x @ centres.T, axis=1)
        if side.min() == side.max():
            return none
        new = np.stack([x[side == k].mean(0) for k in (0, 1)])
        new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        if np.allclose(new, centres):
            break
        centres = new
    if min((side == 0).sum(), (side == 1).sum()) < min_group:
        return none
    if mean_silhouette(x, side) < min_silhouette:
        return none
    return side != side[centre]


def mean_silhouette(x: np.ndarray, side: np.ndarray) -> float:
    """Mean silhouette of a two-way split by cosine distance, in time and memory linear in the members:
    a member's summed distance to a group is the group's size minus its dot product with the group's sum."""
    counts = np.array([(side == k).sum() for k in (0, 1)], np.float64)
    sums = np.stack([x[side == k].sum(0) for k in (0, 1)]).astype(np.float64)
    total = counts[None, :] - x.astype(np.float64) @ sums.T  # (n, 2): summed distance to each group
    rows = np.arange(len(x))
    own = total[rows, side] / np.maximum(counts[side] - 1, 1)  # (its distance to itself is 0)
    other = total[rows, 1 - side] / counts[1 - side]
    return float(np.mean((other - own) / np.maximum(np.maximum(own, other), 1e-12)))


def split_two_groups(x: np.ndarray, labels: np.ndarray, min_group: int, min_silhouette: float
                     ) -> tuple[np.ndarray, int]:
    """Labels with each cluster whose members form two groups split in two (the group away from
    the medoid takes a new label); returns (labels, number of clusters split)."""
    out = labels.copy()
    split = 0
    following = int(labels.max()) + 1 if len(labels) else 0
    for label in sorted(set(labels.tolist()) - {NOISE}):
        members = np.flatnonzero(labels == label)
        rows = x[members] / np.maximum(np.linalg.norm(x[members], axis=1, keepdims=True), 1e-12)
        away = second_group(rows, min_group, min_silhouette)
        if away.any():
            out[members[away]] = following
            following += 1
            split += 1
    return out, split


FACE_COLOUR_STEP = 48
"""Largest 0-255 channel difference at which two clusters' hair and eye colours are the same."""


def face_signature(colours: list[str | None]) -> np.ndarray | None:
    """The median hair and eye colours (6 values) of a cluster's faces (segment's `face_colours` JSON per
    member); None when fewer than half of the members hold a face with both."""
    import json

    found = []
    for text in colours:
        face = json.loads(text) if text else {}
        if face.get("hair") and face.get("eyes"):
            found.append([*face["hair"], *face["eyes"]])
    if not found or 2 * len(found) < len(colours):
        return None
    return np.median(np.asarray(found, np.float32), axis=0)


def same_faces(signature: np.ndarray | None, other: np.ndarray | None) -> bool:
    """Whether two groups' `face_signature`s are one face: both there, hair and eyes within FACE_COLOUR_STEP."""
    return signature is not None and other is not None and float(np.abs(signature - other).max()) <= FACE_COLOUR_STEP
