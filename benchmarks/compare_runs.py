"""Compare two runs stage by stage: the same manifests, images and fingerprints (e.g. before and after a refactor).

    python -m benchmarks.compare_runs RUN_A RUN_B [--ignore COLUMN ...] [--same-path PATH_A PATH_B]

For every stage folder of either run that has a manifest (`<stage>/manifest.parquet`, a file or a
folder of Parquet parts, see tasks/run/store.py) or a done marker (`<stage>/_DONE.json`):

- rows: the manifests' rows, matched by `item_id` (else by the first string or integer column
  whose values are distinct, else by the whole row), compared column by column;
- images: every image a value names (a string ending in .png, .jpg, ...: a file, run-relative or
  absolute) is compared by content hash; one a path column names that is not there is 'missing';
- fingerprint: the `fingerprint` of the two done markers.

What legitimately differs between two runs is left out: the columns named with --ignore (default
TIMING: durations and clock times), every timestamp/date/duration-typed column, and the run
folders themselves (a string holding RUN_A's absolute path is compared as if it held RUN_B's; so
with each --same-path pair, e.g. two checkouts the runs read their inputs from). Floats are
compared exactly (NaN equals NaN).

Prints one line per stage (rows A/B, manifest, images, fingerprint) and the first differing rows
and columns below it; exits 1 when any stage differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TIMING = ("seconds", "started_at", "finished_at", "version_id")
"""Columns that differ between two runs of the same inputs: durations and clock times."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHOW_ROWS = 3  # differing rows printed per stage


@dataclass
class StageDiff:
    """What differs in one stage between run A and run B (`notes` empty: the same)."""

    rows_a: int | None = None
    rows_b: int | None = None
    images: int = 0
    fingerprint: str = "no markers"
    notes: list[str] = field(default_factory=list)


def read_manifest(path: Path) -> pa.Table | None:
    """A stage's manifest: one Parquet file, or a folder of parts; None when missing."""
    if path.is_file():
        return pq.read_table(path)
    if path.is_dir():  # the parts its `_parts.json` lists (else every *.parquet)
        try:
            parts = sorted(path / e["file"] for e in json.loads((path / "_parts.json").read_text()).values())
        except (OSError, ValueError, KeyError, TypeError):
            parts = sorted(path.glob("*.parquet"))
        return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default") if parts else None
    return None


def _kept_columns(table: pa.Table, ignore: set[str]) -> list[str]:
    """The columns that should be equal: not ignored by name, not a clock time by type."""
    clock = (pa.types.is_timestamp, pa.types.is_date, pa.types.is_duration, pa.types.is_time)
    return [f.name for f in table.schema if f.name not in ignore and not any(t(f.type) for t in clock)]


def _image_hash(root: Path, value: str, column: str) -> str | None:
    """sha256 (short) of the image `value` names (run-relative or absolute); 'missing' when a path column
    (`path`, `*_path`, `*_paths`) names no file; None when another column's text is not a file (an id)."""
    path = Path(value) if Path(value).is_absolute() else root / value
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing" if column == "path" or column.endswith(("_path", "_paths")) else None


def _normalise(value: Any, aliases: list[tuple[str, str]]) -> Any:
    """`value` with each alias prefix replaced by its name (run folder -> '<run>'); NaN made comparable."""
    if isinstance(value, str):
        for prefix, name in aliases:
            value = value.replace(prefix, name)
        return value
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, dict):
        return {k: _normalise(v, aliases) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v, aliases) for v in value]
    return value


def key_column(ta: pa.Table, tb: pa.Table, columns: list[str]) -> str | None:
    """The column rows are matched by: `item_id`, else the first string or integer column whose values
    are all distinct in both tables; None: match whole rows."""
    if "item_id" in columns:
        return "item_id"
    plain = (pa.types.is_string, pa.types.is_integer)

    def distinct(t: pa.Table, c: str) -> bool:
        return t[c].null_count == 0 and len(t[c].unique()) == t.num_rows

    return next((c for c in columns if any(t(ta.schema.field(c).type) for t in plain)
                 and distinct(ta, c) and distinct(tb, c)), None)


def _rows(run: Path, table: pa.Table, columns: list[str], key_col: str | None,
          aliases: list[tuple[str, str]]) -> tuple[dict[str, dict], list[str]]:
    """Rows keyed by `key_col` (None: by the row itself), normalised, each image path (a string, alone or
    in a list, ending in an image suffix) followed by its content hash; and the hashes."""
    hashes: list[str] = []

    def with_hashes(value: Any, column: str) -> Any:
        if isinstance(value, str) and value.lower().endswith(IMAGE_SUFFIXES):
            digest = _image_hash(run, value, column)
            if digest is None:
                return value
            hashes.append(digest)
            return f"{value} #{digest}"
        return [with_hashes(v, column) for v in value] if isinstance(value, list) else value

    out: dict[str, dict] = {}
    for row in table.select(columns).to_pylist():
        row = _normalise({c: with_hashes(v, c) for c, v in row.items()}, aliases)
        key = str(row[key_col]) if key_col else json.dumps(row, sort_keys=True, default=str)
        while key in out:  # a repeated key: keep both rows
            key += "+"
        out[key] = row
    return out, hashes


def _short(value: Any, width: int = 70) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def _aliases(run: Path, same: list[str]) -> list[tuple[str, str]]:
    """Prefixes to name in a run's values: the run folder ('<run>') and the --same-path ones ('<same0>', ...)."""
    own = [(str(run.resolve()), "<run>"), (str(run.absolute()), "<run>")]
    return own + [(p, f"<same{i}>") for i, p in enumerate(same)]


def _json(run: Path, stage: str, name: str) -> dict | None:
    try:
        return json.loads((run / stage / name).read_text())
    except (OSError, ValueError):
        return None


def _marker(run: Path, stage: str) -> dict | None:
    return _json(run, stage, "_DONE.json")


def compare_stage(a: Path, b: Path, stage: str, ignore: set[str], same: list[tuple[str, str]] = ()) -> StageDiff:
    """Compare one stage of runs `a` and `b` (see the module docstring for what is left out)."""
    diff = StageDiff()
    ma, mb = _marker(a, stage), _marker(b, stage)
    if ma and mb:
        diff.fingerprint = "equal" if ma.get("fingerprint") == mb.get("fingerprint") else "DIFFERS"
        if diff.fingerprint == "DIFFERS":
            diff.notes.append("fingerprints differ")
    elif ma or mb:
        diff.fingerprint = f"marker only in {'A' if ma else 'B'}"
        diff.notes.append(diff.fingerprint)
    ta, tb = read_manifest(a / stage / "manifest.parquet"), read_manifest(b / stage / "manifest.parquet")
    diff.rows_a, diff.rows_b = (None if t is None else t.num_rows for t in (ta, tb))
    if ta is None or tb is None:
        if ta is not None or tb is not None:
            diff.notes.append(f"manifest only in {'A' if ta is not None else 'B'}")
        return diff
    ca, cb = _kept_columns(ta, ignore), _kept_columns(tb, ignore)
    if ca != cb:
        diff.notes.append(f"columns: only A {sorted(set(ca) - set(cb))}, only B {sorted(set(cb) - set(ca))}"
                          + ("" if set(ca) != set(cb) else f", order A {ca} B {cb}"))
    common = [c for c in ca if c in cb]
    key = key_column(ta, tb, common)
    (ra, ha), (rb, hb) = (_rows(a, ta, common, key, _aliases(a, [x for x, _ in same])),
                          _rows(b, tb, common, key, _aliases(b, [y for _, y in same])))
    diff.images = len(ha)
    for side, hashes in (("A", ha), ("B", hb)):
        if "missing" in hashes:
            diff.notes.append(f"{hashes.count('missing')} images of {side}'s manifest are missing")
    only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
    for side, keys in (("A", only_a), ("B", only_b)):
        if keys:
            first = ", ".join(_short(k, 40) for k in keys[:SHOW_ROWS])
            diff.notes.append(f"{len(keys)} rows only in {side}, first: {first}")
    changed = [k for k in sorted(set(ra) & set(rb)) if ra[k] != rb[k]]
    if changed:
        columns = sorted({c for k in changed for c in common if ra[k][c] != rb[k][c]})
        diff.notes.append(f"{len(changed)} rows differ, in columns: {', '.join(columns)}")
        for k in changed[:SHOW_ROWS]:
            for c in (c for c in common if ra[k][c] != rb[k][c]):
                diff.notes.append(f"  {_short(k, 40)} {c}: {_short(ra[k][c])} -> {_short(rb[k][c])}")
    return diff


def stages_of(run: Path) -> set[str]:
    """Stage folders of a run: those with a manifest or a done marker."""
    return {p.parent.name for pattern in ("*/manifest.parquet", "*/_DONE.json") for p in run.glob(pattern)}


def compare_all(a: Path, b: Path, ignore: set[str], same: list[tuple[str, str]] = ()) -> dict[str, StageDiff]:
    """Every stage of either run -> its StageDiff, in name order; see `explain_fingerprints`."""
    result = {stage: compare_stage(a, b, stage, ignore, same) for stage in sorted(stages_of(a) | stages_of(b))}
    explain_fingerprints(a, b, result, same)
    return result


def explain_fingerprints(a: Path, b: Path, result: dict[str, StageDiff], same: list[tuple[str, str]] = ()) -> None:
    """A stage's fingerprint hashes its parameters and its inputs' manifest digests, and a digest changes
    with the ignored columns (train's `seconds`): so when a stage's manifest is equal but its digest is not
    ('volatile'), a later stage's fingerprint differs between any two runs. A fingerprint difference of a
    stage whose rows and `params.json` are equal, in a pair with a volatile stage, is marked explained and
    not counted (it is still printed)."""
    volatile = [stage for stage, diff in result.items() if not diff.notes and
                (_marker(a, stage) or {}).get("manifest_digest") != (_marker(b, stage) or {}).get("manifest_digest")]
    aliases_a, aliases_b = _aliases(a, [x for x, _ in same]), _aliases(b, [y for _, y in same])
    for stage, diff in result.items():
        params_equal = (_normalise(_json(a, stage, "params.json"), aliases_a)
                        == _normalise(_json(b, stage, "params.json"), aliases_b))
        others = [v for v in volatile if v != stage]
        if diff.notes == ["fingerprints differ"] and params_equal and others:
            diff.notes = []
            diff.fingerprint = f"differs, explained (same params.json; equal rows, other digest: {', '.join(others)})"


def compare(a: Path, b: Path, ignore: set[str], same: list[tuple[str, str]] = ()) -> dict[str, list[str]]:
    """Stage -> differences (empty list: the same rows, images and fingerprint)."""
    return {stage: diff.notes for stage, diff in compare_all(a, b, ignore, same).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="run folder A (before), e.g. runs/demo")
    parser.add_argument("run_b", type=Path, help="run folder B (after)")
    parser.add_argument("--ignore", nargs="*", default=list(TIMING), help="columns to leave out (default: %(default)s)")
    parser.add_argument("--same-path", nargs=2, action="append", default=[], metavar=("PATH_A", "PATH_B"),
                        help="a path in A's values that stands for this path in B's (repeatable)")
    args = parser.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not run.is_dir():
            parser.error(f"not a run folder: {run}")
    result = compare_all(args.run_a, args.run_b, set(args.ignore), [tuple(p) for p in args.same_path])
    print(f"{'stage':<12} {'rows A/B':>11}  {'manifest':<9} {'images':>6}  fingerprint")
    for stage, diff in result.items():
        rows = f"{'-' if diff.rows_a is None else diff.rows_a}/{'-' if diff.rows_b is None else diff.rows_b}"
        rows_equal = not any(n for n in diff.notes if not n.startswith(("fingerprints", "marker")))
        manifest = "equal" if rows_equal else "DIFFERS"
        print(f"{stage:<12} {rows:>11}  {manifest:<9} {diff.images:>6}  {diff.fingerprint}")
        for note in diff.notes:
            print(f"    {note}")
    differing = [s for s, d in result.items() if d.notes]
    print(f"{len(result) - len(differing)}/{len(result)} stages the same"
          + (f"; differ: {', '.join(differing)}" if differing else ""))
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
