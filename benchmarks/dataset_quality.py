"""What goes into a LoRA: precision and purity of the selected layers against the footage truth.

    .venv/bin/python -m benchmarks.dataset_quality [--episodes 4] [--config data/demo.yaml] [--set k=v ...]

Runs the pipeline to `select` (plain stage calls, no Prefect) on `data/sample`, on generated
anime episodes (tests/anime_footage.py: Live2D characters that mostly stand and talk) and on
generated cartoon episodes (tests/footage.py as it is: clouds, sun, trees, rocks, buildings in the backgrounds,
pan and zoom shots, up to two characters per shot), then matches each selected layer to the true instances of its frame by box IoU >= 0.5
(tests/truth_layers.identities_of_layers). Per run it prints:

- precision: selected layers that match a true character / selected layers;
- per selected character: its size, majority identity and purity (majority share);
- coverage: identities with >= 8 true appearances in the kept frames that are the majority of
  some selected character;
- why each missed identity was missed: never segmented, every layer dropped, clustered as noise,
  or its cluster's kind / tier / usable count;
- cleanliness: selected layers whose opaque pixels lie >= 90% on their true character and that
  hold >= 80% of it (pixels against the truth masks), with the mean pixel precision and recall, and
  each layer that is not clean (to look at: its PNG is the segment row's `path`).

The goals (issue 13) are checked at the end: precision >= 0.95, every selected character's
purity >= 0.9, no selected character whose majority is not a true character, coverage not
below the baseline (given with --baseline-coverage, measured before the change).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import yaml

os.environ.setdefault("EPISODE2LORA_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
MIN_APPEARANCES = 8
CLEAN_PRECISION, CLEAN_RECALL = 0.9, 0.8
"""A selected layer is clean when >= 90% of its opaque pixels are on its character and it holds >= 80% of it."""


def run_to_select(store, videos: list[Path], params) -> None:
    """frames -> segment -> embed -> cluster -> tier -> select, as plain calls (the cluster report after select)."""
    from tasks.pipelines import PIPELINES
    from tasks.run.runner import run_steps
    from tasks.select import NothingSelected

    with store.lock():
        try:
            run_steps(store, params, PIPELINES["episode"], "select", sources=[str(v) for v in videos])
        except NothingSelected as exc:
            print(f"   {exc}")


def true_appearances(store, videos: list[Path]) -> Counter:
    """Per identity: kept frames in which it appears (the frames the pipeline saw)."""
    from tasks.run.store import safe_name

    truth = {safe_name(v.stem): json.loads(v.with_suffix(".truth.json").read_text())["frames"] for v in videos}
    frames = store.read_manifest("frames").to_pylist()
    seen: Counter = Counter()
    for row in frames:
        if row["kept"]:
            for inst in truth[row["episode"]][row["frame_index"]]["instances"]:
                seen[inst["identity"]] += 1
    return seen


def measure(store, videos: list[Path], margin: int = 8) -> dict:
    """Precision, per-character purity, coverage and cleanliness of the run's selection."""
    from tests.truth_layers import identities_of_layers, layer_cleanliness

    matched = identities_of_layers(store.read_manifest("segment"), videos)
    selected = store.read_manifest("select").to_pylist() if store.is_done("select") else []
    selected = [r for r in selected if r.get("crop", "full") == "full"]  # layers; their head and upper-body crops follow them
    layers = {r["item_id"]: r for r in store.read_manifest("segment").to_pylist()}
    clean = layer_cleanliness([layers[r["item_id"]] for r in selected if r["item_id"] in layers], store.root, videos,
                              margin)
    tiers = {r["cluster_id"]: r for r in store.read_manifest("tier").to_pylist()}
    by_char: dict[str, list[str | None]] = {}
    for row in selected:
        by_char.setdefault(row["character"], []).append(matched.get(row["item_id"]))
    characters = []
    for name, ids in sorted(by_char.items()):
        (top, count), = Counter(ids).most_common(1)
        cids = {r["cluster_id"] for r in selected if r["character"] == name}
        est = [tiers[c].get("purity") for c in cids if c in tiers and tiers[c].get("purity") is not None]
        characters.append({"character": name, "layers": len(ids), "majority": top, "purity": count / len(ids),
                           "estimated_purity": min(est) if est else None,
                           "kind": ",".join(sorted({tiers[c]["kind"] for c in cids if c in tiers}))})
    appearances = true_appearances(store, videos)
    frequent = {i for i, n in appearances.items() if n >= MIN_APPEARANCES}
    covered = {c["majority"] for c in characters if c["majority"] in frequent}
    missed = {identity: why_missed(store, identity, matched) for identity in sorted(frequent - covered)}
    hits = sum(i is not None for ids in by_char.values() for i in ids)
    good = sum(p >= CLEAN_PRECISION and r >= CLEAN_RECALL for p, r in clean.values())
    character_of = {r["item_id"]: r["character"] for r in selected}
    unclean = [(item, character_of[item], p, r) for item, (p, r) in sorted(clean.items())
               if not (p >= CLEAN_PRECISION and r >= CLEAN_RECALL)]
    return {"selected": len(selected), "precision": hits / len(selected) if selected else 0.0,
            "clean": good / len(clean) if clean else 0.0,
            "pixel_precision": sum(p for p, _ in clean.values()) / max(len(clean), 1),
            "pixel_recall": sum(r for _, r in clean.values()) / max(len(clean), 1),
            "unclean": unclean, "characters": characters, "covered": len(covered), "frequent": len(frequent), "missed": missed,
            "scenery_clusters": sum(r["kind"] == "scenery" for r in tiers.values())}


def why_missed(store, identity: str, matched: dict[str, str | None]) -> str:
    """Why a frequent identity reached no selected character: the first stage that lost it."""
    from collections import Counter as _Counter

    layers = [r for r in store.read_manifest("segment").to_pylist() if matched.get(r["item_id"]) == identity]
    if not layers:
        return "never segmented (no layer matches it)"
    kept = [r for r in layers if r["kept"]]
    if not kept:
        return f"every layer dropped ({dict(_Counter(r['drop_reason'] for r in layers))})"
    ids = {r["item_id"] for r in kept}
    clusters = [r for r in store.read_manifest("cluster").to_pylist() if r["item_id"] in ids]
    by_cluster = _Counter(r["cluster_id"] for r in clusters if r["cluster_id"] != -1)
    if not by_cluster:
        return f"{len(kept)} layers, all clustered as noise"
    cid, n = by_cluster.most_common(1)[0]
    tier = {r["cluster_id"]: r for r in store.read_manifest("tier").to_pylist()}.get(cid, {})
    low = sum((r.get("character_score") or 0) < 0.5 for r in kept)
    return (f"{len(kept)} layers, most ({n}) in cluster {cid}: kind {tier.get('kind')}, tier {tier.get('tier')}, "
            f"{tier.get('used')} usable, {tier.get('faces')} with faces, {tier.get('moving')} moving; "
            f"{low} of its layers score < 0.5")


def report(name: str, m: dict) -> None:
    print(f"\n== {name}: {m['selected']} selected layers, precision {m['precision']:.3f}, "
          f"coverage {m['covered']}/{m['frequent']} identities (>= {MIN_APPEARANCES} appearances), "
          f"scenery clusters {m['scenery_clusters']}")
    print(f"   clean layers (>= {CLEAN_PRECISION:.0%} on the character, >= {CLEAN_RECALL:.0%} of it): {m['clean']:.3f}; "
          f"mean pixel precision {m['pixel_precision']:.3f}, recall {m['pixel_recall']:.3f}")
    print(f"   {'character':<12} {'layers':>6} {'majority':<18} {'purity':>6} {'est.':>6}  kind")
    for c in m["characters"]:
        est = "-" if c["estimated_purity"] is None else f"{c['estimated_purity']:.2f}"
        print(f"   {c['character']:<12} {c['layers']:>6} {str(c['majority']):<18} {c['purity']:>6.2f} {est:>6}  {c['kind']}")
    for identity, why in m["missed"].items():
        print(f"   missed {identity}: {why}")
    for item, character, p, r in m["unclean"]:
        print(f"   unclean {item} ({character}): pixel precision {p:.3f}, recall {r:.3f}")


def goals(runs: dict[str, dict], baseline_coverage: dict[str, int]) -> bool:
    ok = True
    for name, m in runs.items():
        checks = {
            "precision >= 0.95": m["precision"] >= 0.95,
            "purity >= 0.9 for every character": all(c["purity"] >= 0.9 for c in m["characters"]),
            "every character's majority is a true character": all(c["majority"] for c in m["characters"]),
            f"coverage >= baseline {baseline_coverage.get(name, 0)}": m["covered"] >= baseline_coverage.get(name, 0),
        }
        for what, good in checks.items():
            print(f"{name:<12} {'PASS' if good else 'FAIL'}  {what}")
            ok &= good
    return ok


def footage_arguments(description: str, episodes: int) -> argparse.ArgumentParser:
    """The options both footage benchmarks take (this one and benchmarks/purity.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--episodes", type=int, default=episodes, help="generated cartoon episodes (one run)")
    ap.add_argument("--anime", type=int, default=2, help="generated anime episodes (Live2D, tests/anime_footage.py)")
    ap.add_argument("--anime-shots", type=int, default=12, help="shots per anime episode")
    ap.add_argument("--config", type=Path, default=REPO / "data" / "demo.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="parameter override")
    ap.add_argument("--keep", type=Path, help="keep the footage and runs in this folder (reused when there)")
    return ap


def arguments_params(args: argparse.Namespace):
    """The run parameters: `--config` with the `--set` overrides."""
    from flows.params import load_params

    overrides = dict(s.split("=", 1) for s in args.set)
    return load_params(args.config, {k: yaml.safe_load(v) for k, v in overrides.items()})


def build_footage(root: Path, args: argparse.Namespace) -> dict[str, list[Path]]:
    """The footage to run, by run name: the sample, `--episodes` generated cartoon episodes (seeds 21...)
    and `--anime` anime ones (seeds 31...), rendered under `root` unless already there. Without the
    Live2D models (installed from npm) there is no anime footage, and that is said."""
    from tests.anime_footage import default_shots as anime_shots
    from tests.anime_footage import render_episode as render_anime
    from tests.footage import render_episode

    footage = {"sample": sorted((REPO / "data" / "sample").glob("*.mp4")), "generated": [], "anime": []}
    for seed in range(21, 21 + args.episodes):
        video = root / "footage" / f"gen{seed:02d}.mp4"
        if not video.is_file():
            render_episode(video, seed=seed)
        footage["generated"].append(video)
    for seed in range(31, 31 + args.anime):
        video = root / "anime" / f"anime{seed:02d}.mp4"
        if not video.is_file():
            try:
                render_anime(video, seed=seed, shots=anime_shots(seed, n_shots=args.anime_shots))
            except Exception as exc:  # noqa: BLE001 - the models come from npm; without them, no anime footage
                print(f"   anime footage unavailable: {exc}")
                break
        footage["anime"].append(video)
    return footage


def footage_runs(args: argparse.Namespace, params):
    """Run each footage of `build_footage` to `select` (under `--keep`, else a temporary folder that goes
    when the loop ends); yields (run name, RunStore, videos)."""
    from models.weights import ensure_u2netp
    from tasks.run.store import RunStore

    ensure_u2netp()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name, videos in build_footage(root, args).items():
            if videos:
                store = RunStore(root / "runs", name)
                run_to_select(store, videos, params)
                yield name, store, videos


def main() -> None:
    ap = footage_arguments(__doc__.splitlines()[0], episodes=4)
    ap.add_argument("--baseline-coverage", default="{}", help='JSON {"run": covered identities} measured before')
    args = ap.parse_args()
    params = arguments_params(args)
    runs: dict[str, dict] = {}
    for name, store, videos in footage_runs(args, params):
        runs[name] = measure(store, videos, params.segment.margin)
        report(name, runs[name])
    print()
    ok = goals(runs, json.loads(args.baseline_coverage))
    print("all goals met" if ok else "goals NOT met")


if __name__ == "__main__":
    main()
