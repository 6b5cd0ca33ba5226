"""Run-wide recurrence benchmark: what judging set scenery over the whole run costs as episodes are added.

    .venv/bin/python -m benchmarks.recurrence [--layers-per-episode 2000] [--episodes 1 2 4 8 12]

The tier stage compares every layer of the run with the layers whose boxes could overlap it, found by a k-d
tree (tasks/characterness.recurring_shots). The baseline, run in the same process on the same layers,
compares every pair (what the shard-local test did, over the whole run). Synthetic layers: a third
are set scenery at a few fixed places, the rest characters anywhere. Prints seconds, the ratio to
the baseline and the time per added episode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tasks.characterness import LOOK_SIDE, recurring_shots


def synthetic_layers(episodes: int, per_episode: int, seed: int = 0) -> tuple[list, np.ndarray, np.ndarray]:
    """(shots, boxes in frame fractions, looks) of `episodes` episodes of `per_episode` layers each."""
    rng = np.random.default_rng(seed)
    places = rng.uniform(0, 0.7, (12, 2))
    shots, boxes, looks = [], [], []
    for episode in range(episodes):
        for k in range(per_episode):
            shots.append((f"ep{episode:02d}", k // 6))
            if k % 3 == 0:  # set scenery: one of a few places, nearly the same look
                place = int(rng.integers(0, len(places)))
                x, y = places[place] + rng.normal(0, 0.005, 2)
                w, h = 0.2, 0.25
                look = np.full(LOOK_SIDE ** 2, place / len(places)) + rng.normal(0, 0.02, LOOK_SIDE ** 2)
            else:
                x, y = rng.uniform(0, 0.8, 2)
                w, h = rng.uniform(0.05, 0.3, 2)
                look = rng.uniform(0, 1, LOOK_SIDE ** 2)
            boxes.append([x, y, x + w, y + h])
            looks.append(look)
    return shots, np.array(boxes), np.array(looks, np.float32)


def every_pair(shots: list, boxes: np.ndarray, looks: np.ndarray, min_iou: float = 0.8,
               max_difference: float = 0.06) -> np.ndarray:
    """The baseline: each layer against every other layer of the run."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    counts = np.ones(len(boxes), np.int64)
    for i, box in enumerate(boxes):
        ix = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
        iy = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
        same = np.flatnonzero(ix * iy / np.maximum(area + area[i] - ix * iy, 1e-12) >= min_iou)
        same = same[np.abs(looks[same] - looks[i]).mean(1) <= max_difference]
        counts[i] = len({shots[j] for j in same} | {shots[i]})
    return counts


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers-per-episode", type=int, default=2000)
    parser.add_argument("--episodes", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    parser.add_argument("--baseline-up-to", type=int, default=4, help="run the all-pairs baseline up to this many episodes")
    args = parser.parse_args()
    recurring_shots(*synthetic_layers(1, 10))  # warm: imports
    print(f"{'episodes':>8} {'layers':>7} {'k-d tree s':>10} {'all pairs s':>11} {'ratio':>6} {'s per episode':>13}")
    for episodes in args.episodes:
        layers = synthetic_layers(episodes, args.layers_per_episode)
        seconds, counts = timed(recurring_shots, *layers)
        line = f"{episodes:>8} {len(counts):>7} {seconds:>10.2f}"
        if episodes <= args.baseline_up_to:
            base_seconds, expected = timed(every_pair, *layers)
            if counts.tolist() != expected.tolist():
                raise SystemExit(f"k-d tree counts differ from all pairs at {episodes} episodes")
            line += f" {base_seconds:>11.2f} {seconds / base_seconds:>6.3f}"
        else:
            line += f" {'-':>11} {'-':>6}"
        print(f"{line} {seconds / episodes:>13.3f}")


if __name__ == "__main__":
    main()
