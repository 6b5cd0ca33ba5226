"""Stage `validate` (and `episode2lora validate DIR`): check a kohya training tree before training.

Checks of the Yokai guide's step 6, per image and caption pair: the image is readable and in
an accepted format, at least `min_resolution` on its short side, not of an extreme aspect
ratio, not black or uniform, without colours wrapped past 255 (a writer without a clip), not a
duplicate; its caption file exists, is not empty, holds
the trigger word (first) and is not very short; training folders are named
`<repeats>_<name>` as kohya expects. Errors fail the report (and stop the flow before
training); warnings are reported only (unless `fail_on_warnings`). RGBA images are not warned
`not_rgb` in folders whose dataset TOML subset sets kohya's `alpha_mask` (the alpha is the mask).

The report (JSON) counts issues by type and by character and lists every finding.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from models.lora_data import alpha_mask_folders
from tasks.composite import blank_reason, wrapped_pixels
from tasks.run.spec import GlobalStage, Inputs
from tasks.run.stage import StageResult
from tasks.run.store import RunStore, safe_name

STAGE = "validate"
VERSION = 2

ERRORS = ("unreadable_image", "bad_format", "low_resolution", "black_image", "uniform_image", "wrapped_colours",
          "caption_missing",
          "caption_empty", "trigger_missing", "bad_folder_name", "empty_folder", "no_training_folders")
WARNINGS = ("extreme_aspect_ratio", "not_rgb", "duplicate_image", "trigger_not_first", "short_caption",
            "orphan_caption", "stray_image")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER = re.compile(r"^(\d+)_(.+)$")
SKIPPED = {"configs", "validation"}

SCHEMA = pa.schema([
    ("item_id", pa.string()),      # the package row's item id (the path when unknown)
    ("source_id", pa.string()),
    ("character", pa.string()),
    ("split", pa.string()),
    ("path", pa.string()),         # relative to the run folder (stage) or to DIR (command)
    ("ok", pa.bool_()),            # no errors
    ("errors", pa.string()),       # comma-separated issue types
    ("warnings", pa.string()),
])


class ValidateParams(BaseModel):
    """Thresholds of the dataset checks."""

    model_config = ConfigDict(extra="forbid")

    min_resolution: int = Field(512, ge=1, description="shortest image side, pixels")
    max_aspect_ratio: float = Field(2.5, ge=1, description="long side / short side above this is extreme")
    min_caption_words: int = Field(3, ge=0, description="captions with fewer words after the trigger are very short")
    black_level: float = Field(10.0, ge=0, le=255, description="mean luma below this is a black image")
    uniform_std: float = Field(2.0, ge=0, description="luma std below this is a uniform image")
    formats: list[str] = Field(default_factory=lambda: ["PNG", "JPEG", "WEBP"], description="accepted image formats")
    max_wrapped_pixels: int = Field(0, ge=0, description="pixels with wrapped colours allowed per image")
    check_duplicates: bool = Field(True, description="flag identical images within a character")
    fail_on_warnings: bool = Field(False, description="warnings fail the report too")


def _triggers(root: Path) -> dict[str, str]:
    """Folder name -> trigger word, from `characters.parquet` when the tree has one."""
    path = root / "characters.parquet"
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["character", "trigger"]).to_pylist()
    return {safe_name(r["character"]): r["trigger"] for r in table}


class _Report:
    def __init__(self, root: Path, params: ValidateParams):
        self.root, self.params = root, params
        self.masked: set[str] = set()  # characters whose images carry their mask as alpha
        self.findings: list[dict] = []
        self.images: list[dict] = []
        self.characters: dict[str, dict] = {}

    def character(self, name: str) -> dict:
        return self.characters.setdefault(name, {"train": 0, "validation": 0, "errors": {}, "warnings": {}})

    def add(self, issue: str, path: Path, character: str | None, split: str | None, detail: str = "",
            image: dict | None = None) -> None:
        severity = "error" if issue in ERRORS else "warning"
        self.findings.append({"path": path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path),
                              "character": character, "split": split, "issue": issue, "severity": severity,
                              "detail": detail})
        if character is not None:
            bucket = self.character(character)["errors" if severity == "error" else "warnings"]
            bucket[issue] = bucket.get(issue, 0) + 1
        if image is not None:
            image["errors" if severity == "error" else "warnings"].append(issue)


def _check_image(path: Path, params: ValidateParams) -> tuple[list[tuple[str, str]], str | None]:
    """Issues of one image file, and a digest of its pixels (None when unreadable)."""
    issues: list[tuple[str, str]] = []
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.load()
            mode, (w, h) = im.mode, im.size
            rgb = np.asarray(im.convert("RGB"))
            gray = np.asarray(im.convert("L"), dtype=np.float32)
            digest = hashlib.sha256(im.tobytes()).hexdigest()
    except Exception as exc:  # PIL raises many kinds for broken files: all mean unreadable
        return [("unreadable_image", f"{type(exc).__name__}: {exc}"[:200])], None
    if fmt not in params.formats:
        issues.append(("bad_format", f"format {fmt}, accepted {', '.join(params.formats)}"))
    if mode != "RGB":
        issues.append(("not_rgb", f"mode {mode}"))
    if min(w, h) < params.min_resolution:
        issues.append(("low_resolution", f"{w}x{h} < {params.min_resolution}"))
    if max(w, h) / max(1, min(w, h)) > params.max_aspect_ratio:
        issues.append(("extreme_aspect_ratio", f"{w}x{h}"))
    blank = blank_reason(gray, params.black_level, params.uniform_std)
    if blank:
        issues.append(blank)
    wrapped = wrapped_pixels(rgb)
    if wrapped > params.max_wrapped_pixels:
        issues.append(("wrapped_colours", f"{wrapped} pixels whose colour wrapped past 255 (a writer without a clip)"))
    return issues, digest


def _check_caption(path: Path, trigger: str | None, params: ValidateParams) -> list[tuple[str, str]]:
    if not path.is_file():
        return [("caption_missing", f"no {path.name}")]
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        return [("caption_empty", "")]
    issues = []
    words = re.findall(r"[\w'-]+", text)
    if trigger:
        first = text.split(",")[0].strip()
        if not re.search(rf"(?<![\w]){re.escape(trigger)}(?![\w])", text):
            return [("trigger_missing", f"'{trigger}' not in caption")]
        if first != trigger:
            issues.append(("trigger_not_first", f"starts with '{first[:40]}'"))
        words = re.findall(r"[\w'-]+", re.sub(rf"(?<![\w]){re.escape(trigger)}(?![\w])", " ", text))
    if len(words) < params.min_caption_words:
        issues.append(("short_caption", f"{len(words)} words"))
    return issues


def _check_folder(report: _Report, folder: Path, character: str, split: str, trigger: str | None) -> None:
    params = report.params
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images and split == "train":
        report.add("empty_folder", folder, character, split, "no images")
    stems = {p.stem for p in images}
    for txt in sorted(folder.glob("*.txt")):
        if txt.stem not in stems:
            report.add("orphan_caption", txt, character, split, "no image with this name")
    seen: dict[str, Path] = report.character(character).setdefault("_digests", {})
    for path in images:
        image = {"path": path, "character": character, "split": split, "errors": [], "warnings": []}
        report.images.append(image)
        report.character(character)[split] += 1
        issues, digest = _check_image(path, params)
        if character in report.masked:  # alpha_mask subsets: RGBA carries the character mask
            issues = [i for i in issues if i != ("not_rgb", "mode RGBA")]
        if digest is not None and params.check_duplicates:
            if digest in seen:
                issues.append(("duplicate_image", f"same pixels as {seen[digest].name}"))
            else:
                seen[digest] = path
        issues += _check_caption(path.with_suffix(".txt"), trigger, params)
        for issue, detail in issues:
            report.add(issue, path, character, split, detail, image)


def validate_dataset(root: Path, params: ValidateParams, triggers: dict[str, str] | None = None) -> dict[str, Any]:
    """Check a kohya tree (`{repeats}_{name}/`, `validation/{name}/`); return the report.

    Args:
        root: the tree's folder (a run's `package/` folder, or any kohya train_data_dir).
        params: thresholds.
        triggers: folder name -> trigger word; default from `root/characters.parquet`, else the
            folder name's part after `<repeats>_` (kohya's class token).
    Returns:
        the report: passed, counts, issues by type and by character, findings, per-image results.
    """
    root = Path(root)
    triggers = dict(triggers if triggers is not None else _triggers(root))
    report = _Report(root, params)
    report.masked = {m.group(2) for f in alpha_mask_folders(root) if (m := FOLDER.match(f))}
    training = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(".") or entry.name in SKIPPED:
            continue
        if entry.is_file():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                report.add("stray_image", entry, None, None, "images must be inside <repeats>_<name>/ folders")
            continue
        match = FOLDER.match(entry.name)
        if not match or int(match.group(1)) < 1:
            report.add("bad_folder_name", entry, None, None, "kohya expects <repeats>_<name>, repeats >= 1")
            continue
        training.append((entry, match.group(2)))
    if not training:
        report.add("no_training_folders", root, None, None, "no <repeats>_<name>/ folder")
    for folder, name in training:
        _check_folder(report, folder, name, "train", triggers.get(name, name))
    validation = root / "validation"
    if validation.is_dir():
        for folder in sorted(p for p in validation.iterdir() if p.is_dir() and not p.name.startswith(".")):
            _check_folder(report, folder, folder.name, "validation", triggers.get(folder.name, folder.name))
    return _assemble(report)


def _assemble(report: _Report) -> dict[str, Any]:
    errors: dict[str, int] = {}
    warnings: dict[str, int] = {}
    for f in report.findings:
        bucket = errors if f["severity"] == "error" else warnings
        bucket[f["issue"]] = bucket.get(f["issue"], 0) + 1
    for info in report.characters.values():
        info.pop("_digests", None)
    images = report.images
    failed = bool(errors) or (report.params.fail_on_warnings and bool(warnings))
    return {
        "root": str(report.root),
        "passed": not failed,
        "images": len(images),
        "valid": sum(not i["errors"] for i in images),
        "invalid": sum(bool(i["errors"]) for i in images),
        "with_warnings": sum(bool(i["warnings"]) for i in images),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "warnings": dict(sorted(warnings.items(), key=lambda kv: -kv[1])),
        "characters": report.characters,
        "findings": report.findings,
        "per_image": [{**i, "path": i["path"].relative_to(report.root).as_posix()} for i in images],
        "params": report.params.model_dump(mode="json"),
    }


def format_summary(report: dict[str, Any]) -> str:
    """The printed summary (like the Yokai guide's)."""
    n = report["images"]
    share = f" ({100.0 * report['valid'] / n:.1f}%)" if n else ""
    lines = ["Validation Summary", "==================", f"  Total images: {n}",
             f"  Valid images: {report['valid']}{share}", f"  Invalid images: {report['invalid']}",
             f"  Images with warnings: {report['with_warnings']}"]
    if report["errors"]:
        lines += ["", "Errors:"] + [f"  - {k}: {v}" for k, v in report["errors"].items()]
    if report["warnings"]:
        lines += ["", "Warnings:"] + [f"  - {k}: {v}" for k, v in report["warnings"].items()]
    if report["characters"]:
        lines += ["", "Per character:"]
        for name, info in sorted(report["characters"].items()):
            issues = sum(info["errors"].values())
            lines.append(f"  {name}: {info['train']} train, {info['validation']} validation, "
                         f"{issues} errors, {sum(info['warnings'].values())} warnings")
    lines += ["", "VALIDATION PASSED - training data is ready" if report["passed"]
              else "VALIDATION FAILED - fix the errors above before training"]
    return "\n".join(lines)


def tree_root(directory: Path) -> Path:
    """The kohya tree of DIR: DIR itself, or DIR/package when DIR is a run folder."""
    directory = Path(directory)
    return directory / "package" if (directory / "package" / "characters.parquet").is_file() else directory


# ---- the stage ---------------------------------------------------------------------------------------

class DatasetInvalidError(RuntimeError):
    """The validation report of a run's package has errors; training must not start."""


def build_validate(store: RunStore, params: Any, inputs: Inputs, folder: Path) -> tuple[pa.Table, dict, list[str]]:
    """Validate the tree of the `package` input into `validate/report.json` and a per-image manifest."""
    package = inputs["package"].stage
    tree = store.stage_dir(package)
    report = validate_dataset(tree, params.validate)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    manifest = store.read_manifest(package)
    ids = {p: i for p, i in zip(manifest.column("path").to_pylist(), manifest.column("item_id").to_pylist()) if p}
    prefix = tree.relative_to(store.root).as_posix()
    rows = [_image_row(image, f"{prefix}/{image['path']}", ids) for image in report["per_image"]]
    summary = {"passed": report["passed"], "images": report["images"], "kept": report["valid"],
               "invalid": report["invalid"], "errors": report["errors"], "warnings": report["warnings"],
               "report": f"{STAGE}/report.json"}
    return pa.Table.from_pylist(rows, schema=SCHEMA), summary, [f"{STAGE}/report.json"]


def _image_row(image: dict[str, Any], path: str, ids: dict[str, str]) -> dict[str, Any]:
    """The manifest row of one checked image (`path` run-relative; `ids`: package path -> item id)."""
    return {"item_id": ids.get(path, path), "source_id": ids.get(path), "character": image["character"],
            "split": image["split"], "path": path, "ok": not image["errors"],
            "errors": ",".join(image["errors"]) or None, "warnings": ",".join(image["warnings"]) or None}


def _issue_rows(store: RunStore, result: StageResult) -> list[dict]:
    """The issue counts of a finished validation, for the UI."""
    return [{"issue": k, "count": v} for k, v in {**result.summary["errors"], **result.summary["warnings"]}.items()]


def check_passed(result: StageResult, store: RunStore) -> None:
    """Raise DatasetInvalidError (naming the issues and the report) when validation failed."""
    if result.summary.get("passed", False):
        return
    issues = ", ".join(f"{k}: {v}" for k, v in result.summary.get("errors", {}).items()) or "warnings (fail_on_warnings)"
    raise DatasetInvalidError(
        f"dataset validation failed ({issues}); training will not start. "
        f"See {store.root / STAGE / 'report.json'}, fix the package (or the stage parameters) and resume.")


VALIDATE = GlobalStage(name=STAGE, version=VERSION, params=ValidateParams, inputs=("package",), title="validate",
                       build=build_validate, rows=_issue_rows)
"""The validate stage: the packaged dataset checked; `check_passed` stops a run before training."""
