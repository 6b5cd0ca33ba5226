"""Cluster-stage benchmark: time at 5k / 20k / 50k embeddings, and quality on generated footage.

    .venv/bin/python -m benchmarks.cluster [--sizes 5000 20000 50000] [--episodes 4] [--skip-real]
    .venv/bin/python -m benchmarks.cluster --add-episode 10000 50000 100000 200000

Timing: random 512-d embeddings drawn around n/250 centres (L2-normalised, like real
embedders' output) go through the stage's own `cluster_embeddings` (PCA, UMAP, HDBSCAN, merge,
2-D map) with default parameters. A first run at the smallest size compiles UMAP's numba code
and is reported apart; every size's time is then given as a ratio to the smallest size's time,
and per layer, so growth is visible independently of how busy the machine is.

Adding an episode (--add-episode): a run store with n synthetic layers in episodes of 1,000
(committed segment and embed manifests) is clustered once (fit on a 2,000-layer sample), then
one episode at a time is added and the cluster stage timed as the runner calls it; the time is
given against the smallest run's, and beside it how many manifest parts the stage wrote (one per
episode: only the new one), how many embeddings it decoded, the time to commit the new episode's
segment + embed parts (what those stages' merges pay), and, for comparison, the time to rewrite
the cluster manifest as one file (what each added episode cost before manifests were stored in parts).

Quality: generated episodes with known identities. (1) True layers (cut with the true masks)
-> colour-shape embedder -> clustering: ARI, purity, noise fraction. (2) The real pipeline:
frames -> segment (u2netp) -> embed -> cluster; layers are matched to true instances by box IoU
>= 0.5, the rest (background objects, fragments) count as junk; ARI on the matched layers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EPISODE2LORA_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flows.params import RunParams  # noqa: E402
from tasks.cluster import CLUSTER, ClusterParams, cluster_embeddings  # noqa: E402
from tasks.pipelines import PIPELINES  # noqa: E402
from tasks.run.runner import run_steps  # noqa: E402
from tasks.run.spec import run_stage  # noqa: E402
from tasks.run.store import RunStore  # noqa: E402
from tests.truth_layers import commit_in_parts, commit_truth_segment, identities_of_layers, scores  # noqa: E402


def random_embeddings(n: int, dim: int = 512, seed: int = 0) -> np.ndarray:
    """n unit vectors around n/250 random centres (noise 0.03 per dimension)."""
    rng = np.random.default_rng(seed)
    k = max(20, n // 250)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, k, n)] + rng.normal(scale=0.03, size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def timing(sizes: list[int]) -> None:
    params = ClusterParams()
    start = time.perf_counter()
    cluster_embeddings(random_embeddings(min(sizes), seed=99), params)
    print(f"warm-up at {min(sizes)} (numba compilation included): {time.perf_counter() - start:.1f} s")
    print(f"{'layers':>7} {'seconds':>8} {'vs first':>8} {'per layer vs first':>18}  phases (s)            clusters")
    base = None
    for n in sizes:
        x = random_embeddings(n)
        start = time.perf_counter()
        result = cluster_embeddings(x, params)
        took = time.perf_counter() - start
        base = base or (took, n)
        phases = " ".join(f"{k} {v:.1f}" for k, v in (result.seconds or {}).items())
        k = len(set(result.labels.tolist()) - {-1})
        print(f"{n:>7} {took:>8.1f} {took / base[0]:>8.2f} {took / n / (base[0] / base[1]):>18.2f}  {phases:<22} "
              f"{k} (true {max(20, n // 250)}), noise {np.mean(result.labels < 0):.3f}", flush=True)


def _episode_tables(episode: int, per_episode: int, centres: np.ndarray, dim: int = 512):
    """Embed and segment rows of one synthetic episode (`per_episode` layers around `centres`)."""
    import pyarrow as pa

    rng = np.random.default_rng(episode)
    x = centres[rng.integers(0, len(centres), per_episode)] + rng.normal(scale=0.03, size=(per_episode, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"ep{episode:04d}:{i:07d}:00" for i in range(per_episode)]
    n = len(ids)
    embeds = pa.table({"item_id": ids, "source_id": [i[:-3] for i in ids], "embedder": ["colour-shape"] * n,
                       "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), dim),
                       "sharpness": pa.array(np.full(n, 100.0), pa.float32()), "phash": ["0" * 16] * n,
                       "kept": [True] * n, "drop_reason": pa.array([None] * n, pa.string())})
    segment = pa.table({"item_id": ids, "source_id": [i[:-3] for i in ids], "episode": [i[:6] for i in ids],
                        "path": ["layers/layer.png"] * n, "kept": [True] * n})
    return embeds, segment


def _commit_inputs(store: RunStore, episodes: int, per_episode: int, centres: np.ndarray, new: range) -> dict:
    """Segment + embed manifests of `episodes` synthetic episodes in parts, one per episode, writing only
    the episodes in `new` (the others kept as committed, as the stages' merges do)."""
    tables = {e: _episode_tables(e, per_episode, centres) for e in new}
    return commit_in_parts(store, {stage: {f"ep{e:04d}": tables[e][i] if e in tables else None for e in range(episodes)}
                                   for i, stage in enumerate(("embed", "segment"))})


def add_episode_timing(sizes: list[int], cast: int = 0, per_episode: int = 1000, adds: int = 2) -> None:
    """The cluster stage adding one episode of `per_episode` layers to a clustered run of n layers
    (around `cast` characters; 0: n/250, so the clusters grow with the run as well)."""
    from tasks.run.store import write_table

    params = RunParams(cluster=ClusterParams(fit_layers=2000))  # the first clustering is not what is measured here
    print(f"\nadding one episode ({per_episode} layers) to a clustered run, through the stage (run store, "
          f"manifests on disk in parts; {cast or 'n/250'} characters); load {os.getloadavg()[0]:.1f}")
    print(f"{'layers':>7} {'first (s)':>9} {'+1 ep (s)':>14} {'vs first size':>13} {'parts written':>13} "
          f"{'embeddings decoded':>18} {'inputs (s)':>10} {'one-file rewrite (s)':>20}  mode")
    base = None
    for n in sorted(sizes):
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(cast or max(20, n // 250), 512))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        with tempfile.TemporaryDirectory() as tmp:
            store = RunStore(tmp, f"n{n}")
            store.root.mkdir(parents=True)
            (store.root / "layers").mkdir()
            (store.root / "layers" / "layer.png").write_bytes(b"")
            episodes = n // per_episode
            start = time.perf_counter()
            run_stage(CLUSTER, store, params, _commit_inputs(store, episodes, per_episode, centres, range(episodes)))
            first = time.perf_counter() - start
            took, inputs, summary = [], [], {}
            for k in range(1, adds + 1):
                before = {key: e["mtime_ns"] for key, e in store.committed_parts("cluster").items()}
                start = time.perf_counter()
                upstream = _commit_inputs(store, episodes + k, per_episode, centres, range(episodes + k - 1, episodes + k))
                inputs.append(time.perf_counter() - start)
                start = time.perf_counter()
                summary = run_stage(CLUSTER, store, params, upstream).summary
                took.append(time.perf_counter() - start)
                written = sum(before.get(key) != e["mtime_ns"] for key, e in store.committed_parts("cluster").items())
            start = time.perf_counter()  # what the stage paid before parts: rewriting its whole manifest as one file
            write_table(store.read_manifest("cluster"), store.root / "one-file.parquet")
            rewrite = time.perf_counter() - start
        base = base or min(took)
        print(f"{n:>7} {first:>9.1f} {' / '.join(f'{t:.2f}' for t in took):>14} {min(took) / base:>13.2f} "
              f"{written:>13} {summary.get('embeddings_read', 'all'):>18} {min(inputs):>10.2f} {rewrite:>20.2f}  "
              f"{summary['mode']}", flush=True)


def quality(episodes: int, real: bool) -> None:
    from tests.footage import render_episode

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        videos = []
        for seed in range(3, 3 + episodes):
            video = tmp / "footage" / f"ep{seed:02d}.mp4"
            render_episode(video, seed=seed)
            videos.append(video)
        store = RunStore(tmp / "runs", "truth")
        _, identities = commit_truth_segment(store, videos, stride=2)
        run_steps(store, RunParams(), PIPELINES["episode"], "embed", after="segment")
        start = time.perf_counter()
        run_steps(store, RunParams(), PIPELINES["episode"], "cluster", after="embed")
        table = store.read_manifest("cluster")
        got = scores([identities[i] for i in table.column("item_id").to_pylist()], table.column("cluster_id").to_pylist())
        print(f"true layers, {episodes} episodes, {table.num_rows} layers: ARI {got['ari']:.3f}, purity "
              f"{got['purity']:.3f}, noise {got['noise']:.3f}, clusters {got['clusters']} (6 identities), "
              f"clustered in {time.perf_counter() - start:.1f} s")
        if not real:
            return
        store = RunStore(tmp / "runs", "real")
        run_steps(store, RunParams(), PIPELINES["episode"], "cluster", sources=[str(v) for v in videos])
        matched = identities_of_layers(store.read_manifest("segment"), videos)
        table = store.read_manifest("cluster").to_pylist()
        known = [r for r in table if matched.get(r["item_id"])]
        got = scores([matched[r["item_id"]] for r in known], [r["cluster_id"] for r in known])
        junk = [r for r in table if not matched.get(r["item_id"])]
        junk_clusters = {r["cluster_id"] for r in junk} - {r["cluster_id"] for r in known} - {-1}
        print(f"real segment output (u2netp), {len(table)} layers, {len(known)} match a true instance, "
              f"{len(junk)} junk: ARI {got['ari']:.3f}, purity {got['purity']:.3f}, noise {got['noise']:.3f} on the "
              f"matched layers; {got['clusters']} clusters hold characters, {len(junk_clusters)} hold only junk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--episodes", type=int, default=4, help="generated episodes for the quality figures")
    ap.add_argument("--skip-real", action="store_true", help="skip the frames + segment pipeline")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--add-episode", type=int, nargs="+", metavar="N",
                    help="only time adding one episode to clustered runs of N layers (e.g. 10000 50000 100000 200000)")
    ap.add_argument("--cast", type=int, default=0, help="--add-episode: characters in the run (0: n/250)")
    args = ap.parse_args()
    if args.add_episode:
        add_episode_timing(args.add_episode, args.cast)
        return
    if not args.skip_timing:
        timing(sorted(args.sizes))
    quality(args.episodes, not args.skip_real)


if __name__ == "__main__":
    main()
