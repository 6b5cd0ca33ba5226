"""Estimated purity against the footage truth, per cluster (issue 22).

    .venv/bin/python -m benchmarks.purity [--episodes 2] [--anime 2] [--keep DIR] [--config data/demo.yaml]

Runs the pipeline to `select` on `data/sample`, on generated cartoon episodes (tests/footage.py,
seeds 21..) and on generated anime episodes (tests/anime_footage.py, seeds 31..) as
benchmarks/dataset_quality.py does (with --keep, footage and runs already in DIR are reused), then
prints per cluster with layers `select` may take (tier `used`):

- est.: the tier stage's `purity`;
- true: the share of those layers whose box matches (IoU >= 0.5, tests/truth_layers.identities_of_layers)
  a true character instance of the cluster's majority identity: dataset_quality's purity, per cluster,
  with a layer that matches no character (scenery, a fragment, two characters in one layer) counted false;
- clean: the share that are true and clean as well (>= 90% of their opaque pixels on that character);
- err: est. - true.

and per footage and over all of them the mean absolute error and the mean signed error (bias; > 0:
optimistic) of est. against true, over all clusters and over those of kind `character` (the ones
`select` takes without an override).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("EPISODE2LORA_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cluster_truth(store, videos: list[Path], margin: int = 8) -> list[dict]:
    """Per tier cluster with used layers: estimated purity, true purity (majority identity share of its
    used layers), clean share, kind, recommended."""
    import pyarrow.parquet as pq
    from tasks.tier import MEMBERS
    from tests.truth_layers import identities_of_layers, layer_cleanliness

    from benchmarks.dataset_quality import CLEAN_PRECISION

    segment = store.read_manifest("segment")
    matched = identities_of_layers(segment, videos)
    layers = {r["item_id"]: r for r in segment.to_pylist()}
    members = pq.read_table(store.stage_dir("tier") / MEMBERS).to_pylist()
    used: dict[int, list[str]] = {}
    for m in members:
        if m["used"]:
            used.setdefault(m["cluster_id"], []).append(m["item_id"])
    clean = layer_cleanliness([layers[i] for ids in used.values() for i in ids if i in layers], store.root, videos,
                              margin)
    out = []
    for row in store.read_manifest("tier").to_pylist():
        ids = used.get(row["cluster_id"], [])
        if not ids:
            continue
        identities = [matched.get(i) for i in ids]
        named = Counter(i for i in identities if i is not None)
        top, count = named.most_common(1)[0] if named else (None, 0)
        good = sum(i == top and top is not None and clean.get(item, (0, 0))[0] >= CLEAN_PRECISION
                   for item, i in zip(ids, identities))
        out.append({"cluster_id": row["cluster_id"], "used": len(ids), "kind": row["kind"],
                    "recommended": row["recommended"], "majority": top, "estimated": float(row["purity"]),
                    "true": count / len(ids), "clean": good / len(ids)})
    return out


def errors(rows: list[dict]) -> tuple[float, float]:
    """(mean absolute error, mean signed error) of the estimate against the truth."""
    if not rows:
        return float("nan"), float("nan")
    diffs = [r["estimated"] - r["true"] for r in rows]
    return sum(map(abs, diffs)) / len(diffs), sum(diffs) / len(diffs)


def report(name: str, rows: list[dict]) -> None:
    print(f"\n== {name}")
    print(f"   {'cluster':>7} {'used':>5} {'kind':<9} {'rec':<3} {'majority':<18} {'est.':>5} {'true':>5} {'clean':>5} "
          f"{'err':>6}")
    for r in rows:
        print(f"   {r['cluster_id']:>7} {r['used']:>5} {r['kind']:<9} {'yes' if r['recommended'] else '':<3} "
              f"{str(r['majority']):<18} {r['estimated']:>5.2f} {r['true']:>5.2f} {r['clean']:>5.2f} "
              f"{r['estimated'] - r['true']:>+6.2f}")
    for label, chosen in (("all", rows), ("character", [r for r in rows if r["kind"] == "character"])):
        mae, bias = errors(chosen)
        print(f"   {label:<10} clusters {len(chosen):>3}  MAE {mae:.3f}  bias {bias:+.3f}")


def main() -> None:
    from benchmarks.dataset_quality import arguments_params, footage_arguments, footage_runs

    args = footage_arguments(__doc__.splitlines()[0], episodes=2).parse_args()
    params = arguments_params(args)
    everything: list[dict] = []
    for name, store, videos in footage_runs(args, params):
        rows = cluster_truth(store, videos, params.segment.margin)
        report(name, rows)
        everything += rows
    print()
    for label, chosen in (("all", everything), ("character", [r for r in everything if r["kind"] == "character"])):
        mae, bias = errors(chosen)
        print(f"overall {label:<10} clusters {len(chosen):>3}  MAE {mae:.3f}  bias {bias:+.3f}")


if __name__ == "__main__":
    main()
