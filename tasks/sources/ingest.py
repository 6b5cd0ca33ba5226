"""What both image sources (render folders, photo sets) share in their `ingest` stage.

The two ingest modules (tasks/sources/ingest_renders.py, tasks/sources/ingest_photos.py) write the same stage,
`ingest`, whose rows carry the columns the dataset stages read from `select` (item_id,
source_id, character, trigger, kind, cluster_id, path) plus each image's `caption`: the caption
stage keeps those (the pipelines bind its `given_captions` input to `ingest`) instead of generating new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
from PIL import Image, ImageOps
from pydantic import AfterValidator

STAGE = "ingest"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_trigger(value: str) -> str:
    """A trigger word: non-empty, no commas, tabs or newlines (raises ValueError naming the value)."""
    text = str(value).strip()
    if not text or re.search(r"[,\n\r\t]", text):
        raise ValueError(f"trigger must be a non-empty word without commas, tabs or newlines, got {value!r}")
    return text


def _check_name(value: str) -> str:
    if not value.strip():
        raise ValueError("name must not be empty")
    return value


TriggerWord = Annotated[Optional[str], AfterValidator(lambda v: check_trigger(v) if v is not None else None)]
"""An optional trigger word, checked by `check_trigger` when given."""
IdentityName = Annotated[Optional[str], AfterValidator(lambda v: _check_name(v) if v is not None else None)]
"""An optional identity name (a LoRA's name), refused when blank."""


def require_identity(params: Any) -> None:
    """Fail before work starts when a source's `name` or `trigger` is not set (the flows fill them in)."""
    for field in ("name", "trigger"):
        if not getattr(params, field):
            raise ValueError(f"ingest.{field} must be set, got {getattr(params, field)!r}")


def has_trigger(caption: str, trigger: str) -> bool:
    """The trigger occurs in the caption as a word (case-sensitive, as the validate stage checks)."""
    return bool(re.search(rf"(?<![\w]){re.escape(trigger)}(?![\w])", caption))


def with_trigger(caption: str, trigger: str) -> str:
    """The caption on one line, with the trigger word put in front when it does not occur in it."""
    text = " ".join(caption.split())
    if has_trigger(text, trigger):
        return text
    return f"{trigger}, {text}" if text else trigger


def read_caption(path: Path | None) -> str:
    """The stripped text of a caption file ('' when there is none)."""
    if path is None or not path.is_file():
        return ""
    return path.read_text(encoding="utf-8", errors="replace").strip()


def image_stats(path: Path) -> dict[str, Any]:
    """Size (after EXIF rotation), luma mean and std, and a small grayscale view of an image file.

    Raises ValueError saying why when the file cannot be read.
    """
    try:
        with Image.open(path) as im:
            im.load()
            oriented = im.getexif().get(0x0112, 1) not in (None, 1)
            upright = ImageOps.exif_transpose(im) if oriented else im
            size = upright.size
            gray = upright.convert("L")
            gray.thumbnail((256, 256))
            luma = np.asarray(gray, dtype=np.uint8)
    except Exception as exc:  # PIL raises many kinds for broken files: all mean unreadable
        if path.is_file() and path.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)") from None
        raise ValueError(f"unreadable image ({type(exc).__name__}: {str(exc)[:160]})") from None
    return {"width": size[0], "height": size[1], "mean": float(luma.mean()), "std": float(luma.std()),
            "gray": luma, "oriented": oriented}


def place_image(src: Path, dst: Path, oriented: bool = False) -> Path:
    """Put an input image into the run folder: hard-linked (or copied), or saved upright as PNG
    when it carries an EXIF rotation (the dataset stages do not read EXIF). Returns the file written."""
    if oriented:
        dst = dst.with_suffix(".png")
        with Image.open(src) as im:
            ImageOps.exif_transpose(im).save(dst)
        return dst
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def listing_digest(*folders: Path) -> str:
    """Identity of the files in folders (names, sizes, modification times), not their bytes."""
    entries = []
    for folder in folders:
        if folder.is_dir():
            entries += sorted((f"{folder.name}/{p.name}", p.stat().st_size, p.stat().st_mtime_ns)
                              for p in folder.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
