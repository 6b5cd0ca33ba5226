"""Stage `ingest` for render folders (the Kyana render guide): numbered renders in, dataset rows out.

Input: a folder of phase folders (`phase_1_essential/`, `phase_2_sensors/`, ...) holding renders
named `NAME_..._0000.png` (upper-case tokens, an optional `1024x1024` size token, a 4-digit frame
number), each with a same-stem `.txt` caption. Files are grouped into sequences by name within
their phase folder and checked as the guide's quality list does:

- every PNG has a caption: its `.txt`, or one generated from the file name's tokens through the
  caption template file the user gives (`RenderTemplate`); without either it is dropped;
- the image is readable (else quarantined), of the expected resolution, not black or blank;
- the name follows the convention; a size token in the name matches the image;
- no frame number is missing in a sequence (a warning: the frames there are still used).

One shard per phase folder. Kept renders are linked into `ingest/shards/<phase>/images/` with
their caption beside them (so each shard is also an AI-Toolkit dataset folder). The rows have the
columns the dataset stages read from `select` (item_id, source_id, character, trigger, kind,
cluster_id, path) plus the render's phase, sequence, frame and caption. Training is staged like
the guide: stage 1 (the core LoRA, `<name>`) on phases 1 and 2, stage 2 (`<name>_detail`, fine-
tuned from stage 1) on phase 3; folders without a phase number go to stage 1. The merge writes
`sequences.parquet` and the per-phase report (`report.json`, `report.txt`: the guide's "Count Your
Images"). How each LoRA trains is the train stage's business (tasks/sources/render_training.py), and
its AI-Toolkit job the package stage's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.sources.ingest import (IMAGE_SUFFIXES, STAGE, IdentityName, TriggerWord, image_stats, listing_digest, place_image, read_caption,
                          require_identity, with_trigger)
from tasks.run.progress import StageProgress
from tasks.sources.render_captions import SIZE_TOKEN, RenderTemplate, caption_from_name, read_template
from tasks.run.spec import SOURCES, Inputs, ShardedStage
from tasks.run.stage import Plan, Shard, StageResult, merge_shards, run_shard
from tasks.run.store import QUARANTINE, RunStore, fingerprint, safe_name, write_table

VERSION = 1
RENDER_NAME = re.compile(r"^(?P<name>[A-Z0-9]+(?:_(?:[A-Z0-9]+|\d+x\d+))*)_(?P<frame>\d{4})\.png$")
"""The naming convention: upper-case tokens joined by `_`, optional `WxH` token, 4-digit frame, `.png`."""
PHASE_FOLDER = re.compile(r"^phase[_-]?(\d+)", re.I)
DETAIL_SUFFIX = "_detail"

SCHEMA = pa.schema([
    ("item_id", pa.string()),          # <phase>:<file stem>
    ("source_id", pa.string()),        # the sequence: <phase>:<NAME> (see sequences.parquet)
    ("character", pa.string()),        # the LoRA the render trains: <name> (stage 1) or <name>_detail
    ("trigger", pa.string()),
    ("kind", pa.string()),
    ("cluster_id", pa.int64()),        # the training stage (1, 2; 0: in no stage)
    ("phase", pa.string()),            # the phase folder, relative to the input folder
    ("phase_number", pa.int32()),
    ("sequence", pa.string()),         # NAME (file name without the frame number)
    ("frame", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("caption", pa.string()),
    ("caption_source", pa.string()),   # file / template / none
    ("issues", pa.string()),           # every finding of this render, comma-separated
    ("source_file", pa.string()),      # the render in the input folder
    ("path", pa.string()),             # run-relative copy (null when not kept)
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
])

SEQUENCE_SCHEMA = pa.schema([
    ("phase", pa.string()),
    ("sequence", pa.string()),
    ("frames", pa.int32()),            # files found
    ("kept", pa.int32()),
    ("first", pa.int32()),
    ("last", pa.int32()),
    ("expected", pa.int32()),
    ("missing", pa.list_(pa.int32())),
])


# ---- parameters ---------------------------------------------------------------------------------

class IngestRendersParams(BaseModel):
    """What the render checks expect, and how the phases map onto the training stages."""

    model_config = ConfigDict(extra="forbid")

    name: IdentityName = Field(None, description="the product: the stage-1 LoRA's name (stage 2 is <name>_detail); "
                                "the flow sets it from the run name")
    trigger: TriggerWord = Field(None, description="trigger word every caption carries (put in front when missing); "
                                   "the flow's default is the name")
    resolution: tuple[int, int] = Field((1024, 1024), description="expected width and height of every render")
    frames_per_sequence: Optional[int] = Field(None, ge=1, description="frames a sequence should have (e.g. 36); "
                                               "None: up to its highest frame number")
    caption_template: Optional[str] = Field(None, description="caption template file for renders without a .txt")
    black_level: float = Field(10.0, ge=0, le=255, description="mean luma below this is a black frame")
    uniform_std: float = Field(1.5, ge=0, description="luma std below this is a blank frame")
    kind: str = Field("unknown", description="kind of subject for the captioner prompts (human / creature / unknown)")
    stage1_phases: list[int] = Field([1, 2], description="phase numbers of training stage 1 (the core LoRA)")
    stage2_phases: list[int] = Field([3], description="phase numbers of training stage 2 (detail, fine-tuned from stage 1)")

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"resolution must be two positive sizes (width, height), got {value}")
        return value

    @model_validator(mode="after")
    def _stages(self) -> "IngestRendersParams":
        both = sorted(set(self.stage1_phases) & set(self.stage2_phases))
        if both:
            raise ValueError(f"stage1_phases and stage2_phases overlap: phase(s) {both}")
        return self

    def read_caption_template(self) -> RenderTemplate | None:
        """The caption template file's contents (None: no template given)."""
        return read_template(self.caption_template) if self.caption_template else None

    def fingerprint_settings(self) -> dict:
        """The parameters with the caption template's contents in place of its path (for the fingerprint)."""
        template = self.read_caption_template()
        return {"params": self.model_dump(mode="json", exclude={"caption_template"}),
                "template": template.model_dump(mode="json") if template else None}

    def character_of(self, stage: int) -> str:
        return self.name if stage == 1 else f"{self.name}{DETAIL_SUFFIX}"

    def stage_of(self, phase_number: int | None) -> int:
        """Training stage of a phase: 1, 2, or 0 (trained in no stage)."""
        if phase_number is None or phase_number in self.stage1_phases:
            return 1
        return 2 if phase_number in self.stage2_phases else 0


# ---- names ---------------------------------------------------------------------------------------

def parse_render_name(filename: str) -> tuple[str, int] | None:
    """(sequence name, frame number) of a render file following the convention, else None.

    >>> parse_render_name("FULL_ASSEMBLY_FLAT_MID_360_1024x1024_0007.png")
    ('FULL_ASSEMBLY_FLAT_MID_360_1024x1024', 7)
    """
    m = RENDER_NAME.match(filename)
    return (m["name"], int(m["frame"])) if m else None


def name_size(sequence: str) -> tuple[int, int] | None:
    """The `WxH` size token of a sequence name, if it has one."""
    for token in sequence.split("_"):
        if m := SIZE_TOKEN.match(token):
            return int(m[1]), int(m[2])
    return None


# ---- one phase folder ----------------------------------------------------------------------------

def ingest_phase(folder: Path, phase: str, phase_number: int | None, params: IngestRendersParams,
                 template: RenderTemplate | None, out: Path, prefix: str) -> tuple[pa.Table, dict]:
    """Check one phase folder's renders and link the kept ones into `out/images/` with captions.

    Args:
        folder: the phase folder; phase: its path relative to the input folder; phase_number: N of phase_N.
        params: the checks' parameters; template: the caption template (None: no generated captions).
        out: the shard's temporary folder; prefix: its run-relative path once committed.
    Returns:
        (rows with SCHEMA, phase report with its sequences and counts).
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stage = params.stage_of(phase_number)
    parsed = {p: parse_render_name(p.name) for p in files}
    frames_of: dict[str, list[int]] = {}
    for name_frame in parsed.values():
        if name_frame:
            frames_of.setdefault(name_frame[0], []).append(name_frame[1])
    expected_of = {s: params.frames_per_sequence or max(f) + 1 for s, f in frames_of.items()}
    rows: list[dict] = []
    with StageProgress(f"ingest {phase}", len(files)) as bar:
        for path in files:
            rows.append(_check_render(path, parsed[path], phase, phase_number, stage, expected_of, params, template,
                                      out, prefix))
            bar.advance()
    sequences = []
    for sequence, frames in sorted(frames_of.items()):
        expected = expected_of[sequence]
        missing = sorted(set(range(expected)) - set(frames))
        kept = sum(1 for r in rows if r["sequence"] == sequence and r["kept"])
        sequences.append({"phase": phase, "sequence": sequence, "frames": len(frames), "kept": kept,
                          "first": min(frames), "last": max(frames), "expected": expected, "missing": missing})
    gapped = {s["sequence"] for s in sequences if s["missing"]}
    for row in rows:
        if row["sequence"] in gapped:
            row["issues"] = ",".join(filter(None, [row["issues"], "sequence_gap"]))
    report = _phase_report(phase, phase_number, stage, params, rows, sequences)
    return pa.Table.from_pylist(rows, schema=SCHEMA), report


def _check_render(path: Path, name_frame: tuple[str, int] | None, phase: str, phase_number: int | None, stage: int,
                  expected_of: dict[str, int], params: IngestRendersParams, template: RenderTemplate | None,
                  out: Path, prefix: str) -> dict:
    """One render's row: every check, the caption, and (when kept) its linked copy."""
    sequence, frame = name_frame if name_frame else (None, None)
    row = {"item_id": f"{phase}:{path.stem}", "source_id": f"{phase}:{sequence or path.stem}",
           "character": params.character_of(stage) if stage else params.name, "trigger": params.trigger,
           "kind": params.kind, "cluster_id": stage, "phase": phase, "phase_number": phase_number,
           "sequence": sequence, "frame": frame, "width": None, "height": None, "caption": None,
           "caption_source": "none", "issues": "", "source_file": str(path), "path": None, "kept": False,
           "drop_reason": None}
    errors: list[tuple[str, str]] = []
    if name_frame is None:
        errors.append(("bad_name", f"{path.name} does not follow NAME_..._0000.png (upper-case tokens, 4-digit frame)"))
    try:
        m = image_stats(path)
    except ValueError as exc:
        row.update(issues="unreadable", drop_reason=f"{QUARANTINE}{path.name}: {exc}")
        return row
    row.update(width=m["width"], height=m["height"])
    want = tuple(params.resolution)
    if (m["width"], m["height"]) != want:
        errors.append(("wrong_resolution", f"{m['width']}x{m['height']}, expected {want[0]}x{want[1]}"))
    elif sequence and (named := name_size(sequence)) and named != want:
        errors.append(("wrong_resolution", f"name says {named[0]}x{named[1]}, expected {want[0]}x{want[1]}"))
    if m["mean"] < params.black_level:
        errors.append(("black_frame", f"mean luma {m['mean']:.1f} < {params.black_level}"))
    elif m["std"] < params.uniform_std:
        errors.append(("blank_frame", f"luma std {m['std']:.2f} < {params.uniform_std}"))
    caption_file = path.with_suffix(".txt")
    text = read_caption(caption_file)
    if text:
        row.update(caption=with_trigger(text, params.trigger), caption_source="file")
    elif template is not None:
        words_from = sequence or path.stem.upper()
        frames = expected_of.get(sequence, 0) if sequence else 0
        row.update(caption=with_trigger(caption_from_name(template, trigger=params.trigger, sequence=words_from,
                                                          phase=phase, frame=frame or 0, frames=frames), params.trigger),
                   caption_source="template")
    else:
        errors.append(("missing_caption", f"no {caption_file.name} and no caption template"))
    if not stage and not errors:
        errors.append(("not_trained", f"phase {phase_number} is in no training stage"))
    row["issues"] = ",".join(issue for issue, _ in errors)
    if errors:
        issue, detail = errors[0]
        row["drop_reason"] = f"{issue}: {detail}"
        return row
    placed = place_image(path, out / "images" / path.name, m["oriented"])
    (out / "images" / f"{path.stem}.txt").write_text(row["caption"] + "\n", encoding="utf-8")
    row.update(kept=True, path=f"{prefix}/images/{placed.name}")
    return row


def _phase_report(phase: str, number: int | None, stage: int, params: IngestRendersParams, rows: list[dict],
                  sequences: list[dict]) -> dict:
    """A phase's counts, issues by type, and one line per dropped render or gapped sequence."""
    issues: dict[str, int] = {}
    for row in rows:
        for issue in filter(None, (row["issues"] or "").split(",")):
            issues[issue] = issues.get(issue, 0) + 1
    findings = [f"{Path(r['source_file']).name}: {r['drop_reason'].removeprefix(QUARANTINE)}"
                for r in rows if r["drop_reason"]]
    findings += [f"{s['sequence']}: missing frame(s) {_ranges(s['missing'])} of {s['expected']}"
                 for s in sequences if s["missing"]]
    return {"phase": phase, "phase_number": number, "stage": stage,
            "character": params.character_of(stage) if stage else None,
            "images": len(rows), "kept": sum(r["kept"] for r in rows),
            "quarantined": sum(bool(r["drop_reason"] and r["drop_reason"].startswith(QUARANTINE)) for r in rows),
            "dropped": sum(not r["kept"] for r in rows),
            "captions": {src: sum(r["caption_source"] == src and r["kept"] for r in rows) for src in ("file", "template")},
            "sequences": sequences, "issues": issues, "findings": findings}


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---- the whole input: the report ----------------------------------------------------------------------

def count_report(phases: list[dict], params: IngestRendersParams) -> str:
    """The per-phase counts, like the guide's "Count Your Images", plus what was found wrong."""
    lines = ["Count Your Images:"]
    for p in phases:
        lengths = sorted({s["frames"] for s in p["sequences"]})
        n = len(p["sequences"])
        shape = (f"{n} render{'s' if n != 1 else ''} x {lengths[0]}{'-' + str(lengths[-1]) if len(lengths) > 1 else ''}"
                 " frames" if lengths else "no sequences")
        label = f"Phase {p['phase_number']}" if p["phase_number"] is not None else "Renders"
        stage = f"stage {p['stage']}" if p["stage"] else "not trained"
        lines.append(f"  {label} ({p['phase']}): {p['images']} images ({shape}), {p['kept']} kept, "
                     f"{p['dropped']} dropped  [{stage}]")
    for stage in (1, 2):
        mine = [p for p in phases if p["stage"] == stage]
        if mine:
            title = "Total Core" if stage == 1 else "Total Detail"
            lines.append(f"  {title}: {sum(p['kept'] for p in mine)} images -> LoRA '{params.character_of(stage)}'")
    lines.append("Quality check:")
    totals: dict[str, int] = {}
    for p in phases:
        for issue, n in p["issues"].items():
            totals[issue] = totals.get(issue, 0) + n
    checks = [("missing_caption", "All PNG files have matching TXT caption files"),
              ("wrong_resolution", f"All images are {params.resolution[0]}x{params.resolution[1]} resolution"),
              ("sequence_gap", "Rotation sequences are smooth (no missing frames)"),
              ("unreadable", "No corrupted frames"), ("black_frame", "No black frames"), ("blank_frame", "No blank frames"),
              ("bad_name", "File names match the naming convention")]
    gaps = sum(1 for p in phases for s in p["sequences"] if s["missing"])
    for issue, text in checks:
        n, unit = (gaps, "sequence") if issue == "sequence_gap" else (totals.get(issue, 0), "file")
        lines.append(f"  [{'x' if n == 0 else ' '}] {text}" + (f"  ({n} {unit}{'s' if n != 1 else ''})" if n else ""))
    findings = [f for p in phases for f in (f"{p['phase']}/{x}" for x in p["findings"])]
    if findings:
        lines.append("Findings:")
        lines += [f"  - {f}" for f in findings]
    return "\n".join(lines)


# ---- plan, shard, merge ------------------------------------------------------------------------------

def discover_phases(input_dir: Path) -> list[Path]:
    """Folders (the input folder and those below it) that hold image files, sorted by phase number.

    Raises FileNotFoundError when there is none.
    """
    root = Path(input_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"render folder not found: {input_dir}")
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))
    found = [f for f in folders if any(c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES for c in f.iterdir())]
    if not found:
        raise FileNotFoundError(f"no images in {input_dir} (expected phase folders of NAME_..._0000.png renders)")
    return sorted(found, key=lambda f: (phase_number(f.name) is None, phase_number(f.name) or 0, f.as_posix()))


def phase_number(folder_name: str) -> int | None:
    m = PHASE_FOLDER.match(folder_name)
    return int(m[1]) if m else None


def _check_settings(params: IngestRendersParams) -> dict:
    """What decides a phase's rows (the caption template is fingerprinted apart)."""
    return params.model_dump(mode="json", include={"name", "trigger", "resolution", "frames_per_sequence",
                                                   "black_level", "uniform_std", "kind", "stage1_phases",
                                                   "stage2_phases"})


def plan_ingest_renders(store: RunStore, params: Any, inputs: Inputs) -> Plan:
    """One shard per phase folder of the render folder the sources name (its payload: the folder, the phase
    and its number), fingerprinted by the checks' settings, the caption template and the folder's listing.
    The plan's payload: the caption template (None: no generated captions)."""
    own: IngestRendersParams = params.ingest
    require_identity(own)
    root = Path(inputs[SOURCES].summary["paths"][0]).expanduser().resolve()
    template = own.read_caption_template()
    settings = {**_check_settings(own), "template": template.model_dump(mode="json") if template else None}
    shards, keys = [], set()
    for folder in discover_phases(root):
        phase = folder.relative_to(root).as_posix() if folder != root else safe_name(root.name)
        key = safe_name(phase)
        while key in keys:
            key += "_"
        keys.add(key)
        shards.append(Shard(key=key, fingerprint=fingerprint(STAGE, VERSION, settings, {"files": listing_digest(folder)}),
                            payload={"folder": str(folder), "phase": phase, "phase_number": phase_number(folder.name)}))
    return Plan(shards=shards, payload=template)


def ingest_phase_shard(store: RunStore, shard: Shard, params: Any, plan: Plan) -> StageResult:
    """Ingest one phase folder into its shard, unless that shard is already committed."""
    phase = shard.payload
    return run_shard(store, STAGE, shard.key, shard.fingerprint,
                     lambda out, prefix: ingest_phase(Path(phase["folder"]), phase["phase"], phase["phase_number"],
                                                      params.ingest, plan.payload, out, prefix))


def merge_ingest_renders(store: RunStore, plan: Plan, params: Any) -> StageResult:
    """Merge the phases into `ingest/manifest.parquet`; write the sequences and the report."""
    def merge(tables: list[pa.Table], reports: list[dict]) -> tuple[pa.Table, dict, list[str]]:
        folder = store.stage_dir(STAGE)
        table = pa.concat_tables(tables).sort_by("item_id") if tables else SCHEMA.empty_table()
        write_table(pa.Table.from_pylist([s for r in reports for s in r["sequences"]], schema=SEQUENCE_SCHEMA),
                    folder / "sequences.parquet")
        text = count_report(reports, params.ingest)
        (folder / "report.txt").write_text(text + "\n", encoding="utf-8")
        (folder / "report.json").write_text(json.dumps({"phases": reports}, indent=2, default=str), encoding="utf-8")
        outputs = [f"{STAGE}/sequences.parquet", f"{STAGE}/report.txt", f"{STAGE}/report.json"]
        kept = [c for c, k in zip(table.column("character").to_pylist(), table.column("kept").to_pylist()) if k]
        summary = {
            "phases": len(reports), "images": table.num_rows, "kept": len(kept),
            "quarantined": sum(r["quarantined"] for r in reports),
            "dropped": table.num_rows - len(kept),
            "sequences": sum(len(r["sequences"]) for r in reports),
            "sequence_gaps": sum(1 for r in reports for s in r["sequences"] if s["missing"]),
            "characters": {c: kept.count(c) for c in sorted(set(kept))},
        }
        return table, summary, outputs

    return merge_shards(store, STAGE, plan.fingerprint, plan.shard_fingerprints(), merge)


def _phases(store: RunStore, result: StageResult) -> list[dict]:
    phases = json.loads((store.stage_dir(STAGE) / "report.json").read_text())["phases"]
    return [{k: p[k] for k in ("phase", "stage", "images", "kept", "dropped")}
            | {"issues": ", ".join(f"{i} {n}" for i, n in p["issues"].items())} for p in phases]


INGEST_RENDERS = ShardedStage(
    name=STAGE, version=VERSION, params=IngestRendersParams, inputs=(SOURCES,), title="ingest (renders)",
    plan=plan_ingest_renders, shard=ingest_phase_shard, merge=merge_ingest_renders, rows=_phases,
)
"""A render folder as a source: one shard per phase folder, checked against the guide's list."""
