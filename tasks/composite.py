"""How a dataset image is made from a character layer: the one rendering caption and package share.

A character layer (RGBA, transparent around the character) is cropped to its alpha box,
scaled to fill a square canvas of `resolution` pixels and composited onto a plain colour or
onto a background layer (RGB, cover-cropped to the canvas). Where the character was cut by
the frame edge (its alpha touches the layer's edge), it stays against that canvas edge, so
framing survives rendering. The result is RGBA: RGB is the training image, alpha marks the
character (what a captioner may measure); packaging keeps it, dilated and feathered, as the
training image's loss mask (tasks/package.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image, ImageColor
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from tasks.run.store import RunStore

ALPHA_ON = 8
"""Alpha (0-255) above which a layer pixel belongs to the character."""


class RenderSpec(BaseModel):
    """Canvas of the packaged images (part of the caption and package fingerprints)."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(512, ge=64, le=4096, description="side of the square training images, pixels")
    background_color: str = Field("white", description="plain background colour (name or #rrggbb)")
    fill: float = Field(0.85, gt=0.1, le=1.0, description="share of the canvas the character's longer side fills")

    @field_validator("background_color")
    @classmethod
    def _colour(cls, value: str) -> str:
        try:
            ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(f"background_color must be a colour name or #rrggbb, got {value!r}") from None
        return value


def read_layer(path: Path) -> np.ndarray:
    """An RGBA uint8 array from an image file (RGB files get an opaque alpha).

    Raises ValueError when the file cannot be read or holds no visible pixel.
    """
    try:
        with Image.open(path) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA")).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image ({type(exc).__name__}: {exc})") from None
    if not (rgba[..., 3] > ALPHA_ON).any():
        raise ValueError("layer is fully transparent")
    return rgba


def read_background(path: Path) -> np.ndarray:
    """An RGB uint8 array from a background layer file."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB")).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable background ({type(exc).__name__}: {exc})") from None


def read_row_images(root: Path, row: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """A manifest row's layer and its background layer (if any), from the run folder `root`.

    Raises ValueError starting with the unreadable file's run-relative path.
    """
    try:
        layer = read_layer(root / row["path"])
    except ValueError as exc:
        raise ValueError(f"{row['path']}: {exc}") from None
    background_path = row.get("background_path")
    try:
        return layer, read_background(root / background_path) if background_path else None
    except ValueError as exc:
        raise ValueError(f"{background_path}: {exc}") from None


def alpha_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the character's pixels, exclusive ends."""
    ys, xs = np.nonzero(alpha > ALPHA_ON)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def cover(background: np.ndarray, size: int) -> np.ndarray:
    """Scale a background to cover a size x size square and crop its centre."""
    h, w = background.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    big = cv2.resize(background, (nw, nh), interpolation=interp)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    return np.ascontiguousarray(big[y0:y0 + size, x0:x0 + size])


CRUMB_SHARE = 0.1
"""A part of a layer smaller than this share of its largest part, and apart from it, is a crumb."""
CRUMB_GAP = 0.03
"""Apart: further from the largest part than this share of its longer side (and more than 2 pixels)."""


def drop_crumbs(layer: np.ndarray) -> np.ndarray:
    """The layer without its crumbs: bits of scenery the segmenter kept beside the figure (a leaf, a
    sign's corner). A part is a crumb when it is under CRUMB_SHARE of the largest part's area and further
    from it than the gap (a hand or a tuft of hair held apart from the body by a thin gap stays). Crumbs
    would otherwise widen the crop, shrinking the figure, and be learnt as part of it."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((layer[..., 3] > ALPHA_ON).astype(np.uint8), 8)
    if count <= 2:
        return layer
    areas = stats[1:, cv2.CC_STAT_AREA]
    main = 1 + int(np.argmax(areas))
    small = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] < CRUMB_SHARE * areas.max()]
    if not small:
        return layer
    distance = cv2.distanceTransform((labels != main).astype(np.uint8), cv2.DIST_L2, 3)
    gap = max(2.0, CRUMB_GAP * max(stats[main, cv2.CC_STAT_WIDTH], stats[main, cv2.CC_STAT_HEIGHT]))
    crumbs = [i for i in small if distance[labels == i].min() > gap]
    if not crumbs:
        return layer
    out = layer.copy()
    out[np.isin(labels, crumbs), 3] = 0
    return out


def render(layer: np.ndarray, background: np.ndarray | None, spec: RenderSpec) -> np.ndarray:
    """Composite one RGBA layer (without its crumbs) onto the canvas; returns RGBA (RGB image, alpha =
    character)."""
    size = spec.resolution
    layer = drop_crumbs(layer)
    x0, y0, x1, y1 = alpha_box(layer[..., 3])
    h, w = layer.shape[:2]
    touches = {"left": x0 == 0, "right": x1 == w, "top": y0 == 0, "bottom": y1 == h}
    crop = layer[y0:y1, x0:x1].astype(np.float32) / 255.0
    crop[..., :3] *= crop[..., 3:]  # premultiply so resizing does not bleed hidden colours
    scale = spec.fill * size / max(crop.shape[:2])
    if touches["top"] and touches["bottom"] or touches["left"] and touches["right"]:
        scale = size / max(crop.shape[:2])  # cut on both sides: fill the canvas across
    nw, nh = max(1, min(size, round(crop.shape[1] * scale))), max(1, min(size, round(crop.shape[0] * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    crop = np.clip(cv2.resize(crop, (nw, nh), interpolation=interp), 0.0, 1.0)
    crop[..., :3] = np.minimum(crop[..., :3], crop[..., 3:])  # cubic overshoot: colour never exceeds alpha
    px = 0 if touches["left"] and not touches["right"] else (size - nw if touches["right"] and not touches["left"] else (size - nw) // 2)
    py = 0 if touches["top"] and not touches["bottom"] else (size - nh if touches["bottom"] else (size - nh) // 2)
    if background is None:
        canvas = np.empty((size, size, 3), np.float32)
        canvas[:] = np.array(ImageColor.getrgb(spec.background_color)[:3], np.float32) / 255.0
    else:
        canvas = cover(background, size).astype(np.float32) / 255.0
    alpha = np.zeros((size, size), np.float32)
    alpha[py:py + nh, px:px + nw] = crop[..., 3]
    region = canvas[py:py + nh, px:px + nw]
    canvas[py:py + nh, px:px + nw] = crop[..., :3] + region * (1.0 - crop[..., 3:])
    out = np.empty((size, size, 4), np.uint8)
    out[..., :3] = to_uint8(canvas)
    out[..., 3] = to_uint8(alpha)
    return out


def to_uint8(values: np.ndarray) -> np.ndarray:
    """0..1 floats as 0..255 bytes, clipped first: a float above 1 never wraps to a dark byte."""
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def blank_reason(gray: np.ndarray, black_level: float = 10.0, uniform_std: float = 2.0) -> tuple[str, str] | None:
    """("black_image" | "uniform_image", detail) when a picture shows nothing, else None.

    `gray` is its luma (0-255). The validate stage's check; packaging uses it with the
    default thresholds to quarantine characters that vanish into a plain background.
    """
    mean, std = float(gray.mean()), float(gray.std())
    if mean < black_level and std < 4 * max(uniform_std, 1.0):
        return "black_image", f"mean luma {mean:.1f}"
    if std < uniform_std:
        return "uniform_image", f"luma std {std:.2f}"
    return None


def wrapped_pixels(rgb: np.ndarray, low: int = 40, high: int = 215, lit: int = 128, steady: int = 40) -> int:
    """How many pixels of an RGB uint8 image look like a byte that wrapped past 255.

    A wrapped pixel has one channel at or below `low` where that channel's 3x3 median is at or
    above `high`, its other channels within `steady` of their medians, and is not dark (brightest
    channel at least `lit`): bright red turned cyan, the mark of a float cast without a clip.
    """
    rgb = np.ascontiguousarray(rgb[..., :3])
    medians = np.dstack([cv2.medianBlur(np.ascontiguousarray(rgb[..., c]), 3) for c in range(3)])
    near = np.abs(rgb.astype(np.int16) - medians) <= steady
    wrapped = np.zeros(rgb.shape[:2], bool)
    for c in range(3):
        others = [k for k in range(3) if k != c]
        wrapped |= (rgb[..., c] <= low) & (medians[..., c] >= high) & near[..., others].all(axis=2)
    return int((wrapped & (rgb.max(axis=2) >= lit)).sum())


def background_layers(store: "RunStore", stage: str | None) -> list[str]:
    """Run-relative background layers (`background_path`) of the stage handed as a stage's `backgrounds`
    input: the segment stage of an episode run (none when there is no such input or it is not done).
    Where the stage checked its plates (`clean_plate`), only the clean ones: no character behind a swap."""
    if not stage or not store.is_done(stage):
        return []
    table = store.read_manifest(stage)
    if "background_path" not in table.column_names:
        return []
    rows = table.select([c for c in ("background_path", "clean_plate") if c in table.column_names]).to_pylist()
    checked = "clean_plate" in table.column_names and any(r["clean_plate"] is not None for r in rows)
    paths = sorted({r["background_path"] for r in rows if r["background_path"] and (not checked or r["clean_plate"])})
    return [p for p in paths if (store.root / p).is_file()]
