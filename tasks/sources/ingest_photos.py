"""Stage `ingest` for photo sets (the FLUX identity guide): its dataset contract in, dataset rows out.

Input follows the guide's contract: `images/` + `captions/` (same stems), or images and `.txt`
captions side by side. `analyze_photos` gives the guide's analysis, printed (`format_analysis`)
and as JSON: the image count against 15-30, duplicates and near-duplicates (perceptual hash),
the spread of aspect ratios and resolutions, the trigger in every caption, identical captions,
long captions; each finding becomes a warning with the guide's advice, and recommendations follow.

The stage (one whole-set unit) links readable photos into `ingest/images/` (EXIF-rotated ones are
saved upright), drops exact duplicates (same pixels) and quarantines unreadable files. Captions
from files keep their text, with the trigger put in front when it is missing; photos without a
caption are kept with none, and the caption stage writes one. `analysis.json` and
`analysis.txt` sit beside the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.image_hash import hamming_to_all, perceptual_hash
from tasks.sources.ingest import (STAGE, IdentityName, TriggerWord, has_trigger, image_stats, place_image, read_caption,
                          require_identity, with_trigger)
from tasks.run.progress import StageProgress
from tasks.run.spec import SOURCES, GlobalStage, Inputs
from tasks.run.store import QUARANTINE, RunStore

VERSION = 1
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CANONICAL_RULE = "If identity realism degrades, fix the dataset first - not the optimizer."

SCHEMA = pa.schema([
    ("item_id", pa.string()),          # photo:<stem>
    ("source_id", pa.string()),        # the photo file, relative to the input folder
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("kind", pa.string()),
    ("cluster_id", pa.int64()),        # 0: a photo set is one identity
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("phash", pa.string()),
    ("caption", pa.string()),          # null: none given (the caption stage writes one)
    ("caption_source", pa.string()),   # file / none
    ("issues", pa.string()),           # every finding of this photo, comma-separated
    ("path", pa.string()),             # run-relative copy (null when not kept)
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
])


class IngestPhotosParams(BaseModel):
    """The identity, its trigger word, and the thresholds of the analysis."""

    model_config = ConfigDict(extra="forbid")

    name: IdentityName = Field(None, description="the identity: the LoRA's name (the flow sets it from the run name)")
    trigger: TriggerWord = Field(None, description="unique trigger token (e.g. ohwx, sks, or a made-up word)")
    kind: str = Field("human", description="kind of subject for the captioner prompts (human / creature / unknown)")
    min_images: int = Field(15, ge=1, description="fewest images (the guide: 15)")
    max_images: int = Field(30, ge=1, description="top of the recommended range (the guide: 15-30)")
    near_duplicate_distance: int = Field(10, ge=0, le=64, description="perceptual-hash bits that may differ in a near-duplicate")
    drop_duplicates: bool = Field(True, description="drop exact duplicates (same pixels) from the dataset")
    max_aspect_ratio: float = Field(2.0, ge=1, description="long side / short side above this is an odd aspect ratio")
    min_side: int = Field(512, ge=1, description="short sides below this are low resolution (the fast profile trains at 512)")
    max_caption_words: int = Field(40, ge=1, description="captions longer than this are verbose")

    @model_validator(mode="after")
    def _range(self) -> "IngestPhotosParams":
        if self.min_images > self.max_images:
            raise ValueError(f"min_images ({self.min_images}) must be <= max_images ({self.max_images})")
        return self


# ---- the dataset contract --------------------------------------------------------------------------

class PhotoSet(BaseModel):
    """The photos of a folder and their caption files, as the contract lays them out."""

    folder: str
    layout: str                        # "images+captions" or "side-by-side"
    photos: list[tuple[str, Optional[str]]]   # (image, caption file or None), absolute
    orphan_captions: list[str]


def find_photos(folder: str | Path) -> PhotoSet:
    """Read the contract: `images/` + `captions/`, or images and `.txt` side by side.

    Raises FileNotFoundError naming the folder and both layouts when there is no photo.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"photo folder not found: {folder}")
    if (root / "images").is_dir():
        layout, image_dir, caption_dir = "images+captions", root / "images", root / "captions"
    else:
        layout, image_dir, caption_dir = "side-by-side", root, root
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {folder}: expected images/ + captions/, "
                                "or images and .txt captions side by side")
    captions = {p.stem: p for p in caption_dir.glob("*.txt")} if caption_dir.is_dir() else {}
    stems = {p.stem for p in images}
    photos = [(str(p), str(captions[p.stem]) if p.stem in captions else None) for p in images]
    orphans = sorted(str(p) for s, p in captions.items() if s not in stems)
    return PhotoSet(folder=str(root), layout=layout, photos=photos, orphan_captions=orphans)


# ---- the analysis ------------------------------------------------------------------------------------

def measure_photos(photos: PhotoSet) -> list[dict[str, Any]]:
    """Per photo: size, perceptual hash, pixel digest and caption (or why it cannot be read)."""
    root = Path(photos.folder)
    out = []
    with StageProgress("analyze photos", len(photos.photos)) as bar:
        for image, caption_file in photos.photos:
            path = Path(image)
            entry = {"file": path.relative_to(root).as_posix(), "image": image, "caption_file": caption_file,
                     "caption": read_caption(Path(caption_file)) if caption_file else None, "error": None}
            try:
                stats = image_stats(path)
                with Image.open(path) as im:
                    entry["pixels"] = hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()
            except (ValueError, OSError) as exc:
                entry["error"] = str(exc)
            else:
                entry.update(width=stats["width"], height=stats["height"], oriented=stats["oriented"],
                             phash=perceptual_hash(stats["gray"]))
            out.append(entry)
            bar.advance()
    return out


def analyze_photos(folder: str | Path, params: IngestPhotosParams, measured: list[dict] | None = None) -> dict[str, Any]:
    """The guide's dataset analysis of a photo set: findings, warnings and recommendations (JSON-ready)."""
    import numpy as np

    if not params.trigger:
        raise ValueError(f"ingest.trigger must be set to analyze captions, got {params.trigger!r}")
    photos = find_photos(folder)
    measured = measured if measured is not None else measure_photos(photos)
    good = [m for m in measured if m["error"] is None]

    duplicates, near = [], []
    kept_hashes: list[int] = []
    kept_files: list[str] = []
    by_pixels: dict[str, str] = {}
    for m in good:
        if m["pixels"] in by_pixels:
            duplicates.append({"image": m["file"], "duplicate_of": by_pixels[m["pixels"]]})
            continue
        by_pixels[m["pixels"]] = m["file"]
        if kept_hashes:
            dist = hamming_to_all(m["phash"], np.array(kept_hashes, dtype=np.uint64))
            j = int(dist.argmin())
            if dist[j] <= params.near_duplicate_distance:
                near.append({"image": m["file"], "similar_to": kept_files[j], "distance": int(dist[j])})
        kept_hashes.append(m["phash"])
        kept_files.append(m["file"])

    n = len(good) - len(duplicates)  # distinct readable photos
    ratios = {m["file"]: m["width"] / m["height"] for m in good}
    odd = [{"image": f, "ratio": round(r, 2)} for f, r in ratios.items()
           if max(r, 1 / r) > params.max_aspect_ratio]
    sides = sorted(min(m["width"], m["height"]) for m in good)
    low = [m["file"] for m in good if min(m["width"], m["height"]) < params.min_side]

    captioned = [m for m in good if m["caption"]]
    missing = [m["file"] for m in good if not m["caption"]]
    without_trigger = [m["file"] for m in captioned if not has_trigger(m["caption"], params.trigger)]
    not_first = [m["file"] for m in captioned if has_trigger(m["caption"], params.trigger)
                 and not m["caption"].lstrip().startswith(params.trigger)]
    groups: dict[str, list[str]] = {}
    for m in captioned:
        groups.setdefault(" ".join(m["caption"].lower().split()), []).append(m["file"])
    identical = [files for files in groups.values() if len(files) > 1]
    long = [m["file"] for m in captioned if len(m["caption"].split()) > params.max_caption_words]

    analysis = {
        "folder": photos.folder, "layout": photos.layout, "trigger": params.trigger,
        "count": {"images": n, "files": len(measured), "minimum": params.min_images,
                  "recommended": [params.min_images, params.max_images],
                  "verdict": "too_few" if n < params.min_images else ("many" if n > params.max_images else "ok")},
        "unreadable": [{"image": m["file"], "error": m["error"]} for m in measured if m["error"]],
        "duplicates": duplicates, "near_duplicates": near,
        "aspect_ratios": {
            "portrait": sum(r < 0.9 for r in ratios.values()), "square": sum(0.9 <= r <= 1.1 for r in ratios.values()),
            "landscape": sum(r > 1.1 for r in ratios.values()),
            "min": round(min(ratios.values()), 2) if ratios else None, "max": round(max(ratios.values()), 2) if ratios else None,
            "distinct": len({round(r, 2) for r in ratios.values()}), "odd": odd},
        "resolution": {"min_side": sides[0] if sides else None, "median_side": int(statistics.median(sides)) if sides else None,
                       "max_side": sides[-1] if sides else None, "below_minimum": low, "minimum": params.min_side},
        "captions": {"captioned": len(captioned), "missing": missing, "without_trigger": without_trigger,
                     "trigger_not_first": not_first, "identical": identical, "long": long,
                     "orphans": [Path(p).name for p in photos.orphan_captions]},
    }
    analysis["warnings"], analysis["recommendations"] = _advice(analysis, params)
    return analysis


def _advice(a: dict, params: IngestPhotosParams) -> tuple[list[dict], list[str]]:
    """The guide's warnings and recommendations for an analysis."""
    warnings: list[dict] = []
    recs: list[str] = []

    def warn(code: str, message: str, files: list[str] = ()) -> None:
        warnings.append({"code": code, "message": message, "files": list(files)})

    n, lo, hi = a["count"]["images"], params.min_images, params.max_images
    if n < lo:
        warn("too_few_images", f"{n} usable images; the guide's minimum is {lo} (recommended {lo}-{hi})")
        recs.append(f"Add {lo - n} or more images with mixed angles (front, 3/4, profile), varied lighting and "
                    "framing (portrait + mid/full body).")
        recs.append(f"Keep the text encoder frozen (the default): the dataset has fewer than {lo} images.")
    elif n > hi:
        warn("many_images", f"{n} usable images, above the recommended {lo}-{hi}; more only helps if every one is "
                            "distinct and good")
        recs.append("Curate down to the best, most varied images rather than adding steps.")
    if a["unreadable"]:
        warn("unreadable_images", f"{len(a['unreadable'])} file(s) cannot be read and are left out",
             [u["image"] for u in a["unreadable"]])
    if a["duplicates"]:
        warn("duplicates", f"{len(a['duplicates'])} exact duplicate(s): duplicates push towards sameface / carbon copies",
             [d["image"] for d in a["duplicates"]])
        recs.append("Remove the duplicate images" + (" (the pipeline drops them)." if params.drop_duplicates else "."))
    if a["near_duplicates"]:
        warn("near_duplicates", f"{len(a['near_duplicates'])} near-duplicate(s) (perceptual hash within "
                                f"{params.near_duplicate_distance} bits of another photo)",
             [d["image"] for d in a["near_duplicates"]])
        recs.append("Replace near-duplicates with photos from other angles or in other light.")
    ar = a["aspect_ratios"]
    if ar["odd"]:
        warn("odd_aspect_ratio", f"{len(ar['odd'])} image(s) with an aspect ratio beyond {params.max_aspect_ratio}:1; "
                                 "they are letterboxed into the square training canvas", [o["image"] for o in ar["odd"]])
        recs.append("Crop extreme panoramas or strips to the subject.")
    if n >= 3 and ar["distinct"] == 1:
        warn("uniform_framing", "every image has the same aspect ratio: check the set mixes portraits with mid and "
                                "full-body framings (angle failure comes from poor diversity)")
    res = a["resolution"]
    if res["below_minimum"]:
        warn("low_resolution", f"{len(res['below_minimum'])} image(s) with a short side below {params.min_side} px",
             res["below_minimum"])
        recs.append(f"Replace images smaller than {params.min_side} px on their short side.")
    c = a["captions"]
    if c["missing"]:
        warn("missing_captions", f"{len(c['missing'])} image(s) without a caption file; a caption is written for "
                                 "them (trigger first)", c["missing"])
    if c["without_trigger"]:
        warn("trigger_missing", f"the trigger '{params.trigger}' is missing from {len(c['without_trigger'])} "
                                "caption(s); it is added in front", c["without_trigger"])
        recs.append(f"Put '{params.trigger}' in every caption, first: `{params.trigger}, description`.")
    if c["identical"]:
        files = [f for group in c["identical"] for f in group]
        warn("identical_captions", f"{len(c['identical'])} group(s) of images share one caption; vary the descriptions",
             files)
        recs.append("Describe what differs per image (pose, clothing, setting, light); keep permanent traits out.")
    if c["long"]:
        warn("long_captions", f"{len(c['long'])} caption(s) longer than {params.max_caption_words} words; keep them "
                              "concise", c["long"])
    if c["orphans"]:
        warn("orphan_captions", f"{len(c['orphans'])} caption file(s) without an image", c["orphans"])
    recs.append("Run the fast profile first to validate the dataset; go to final when the identity is recognisable.")
    recs.append(CANONICAL_RULE)
    return warnings, recs


def format_analysis(a: dict) -> str:
    """The analysis as text for the terminal."""
    count = a["count"]
    ar, res, c = a["aspect_ratios"], a["resolution"], a["captions"]
    lines = [
        f"Photo set {a['folder']} ({a['layout']}), trigger '{a['trigger']}'",
        f"  images: {count['images']} usable of {count['files']} (recommended {count['recommended'][0]}-"
        f"{count['recommended'][1]}): {count['verdict'].replace('_', ' ')}",
        f"  duplicates: {len(a['duplicates'])}, near-duplicates: {len(a['near_duplicates'])}",
        f"  aspect ratios: {ar['portrait']} portrait, {ar['square']} square, {ar['landscape']} landscape "
        f"(range {ar['min']}-{ar['max']}, {len(ar['odd'])} odd)",
        f"  resolution (short side): min {res['min_side']}, median {res['median_side']}, max {res['max_side']} px",
        f"  captions: {c['captioned']} given, {len(c['missing'])} missing, {len(c['without_trigger'])} without trigger, "
        f"{len(c['identical'])} identical group(s)",
    ]
    if a["warnings"]:
        lines.append("Warnings:")
        for w in a["warnings"]:
            shown = ", ".join(w["files"][:6]) + (", ..." if len(w["files"]) > 6 else "")
            lines.append(f"  ! {w['message']}" + (f"  [{shown}]" if shown else ""))
    lines.append("Recommendations:")
    lines += [f"  - {r}" for r in a["recommendations"]]
    return "\n".join(lines)


# ---- the stage -------------------------------------------------------------------------------------

def ingest_photos(photos: PhotoSet, measured: list[dict], analysis: dict, params: IngestPhotosParams,
                  out: Path, prefix: str) -> tuple[pa.Table, dict]:
    """Link the usable photos into `out/images/` and describe each as a dataset row.

    Args:
        photos: the set; measured: `measure_photos(photos)`; analysis: `analyze_photos` of it.
        params: the stage parameters; out: the stage folder; prefix: its run-relative path.
    Returns:
        (rows with SCHEMA, summary).
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    duplicate_of = {d["image"]: d["duplicate_of"] for d in analysis["duplicates"]}
    flagged: dict[str, list[str]] = {}
    for w in analysis["warnings"]:
        for f in w["files"]:
            flagged.setdefault(f, []).append(w["code"])
    rows = []
    for m in measured:
        stem = Path(m["file"]).stem
        row = {"item_id": f"photo:{m['file']}", "source_id": m["file"], "character": params.name,
               "trigger": params.trigger, "kind": params.kind, "cluster_id": 0, "width": m.get("width"),
               "height": m.get("height"), "phash": f"{m['phash']:016x}" if m.get("phash") is not None else None,
               "caption": with_trigger(m["caption"], params.trigger) if m["caption"] else None,
               "caption_source": "file" if m["caption"] else "none", "issues": ",".join(flagged.get(m["file"], [])),
               "path": None, "kept": False, "drop_reason": None}
        if m["error"]:
            row["drop_reason"] = f"{QUARANTINE}{m['file']}: {m['error']}"
        elif params.drop_duplicates and m["file"] in duplicate_of:
            row["drop_reason"] = f"duplicate: same pixels as {duplicate_of[m['file']]}"
        else:
            name = f"{len(rows):04d}_{stem}{Path(m['image']).suffix.lower()}"
            placed = place_image(Path(m["image"]), out / "images" / name, m["oriented"])
            row.update(kept=True, path=f"{prefix}/images/{placed.name}")
        rows.append(row)
    kept = sum(r["kept"] for r in rows)
    summary = {"images": len(rows), "kept": kept, "quarantined": len(analysis["unreadable"]),
               "duplicates_dropped": sum(bool(r["drop_reason"] and r["drop_reason"].startswith("duplicate")) for r in rows),
               "captions_given": sum(r["kept"] and r["caption_source"] == "file" for r in rows),
               "warnings": [w["code"] for w in analysis["warnings"]], "verdict": analysis["count"]["verdict"]}
    return pa.Table.from_pylist(rows, schema=SCHEMA), summary


def build_ingest(store: RunStore, params: Any, inputs: Inputs, out: Path) -> tuple[pa.Table, dict, list[str]]:
    """Analyze the photo set the sources name and ingest it into the stage folder `out` (a previous
    ingest is replaced wholesale); `analysis.json` and `analysis.txt` beside the manifest."""
    own: IngestPhotosParams = params.ingest
    require_identity(own)
    folder = inputs[SOURCES].summary["paths"][0]
    photos = find_photos(folder)
    shutil.rmtree(out / "images", ignore_errors=True)
    measured = measure_photos(photos)
    analysis = analyze_photos(folder, own, measured)
    (out / "analysis.json").write_text(json.dumps(analysis, indent=2), encoding="utf-8")
    (out / "analysis.txt").write_text(format_analysis(analysis) + "\n", encoding="utf-8")
    table, summary = ingest_photos(photos, measured, analysis, own, out, STAGE)
    return table, summary, [f"{STAGE}/analysis.json", f"{STAGE}/analysis.txt"]


INGEST_PHOTOS = GlobalStage(
    name=STAGE, version=VERSION, params=IngestPhotosParams, inputs=(SOURCES,), title="ingest (photos)",
    build=build_ingest, rows=lambda store, result: [{"warning": w} for w in result.summary.get("warnings", [])] or None,
)
"""A photo set as a source: analyzed and ingested in one step."""
