"""Series-scale benchmark: what one episode costs per stage, what a series costs, how the global stages grow.

    .venv/bin/python -m benchmarks.series                      # full: 2-min 960x540 episode, 10k..200k layers
    .venv/bin/python -m benchmarks.series --quick              # a couple of minutes: 20-s episode, 10k/20k layers
    .venv/bin/python -m benchmarks.series --skip-episode --sizes 10000 50000 200000

1. Episode: a generated episode (tests/footage.py) goes through every stage up to `validate`
   with the offline defaults (select takes every tier so the dataset stages have work). Each
   stage runs in its own fresh process: wall time of the stage call and the process's peak
   memory (RSS), beside the machine's load average.
2. Projection: the per-episode stages (frames, segment, embed) times the series' episodes, plus
   the global stages at the series' layer count (from 3), plus adding the episodes one at a
   time with incremental clustering.
3. Growth: synthetic embeddings around n/250 known centres (benchmarks/cluster.py) at each size,
   committed as manifests in parts of 1,000 layers (one per episode), go through the cluster
   stage (full, one 1,000-layer episode added incrementally, full again), tier, select and
   package (1% of the layers, all pointing at one real layer image: its cost is per packaged
   image), smallest size first in one fresh process after a warm-up that compiles umap's code;
   times are given against the smallest size so growth shows through machine noise. ARI
   against the known groups compares incremental placement with clustering everything again.

Training is per character, not per episode, and is measured by benchmarks/train.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("EPISODE2LORA_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPISODE_STAGES = ("frames", "segment", "embed")
STAGES = ("frames", "segment", "embed", "cluster", "tier", "select", "augment", "caption", "package", "validate")
EPISODE_LAYERS = 1000
"""Layers one real (22-minute) episode gives, as the issue counts them; the added episode in 3."""


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fresh(fn, *args):
    """Run fn(*args) in a new process (its own peak memory); returns fn's result."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ---- 1. one episode through every stage ---------------------------------------------------------

def run_stage(stage: str, runs_dir: str, video: str) -> dict:
    """One stage of the run with the offline defaults, in this (fresh) process."""
    import importlib

    from tasks.run.store import RunStore

    store = RunStore(runs_dir, "series")
    module = importlib.import_module(f"tasks.{stage}")
    fields = {"select": {"tiers": ["S", "A", "B", "C", "D"], "min_images": 8}}.get(stage, {})
    params = getattr(module, f"{stage.capitalize()}Params")(**fields)
    inputs = ([video],) if stage == "frames" else ()
    start = time.perf_counter()
    try:
        note = _note(getattr(module, f"run_{stage}")(store, *inputs, params).summary)
    except Exception as exc:  # report and go on: the table shows which stage failed
        note = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
    return {"seconds": time.perf_counter() - start, "peak_mib": _peak_mib(), "note": note, "load": _load()}


def _note(summary: dict) -> str:
    """The first few counts of a stage's summary."""
    counts = [(k, v) for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ", ".join(f"{k} {v}" for k, v in counts[:4])


def episode_costs(seconds: float, size: tuple[int, int], tmp: Path) -> dict[str, dict]:
    from tests.footage import ShotSpec, default_shots, render_episode

    shots = default_shots(11, n_shots=max(2, int(seconds / 2.5)))
    shots = [ShotSpec(s.background_seed, s.characters, seconds / len(shots), s.camera) for s in shots]
    video = tmp / "footage" / "ep01.mp4"
    start = time.perf_counter()
    render_episode(video, shots=shots, seed=11, size=size, fps=24)
    print(f"episode: {seconds:.0f} s at {size[0]}x{size[1]}, 24 fps (rendered in {time.perf_counter() - start:.0f} s)")
    print(f"{'stage':<9} {'seconds':>8} {'x realtime':>10} {'peak MiB':>9} {'load':>5}  result")
    costs = {}
    for stage in STAGES:
        got = _fresh(run_stage, stage, str(tmp / "runs"), str(video))
        costs[stage] = got
        print(f"{stage:<9} {got['seconds']:>8.1f} {got['seconds'] / seconds:>10.2f} {got['peak_mib']:>9.0f} "
              f"{got['load']:>5}  {got['note']}", flush=True)
    return costs


# ---- 3. growth of the global stages ---------------------------------------------------------------

def _tables(x, names, groups):
    import pyarrow as pa

    n = len(names)
    embeds = pa.table({"item_id": names, "source_id": [f"f{g}" for g in groups], "embedder": ["colour-shape"] * n,
                       "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), x.shape[1]),
                       "sharpness": pa.array([100.0] * n, pa.float32()), "phash": [f"{i * 2654435761 % 2**64:016x}" for i in range(n)],
                       "kept": [True] * n, "drop_reason": pa.array([None] * n, pa.string())})
    layers = pa.table({"item_id": names, "source_id": [f"f{g}" for g in groups], "path": ["layers/layer.png"] * n,
                       "alpha_coverage": [0.5] * n, "area_frac": [0.2] * n})
    return embeds, layers


def _commit_episodes(store, tables: dict, keep: bool = False) -> dict:
    """Commit each stage's table as parts of EPISODE_LAYERS rows, after the parts committed before (`keep`)."""
    from tests.truth_layers import commit_in_parts

    stages = {}
    for stage, table in tables.items():
        parts = {k: None for k in store.committed_parts(stage)} if keep else {}
        first = len(parts)
        for i, start in enumerate(range(0, table.num_rows, EPISODE_LAYERS)):
            parts[f"ep{first + i:05d}"] = table.slice(start, EPISODE_LAYERS)
        stages[stage] = parts
    return commit_in_parts(store, stages)


def _blobs(n: int, centres, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = rng.integers(0, len(centres), n)
    x = centres[groups] + rng.normal(scale=0.03, size=(n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), groups


def growth_points(sizes: list[int], root: str) -> list[dict]:
    """Every size in this one process, smallest first, after one warm-up (peak memory grows with size)."""
    import numpy as np

    from tasks.cluster import ClusterParams, cluster_embeddings

    start = time.perf_counter()
    cluster_embeddings(_blobs(5000, np.eye(20, 512, dtype=np.float32), 0)[0], ClusterParams())  # compiles numba code
    print(f"warm-up (umap's numba compilation, 5000 layers): {time.perf_counter() - start:.0f} s", flush=True)
    points = []
    for n in sorted(sizes):
        points.append(growth_point(n, root))
        _print_row(points[-1])
    return points


def _print_row(p: dict) -> None:
    t = p["times"]
    cells = " ".join(f"{t[k]:>6.{2 if k == 'add episode' else 1}f} s" + " " * 3
                     for k in ("cluster", "add episode", "re-cluster", "tier", "select", "package"))
    print(f"{p['n']:>7} {cells} {p['peak_mib']:>9.0f} {p['load']:>5}  {p['ari']['incremental_new']:.3f} / "
          f"{p['ari']['full_new']:.3f} ({p['inc_mode']}); {p['clusters']} ({p['true_groups']}), "
          f"{p['packaged']} packaged", flush=True)


def growth_point(n: int, root: str) -> dict:
    """Cluster (full + one episode incrementally + full again), tier, select, package at n layers."""
    import numpy as np

    from flows.params import RunParams
    from tasks.cluster import CLUSTER, ClusterParams
    from tasks.package import PackageParams, package_dataset
    from tasks.run.spec import run_stage
    from tasks.run.store import RunStore
    from tasks.select import SelectParams, select_characters
    from tasks.tier import TierParams, tier_clusters
    from tests.truth_layers import scores

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(max(20, n // 250), 512))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x, groups = _blobs(n, centres, 1)
    extra, extra_groups = _blobs(EPISODE_LAYERS, centres, 2)
    names = [f"l{i:07d}" for i in range(n)]
    extra_names = [f"m{i:07d}" for i in range(EPISODE_LAYERS)]
    out, times = Path(root) / f"n{n}", {}
    out.mkdir(parents=True)
    embeds, layers = _tables(x, names, groups)
    extra_embeds, extra_layers = _tables(extra, extra_names, extra_groups)
    _layer_image(out / "layer.png")
    store = RunStore(out, "series")  # the stage as a run calls it: manifests in parts, one per episode
    (store.root / "layers").mkdir(parents=True)
    _layer_image(store.root / "layers" / "layer.png")
    upstream = _commit_episodes(store, {"embed": embeds, "segment": layers})

    start = time.perf_counter()
    summary = run_stage(CLUSTER, store, RunParams(), upstream).summary
    times["cluster"] = time.perf_counter() - start
    table = store.read_manifest("cluster")
    upstream = _commit_episodes(store, {"embed": extra_embeds, "segment": extra_layers}, keep=True)
    start = time.perf_counter()
    inc = run_stage(CLUSTER, store, RunParams(), upstream).summary
    times["add episode"] = time.perf_counter() - start
    inc_table = store.read_manifest("cluster").sort_by("item_id")
    start = time.perf_counter()
    full_params = RunParams(cluster=ClusterParams(incremental=False))
    full = run_stage(CLUSTER, store, full_params, upstream).summary  # ids matched to the last
    times["re-cluster"] = time.perf_counter() - start
    full_table = store.read_manifest("cluster").sort_by("item_id")
    truth = [int(g) for g in np.concatenate([groups, extra_groups])]  # names sort in this order
    new = slice(n, n + EPISODE_LAYERS)
    ari = {"incremental": scores(truth, inc_table.column("cluster_id").to_pylist())["ari"],
           "full": scores(truth, full_table.column("cluster_id").to_pylist())["ari"],
           "incremental_new": scores(truth[new], inc_table.column("cluster_id").to_pylist()[new])["ari"],
           "full_new": scores(truth[new], full_table.column("cluster_id").to_pylist()[new])["ari"]}
    assert full["mode"] == "full"

    start = time.perf_counter()
    tiers, _, members = tier_clusters(table, embeds, layers, TierParams())
    times["tier"] = time.perf_counter() - start
    start = time.perf_counter()
    selected, characters, _ = select_characters(table, tiers, SelectParams(), members=members)
    times["select"] = time.perf_counter() - start
    selected = selected.slice(0, max(1, n // 100))  # package: its cost is per image, so 1% of the layers

    rows = [{"item_id": r["item_id"], "character": r["character"], "trigger": r["trigger"], "kind": "character",
             "group_id": None, "path": "layer.png", "background_path": None, "caption": f"{r['trigger']}, a character"}
            for r in selected.select(["item_id", "character", "trigger"]).to_pylist()]
    start = time.perf_counter()
    package_dataset(out, rows, [], PackageParams(), out / "package")
    times["package"] = time.perf_counter() - start
    return {"n": n, "times": times, "peak_mib": _peak_mib(), "load": _load(), "clusters": summary["clusters"],
            "true_groups": len(centres), "inc_mode": inc["mode"], "ari": ari, "packaged": len(rows),
            "phases": summary["seconds"]}


def _layer_image(path: Path) -> None:
    import cv2
    import numpy as np

    rgba = np.zeros((160, 96, 4), np.uint8)
    cv2.ellipse(rgba, (48, 80), (40, 70), 0, 0, 360, (200, 120, 60, 255), -1)
    cv2.imwrite(str(path), rgba)


def growth(sizes: list[int], tmp: Path) -> list[dict]:
    print(f"\nglobal stages on synthetic layers (n/250 known groups, 512-d; '+1 ep' places {EPISODE_LAYERS} new layers)")
    head = f"{'layers':>7} " + " ".join(f"{k:>11}" for k in ("cluster", "+1 ep", "re-cluster", "tier", "select", "package 1%"))
    print(f"{head} {'peak MiB':>9} {'load':>5}  ARI new layers: incremental / full; clusters (true)")
    points = _fresh(growth_points, sizes, str(tmp / "growth"))
    base = points[0]
    if len(points) > 1:
        print(f"\ngrowth against {base['n']} layers (data grew {points[-1]['n'] / base['n']:.0f}x):")
        for k in ("cluster", "add episode", "re-cluster", "tier", "select", "package"):
            ratios = " ".join(f"{p['times'][k] / max(base['times'][k], 1e-3):6.1f}x" for p in points)
            print(f"  {k:<11} {ratios}")
        print("  ARI (all layers) incremental / full: " +
              "  ".join(f"{p['n']}: {p['ari']['incremental']:.3f}/{p['ari']['full']:.3f}" for p in points))
    return points


# ---- 2. the series ------------------------------------------------------------------------------

def projection(costs: dict[str, dict] | None, points: list[dict], episodes: int, seconds: float,
               episode_minutes: float) -> None:
    print(f"\nprojection: a {episodes}-episode series on this machine (load {_load()})")
    scale = episode_minutes * 60 / seconds
    if costs:
        per_episode = sum(costs[s]["seconds"] for s in EPISODE_STAGES)
        print(f"  per-episode stages (frames+segment+embed): {per_episode:.0f} s per {seconds:.0f}-s episode "
              f"-> {per_episode * episodes / 3600:.1f} h for {episodes} such episodes, "
              f"{per_episode * scale * episodes / 3600:.1f} h for {episode_minutes:.0f}-min episodes")
    if points:
        layers = episodes * EPISODE_LAYERS
        last = max(points, key=lambda p: p["n"])
        factor = layers / last["n"]  # the stages grow about linearly beyond the sample (see the growth table)
        once = sum(last["times"][k] for k in ("cluster", "tier", "select")) * factor
        add = last["times"]["add episode"]
        per_image = last["times"]["package"] / max(1, last["packaged"])
        print(f"  cluster + tier + select once at {layers} layers: {once / 60:.1f} min (measured at {last['n']}, "
              f"scaled x{factor:.2f}); package {per_image * 1000:.0f} s per 1,000 images trained on")
        print(f"  adding episodes one at a time: {add:.2f} s of clustering each (incremental), a full re-clustering "
              f"at each doubling (~{max(1, layers.bit_length() - EPISODE_LAYERS.bit_length())} in all)")
    peak = max([c["peak_mib"] for c in (costs or {}).values()] + [p["peak_mib"] for p in points] or [0])
    print(f"  peak memory of any stage process: {peak / 1024:.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20-s episode, growth at 5k and 10k layers")
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the generated episode")
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--height", type=int, default=540)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 100000, 200000])
    ap.add_argument("--episodes", type=int, default=214, help="episodes of the projected series")
    ap.add_argument("--episode-minutes", type=float, default=22.0, help="length of the series' episodes")
    ap.add_argument("--skip-episode", action="store_true", help="skip the per-stage episode run")
    ap.add_argument("--skip-growth", action="store_true", help="skip the global-stage growth")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.sizes = min(args.seconds, 20.0), [5000, 10000]
    print(f"machine: {os.cpu_count()} cores, load {_load()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        costs = None if args.skip_episode else episode_costs(args.seconds, (args.width, args.height), tmp)
        points = [] if args.skip_growth else growth(args.sizes, tmp)
        projection(costs, points, args.episodes, args.seconds, args.episode_minutes)


if __name__ == "__main__":
    main()
