"""Compare two runs stage by stage: the same manifest rows (e.g. before and after a refactor).

    python -m benchmarks.compare_runs RUN_A RUN_B [--ignore COLUMN ...]

For every stage folder with a manifest in either run: row counts, columns, and the rows
themselves (sorted by `item_id` where there is one). Columns that differ are listed per stage;
columns named with --ignore (e.g. timings) are left out. Exits 1 when any stage differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

TIMING = ("seconds", "started_at", "finished_at", "version_id")


def _rows(path: Path, ignore: set[str]) -> tuple[list[str], list[dict]]:
    table = pq.read_table(path)
    columns = [c for c in table.column_names if c not in ignore]
    rows = table.select(columns).to_pylist()
    key = "item_id" if "item_id" in columns else columns[0] if columns else None
    if key:
        rows.sort(key=lambda r: json.dumps(r[key], sort_keys=True, default=str))
    return columns, rows


def compare(a: Path, b: Path, ignore: set[str]) -> dict[str, list[str]]:
    """Stage -> differences (empty list: the same rows)."""
    stages = sorted({p.parent.name for run in (a, b) for p in run.glob("*/manifest.parquet")})
    out: dict[str, list[str]] = {}
    for stage in stages:
        pa_, pb = a / stage / "manifest.parquet", b / stage / "manifest.parquet"
        if not (pa_.exists() and pb.exists()):  # a file, or a folder of parts
            out[stage] = [f"manifest only in {'A' if pa_.exists() else 'B'}"]
            continue
        (ca, ra), (cb, rb) = _rows(pa_, ignore), _rows(pb, ignore)
        notes = []
        if ca != cb:
            notes.append(f"columns differ: only A {sorted(set(ca) - set(cb))}, only B {sorted(set(cb) - set(ca))}")
        if len(ra) != len(rb):
            notes.append(f"rows: {len(ra)} vs {len(rb)}")
        else:
            differing = sorted({c for x, y in zip(ra, rb) for c in set(ca) & set(cb) if x.get(c) != y.get(c)})
            if differing:
                notes.append(f"values differ in columns: {', '.join(differing)}")
        out[stage] = notes
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--ignore", nargs="*", default=list(TIMING), help="columns to leave out")
    args = parser.parse_args(argv)
    result = compare(args.run_a, args.run_b, set(args.ignore))
    for stage, notes in result.items():
        print(f"{stage:<10} {'same rows' if not notes else '; '.join(notes)}")
    return 1 if any(result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
