"""Stage `segment`: character RGBA layers (one per instance) and inpainted background layers.

Per kept frame a segmenter (models/segmenters.py) gives a soft foreground mask. Its
thresholded pixels are split into instances: nearby parts of one figure are joined
(`join_distance`), specks below `min_area_frac` are dropped, and each instance becomes an
RGBA layer cropped to its box plus a margin, alpha from the mask. The characters are then
removed from the frame and the holes inpainted (OpenCV) to give a background layer. A layer
that glues moving parts to static scenery is cut down to its moving parts, and with
`split_pairs` a layer that holds two figures side by side (two heads, one mask) is cut in two
(tasks/characterness.py); the pieces keep the number of the layer they came from in
`split_from`. With `trim_static`, the static parts glued to a moving layer are trimmed off it
(`kept_share`: what is left of the instance); `cut_edges` names the frame edges a layer touches.
Each layer is searched for an anime face (`faces`); a faceless piece right under a face-holding one
(a mask that misses a dark neck or collar cuts a bust in two) is joined to it.
Each layer keeps its shot and its `look` (a small grey thumbnail of its own pixels) so that the
tier stage can tell set scenery recurring across the whole run (tasks/tier.py). With `plate_check`, the background layer of each
shot's least covered frame is checked: motion against the shot outside the inpainted holes, then (unless
that already rules it out) the segmenter again; where nothing is found it is a `clean_plate`, and
only clean plates serve background swaps (tasks/composite.background_layers).
Frames whose mask is nearly empty or nearly the whole frame are flagged, not passed on.

Work is sharded per episode in chunks of `shard_size` frames (`<episode>-<chunk:04d>`), so a
killed run redoes at most one chunk. Files of a shard::

    segment/shards/<key>/character/<frame_index>_<instance>.png   RGBA layer
    segment/shards/<key>/mask/<frame_index>.png                    full-frame soft mask (L)
    segment/shards/<key>/background/<frame_index>.png              RGB, characters inpainted

One manifest row per layer (`instance` 1, 2, ...); a frame without layers (empty or full
mask, only specks, quarantined) gets one row with `instance` 0 and `kept` false.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


from tasks.characterness import AlignedShot
from tasks.run.progress import StageProgress
from tasks.run.spec import Inputs, ShardedStage
from tasks.run.stage import Plan, Shard, StageResult, merge_shard_parts, run_shard
from tasks.run.store import QUARANTINE, RunStore, fingerprint, write_error

STAGE = "segment"
FRAME_THREADS = 2
"""Threads that layer a shot's frames (the segmenter runs on its own threads, between shots)."""
VERSION = 9  # 9: a faceless piece under a face-holding one joins it (a bust cut at the neck by its mask); 8: shots aligned on background features (ORB outside the masks, RANSAC similarity), the dense fit
# only where they do not settle a pair (zoom shots were off by 20-70 px); 7: backgrounds inpainted at half size; 6: `shot_id` and `look` per layer, recurrence judged
# run-wide by tier; 5: a plate the motion already rules out is not segmented again (plate_residual: the motion's share)

SCHEMA = pa.schema([
    ("item_id", pa.string()),          # <frame item_id>:<instance:02d>
    ("source_id", pa.string()),        # the frame's item_id
    ("episode", pa.string()),
    ("frame_index", pa.int64()),
    ("instance", pa.int32()),          # 1.. for layers, 0 for a frame-level row without a layer
    ("bbox", pa.list_(pa.int32())),    # [x0, y0, x1, y1] in frame pixels, x1/y1 exclusive
    ("area_frac", pa.float32()),       # instance pixels / frame pixels
    ("alpha_coverage", pa.float32()),  # opaque fraction of the layer image
    ("confidence", pa.float32()),      # mean mask value over the layer's pixels
    ("model", pa.string()),
    ("width", pa.int32()),             # frame size
    ("height", pa.int32()),
    ("path", pa.string()),             # RGBA layer
    ("mask_path", pa.string()),        # full-frame mask
    ("background_path", pa.string()),  # RGB background with the characters inpainted
    ("flag", pa.string()),             # null, "mask_empty", "mask_full"
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
    ("motion", pa.float32()),           # share of the layer's pixels that move against its shot (null: no cue)
    ("character_score", pa.float32()),  # 0-1 character-ness (tasks/characterness.py); null: not scored
    ("character_reasons", pa.string()), # why, "; "-joined
    ("split_from", pa.int32()),         # the glued instance a split layer came from (null: not split)
    ("faces", pa.int32()),              # anime faces found on the layer (null: not looked for)
    ("face_box", pa.list_(pa.int32())), # the likeliest face's [x0, y0, x1, y1] in frame pixels
    ("face_likelihood", pa.float32()),
    ("face_colours", pa.string()),      # JSON {"hair", "eyes", "skin": [r, g, b] | null} of that face
    ("kept_share", pa.float32()),       # share of the instance's pixels left after static parts were trimmed
    ("cut_edges", pa.string()),         # frame edges the layer touches ("top,left"; "": none): cut by the frame
    ("plate_residual", pa.float32()),   # share of the background layer that still looks like a character (null: not checked)
    ("clean_plate", pa.bool_()),        # the background layer holds no character: a plate for background swaps
    ("shot_id", pa.int32()),            # the frame's shot in its episode (null: none)
    ("look", pa.list_(pa.float32())),   # the layer's grey LOOK_SIDE^2 thumbnail (tasks/characterness.look_of)
])


def known_name(check: Callable[[str], str], name: str) -> str:
    """`check(name)` (a model registry's name check), its KeyError a ValueError for pydantic."""
    try:
        return check(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


class SegmentParams(BaseModel):
    """How frames are split into character layers and background layers."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("u2netp", description="segmenter: a rembg model name ('isnet-anime' is the recommended "
                       "model for anime; 'u2netp' is the offline default) or 'custom:<path to .onnx>'")
    threshold: float = Field(0.5, gt=0, lt=1, description="mask value (0-1) at which a pixel counts as character")
    min_area_frac: float = Field(0.01, ge=0, lt=1, description="instances smaller than this fraction of the frame are specks")
    min_confidence: float = Field(0.8, ge=0, le=1, description="layers whose mean mask value is below this are "
                                  "dropped as 'faint' (half-detected clouds, glows, background shapes)")
    join_distance: int = Field(6, ge=0, le=512, description="pixels: parts of a figure closer than this are one instance")
    margin: int = Field(8, ge=0, le=1024, description="pixels added around an instance's box when cropping its layer")
    alpha_matting: bool = Field(False, description="refine layer alpha by closed-form matting (slow)")
    batch_size: int = Field(8, ge=1, le=1024, description="frames per segmenter call")
    shard_size: int = Field(64, ge=1, description="frames per shard (the unit of resume)")
    empty_mask_frac: float = Field(0.002, ge=0, lt=1, description="masks covering less than this are flagged mask_empty")
    full_mask_frac: float = Field(0.9, gt=0, le=1, description="masks covering more than this are flagged mask_full")
    inpaint_radius: int = Field(3, ge=1, le=64, description="pixels: OpenCV inpainting radius for the background layer")
    motion_tolerance: int = Field(40, ge=1, le=255, description="colour step (0-255) at which a pixel differs from the "
                                  "shot's other frames (aligned on the camera motion)")
    moving_share: float = Field(0.3, gt=0, le=1, description="share of a layer's pixels moving against the shot that "
                                "counts as fully character-like (character_score 1)")
    split_glued: bool = Field(True, description="cut a layer that glues moving parts to static scenery down to the moving parts")
    glued_max_share: float = Field(0.7, gt=0, lt=1, description="a layer is glued when its moving parts cover at most "
                                   "this share of it and the static rest is not a speck")
    split_pairs: bool = Field(False, description="cut a layer that holds two figures side by side (two heads, one "
                              "mask), both moving against the shot, into one layer per figure (off by default: on "
                              "u2netp masks of the generated footage it cuts more single figures than it finds pairs)")
    pair_valley: float = Field(0.35, gt=0, lt=1, description="two heads when the column profile of a layer's top "
                               "fifth dips between two peaks to at most this share of the lower peak")
    faces: str = Field("animeface", description="anime face detector run on every layer (models/faces.py): "
                       "'animeface' (offline, libnvxs), 'none', or a YOLO-style face/head .onnx; a layer that holds "
                       "a face is character material whatever its motion or its edges")
    face_min_likelihood: float = Field(0.7, gt=0, le=1, description="detector likelihood at which a face counts")
    face_pad: float = Field(0.25, ge=0, le=1, description="grey border (share of the layer's shorter side) so that a "
                            "face filling a close-up or cut by the frame's edge is found")
    trim_static: bool = Field(True, description="trim the static parts glued to a moving layer (a sign, the sun, "
                              "a roof it touches); a figure that does not move is never trimmed")
    plate_check: bool = Field(True, description="segment the background layer of each shot's least covered frame "
                              "again; only plates where nothing is found are used for background swaps (no second "
                              "character behind an augmented image)")
    plate_max_residual: float = Field(0.02, ge=0, lt=1, description="a checked background layer is a clean plate when "
                                      "less than this share of it still looks like a character (segmenter at half "
                                      "the threshold, or motion against the shot outside the inpainted holes)")
    detector: str | None = Field(None, description="path of an anime person / head detector .onnx (YOLO-style outputs); "
                                 "layers that overlap no detection are dropped as 'no_detection'")
    detector_threshold: float = Field(0.35, gt=0, lt=1, description="detector confidence that counts as a detection")
    detector_overlap: float = Field(0.3, gt=0, le=1, description="share of a detection box a layer's box must cover to be kept")

    @field_validator("faces")
    @classmethod
    def _known_faces(cls, name: str) -> str:
        from models.faces import check_face_detector

        return known_name(check_face_detector, name)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from models.segmenters import check_model_name

        return known_name(check_model_name, name)

    @model_validator(mode="after")
    def _flags_ordered(self) -> "SegmentParams":
        if self.empty_mask_frac >= self.full_mask_frac:
            raise ValueError(f"empty_mask_frac must be < full_mask_frac, got {self.empty_mask_frac} >= {self.full_mask_frac}")
        return self

    def fingerprint_settings(self) -> dict[str, Any]:
        """The settings in the stage's fingerprint: `params_affecting_output`."""
        return params_affecting_output(self)


def params_affecting_output(params: SegmentParams) -> dict[str, Any]:
    """Parameters in the fingerprint (batch size changes speed, not output)."""
    from models.segmenters import model_identity

    unused = {"batch_size"}
    if not params.detector:
        unused |= {"detector", "detector_threshold", "detector_overlap"}
    if not params.split_glued:
        unused |= {"glued_max_share"}
    if not params.split_pairs:
        unused |= {"split_pairs", "pair_valley"}
    if params.faces == "none":
        unused |= {"faces", "face_min_likelihood", "face_pad"}  # off: as before faces were looked for
    if not params.trim_static:
        unused |= {"trim_static"}  # off: as before layers were trimmed
    if not params.plate_check:
        unused |= {"plate_check", "plate_max_residual"}  # off: as before plates were checked
    settings = params.model_dump(mode="json", exclude=unused)
    settings["model"] = model_identity(params.model)
    if params.detector:
        from models.detectors import detector_identity

        settings["detector"] = detector_identity(params.detector)
    if params.faces != "none":
        settings["faces"] = face_finder(params).identity()
    return settings


def face_finder(params: SegmentParams) -> Any:
    """The face detector `segment.faces` names (None for 'none'); the grey border only for animeface."""
    from models.faces import DEFAULT, face_detector

    if params.faces == "none":
        return None
    return face_detector(params.faces, pad=params.face_pad) if params.faces == DEFAULT else face_detector(params.faces)


def face_fields(finder: Any, layer: np.ndarray, offset: tuple[int, int], min_likelihood: float) -> dict[str, Any]:
    """The face columns of one RGBA layer whose top-left corner is at `offset` in its frame."""
    import json

    if finder is None:
        return {}
    faces = [f for f in finder.detect([layer])[0] if f.likelihood >= min_likelihood]
    if not faces:
        return {"faces": 0}
    best = max(faces, key=lambda f: f.likelihood)
    x0, y0, x1, y1 = best.box
    colours = {k: v for k, v in best.row().items() if k in ("hair", "eyes", "skin")}
    return {"faces": len(faces), "face_box": [x0 + offset[0], y0 + offset[1], x1 + offset[0], y1 + offset[1]],
            "face_likelihood": float(best.likelihood), "face_colours": json.dumps(colours)}


# ---- one frame ------------------------------------------------------------------------------

def split_instances(mask: np.ndarray, params: SegmentParams) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Threshold a soft mask and split it into instances.

    Returns (binary mask, [(instance pixels, instance region)]) sorted left to right; the region
    is the instance's joined area (pixels grown by `join_distance`), where its soft alpha lives.
    """
    binary = (mask >= params.threshold).astype(np.uint8)
    joined = binary
    if params.join_distance > 0:
        r = (params.join_distance + 1) // 2  # both sides grow, so gaps up to join_distance close
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        joined = cv2.dilate(binary, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    min_pixels = params.min_area_frac * mask.size
    found = []
    for k in range(1, count):
        x, y, w, h, joined_area = stats[k]
        if joined_area < min_pixels:  # its own pixels are fewer still: a speck
            continue
        region = np.zeros_like(binary, dtype=bool)
        region[y:y + h, x:x + w] = labels[y:y + h, x:x + w] == k
        pixels = region & (binary > 0)
        area = int(pixels.sum())
        if area and area >= min_pixels:
            found.append((int(x), pixels, region))
    found.sort(key=lambda f: f[0])
    return binary.astype(bool), [(pixels, region) for _, pixels, region in found]


def cut_edges(bbox: list[int], width: int, height: int) -> str:
    """The frame edges a layer's box touches, comma-joined ("" when none): where the frame cut it."""
    x0, y0, x1, y1 = bbox
    touched = {"top": y0 <= 0, "bottom": y1 >= height, "left": x0 <= 0, "right": x1 >= width}
    return ",".join(edge for edge, yes in touched.items() if yes)


def bbox_of(pixels: np.ndarray) -> list[int]:
    ys, xs = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] + 1), int(ys[-1] + 1)]


def inpaint_background(image: np.ndarray, binary: np.ndarray, radius: int) -> np.ndarray:
    """The frame with the masked pixels (grown by 2 px for soft edges) inpainted (Telea).

    The fill is computed at half size (a quarter of the work; Telea's fill is smooth anyway), from
    half-size pixels that touch no hole, and pasted into the holes only: the rest stays the frame's.
    """
    holes = cv2.dilate(binary.astype(np.uint8) * 255, np.ones((5, 5), np.uint8))
    if not holes.any():
        return image
    h, w = holes.shape
    half = ((w + 1) // 2, (h + 1) // 2)
    small_holes = (cv2.resize(holes, half, interpolation=cv2.INTER_AREA) > 0).astype(np.uint8) * 255
    small = cv2.inpaint(cv2.resize(image, half, interpolation=cv2.INTER_AREA), small_holes,
                        max(1, radius // 2), cv2.INPAINT_TELEA)
    filled = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    background = image.copy()
    background[holes > 0] = filled[holes > 0]
    return background


PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
"""Fast lossless PNGs: on 960x540 frames of flat-coloured footage run-length zlib writes a background in
32 ms, 111 KiB (the default strategy: 42 ms, 146 KiB)."""


def _write_png(path: Path, image: np.ndarray) -> None:
    if image.ndim == 3:
        code = cv2.COLOR_RGBA2BGRA if image.shape[2] == 4 else cv2.COLOR_RGB2BGR
        image = cv2.cvtColor(image, code)
    if not cv2.imwrite(str(path), image, PNG_OPTIONS):
        raise write_error(path)


def read_frame(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(RGB image, None) or (None, reason) for a missing, unreadable or odd frame file."""
    if not path.is_file():
        return None, "file missing"
    if path.stat().st_size == 0:
        return None, "empty file (0 bytes)"
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()  # decode fully: truncated files fail here, not later
            image = np.asarray(opened.convert("RGB"))
    except Exception as exc:  # PIL raises many kinds: all mean "cannot read this image"
        return None, f"unreadable or corrupt image ({type(exc).__name__}: {exc})"[:300]
    if min(image.shape[:2]) < 8:
        return None, f"image too small ({image.shape[1]}x{image.shape[0]})"
    return image, None


def _frame_row(frame: dict, model: str, **values: Any) -> dict:
    row = {name: None for name in SCHEMA.names}
    row.update(item_id=f"{frame['item_id']}:00", source_id=frame["item_id"], episode=frame["episode"],
               frame_index=frame["frame_index"], instance=0, model=model, shot_id=frame.get("shot_id"),
               width=frame.get("width"), height=frame.get("height"), kept=False)
    row.update(values)
    return row


def split_glued_instances(instances: list[tuple[np.ndarray, np.ndarray]], motion: Any, params: SegmentParams
                          ) -> list[tuple[np.ndarray, np.ndarray, int | None, str | None]]:
    """Instances with each glued one (moving parts + static scenery) replaced by its moving parts,
    and each piece that holds two figures side by side, both moving against the shot, cut into two.

    Returns (pixels, region, number of the instance it came from or None, why it was cut or None).
    """
    from tasks.characterness import motion_share, split_glued, split_pair

    out: list[tuple[np.ndarray, np.ndarray, int | None, str | None]] = []
    min_pixels = params.min_area_frac * (instances[0][0].size if instances else 0)
    for number, (pixels, region) in enumerate(instances, start=1):
        parts = split_glued(motion, pixels, min_pixels, max_share=params.glued_max_share,
                            reach=max(params.join_distance, round(0.03 * max(pixels.shape)))) if params.split_glued else None
        pieces = [(pixels, region, None, None)] if parts is None else \
            [(part, part, number, f"cut from glued layer {number:02d}") for part in parts]
        for piece, area, split_from, why in pieces:
            pair = split_pair(piece, min_pixels, valley=params.pair_valley) if params.split_pairs else None
            if pair is not None and not all((motion_share(motion, side) or 0.0) >= params.moving_share / 2
                                            for side in pair[:2]):
                pair = None  # a figure beside a static tree, a cloud, a building: not two figures
            if pair is None:
                out.append((piece, area, split_from, why))
                continue
            left, right, cut = pair
            column = np.arange(piece.shape[1])[None, :]
            out += [(left, area & (column < cut), number, f"one of two figures side by side in layer {number:02d}"),
                    (right, area & (column >= cut), number, f"one of two figures side by side in layer {number:02d}")]
    return out


@dataclass
class Piece:
    """One layer-to-be of a frame: its pixels, the region where its soft alpha lives, where it came from."""

    pixels: np.ndarray
    region: np.ndarray
    split_from: int | None
    reasons: list[str]
    whole: int  # its pixels before static parts were trimmed
    untrimmed: tuple[np.ndarray, np.ndarray]  # (pixels, region) before that trimming
    face: dict[str, Any] = field(default_factory=dict)  # its face columns (`face_fields`)
    layer: tuple[np.ndarray, tuple[int, int]] | None = None  # its `crop_layer`, once made

    def box(self, margin: int = 0) -> tuple[int, int, int, int]:
        """Its pixels' box grown by `margin`, clipped to the frame."""
        x0, y0, x1, y1 = bbox_of(self.pixels)
        h, w = self.pixels.shape
        return max(x0 - margin, 0), max(y0 - margin, 0), min(x1 + margin, w), min(y1 + margin, h)


def crop_layer(piece: Piece, rgb: np.ndarray, alpha: np.ndarray, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The RGBA layer of a piece (its box plus `margin`, alpha from the soft mask inside its region) and
    the layer's top-left corner in the frame."""
    cx0, cy0, cx1, cy1 = piece.box(margin)
    layer_alpha = np.where(piece.region[cy0:cy1, cx0:cx1], alpha[cy0:cy1, cx0:cx1], 0.0)
    layer_alpha = np.clip(layer_alpha * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.dstack([rgb[cy0:cy1, cx0:cx1], layer_alpha]), (cx0, cy0)


def body_below(face: dict[str, Any], head: Piece, body: Piece) -> bool:
    """Whether a faceless `body` continues the figure whose face `head` holds: it starts under the face's
    middle, within half a face height of the head's bottom, and reaches under the face's centre (a mask
    that misses a dark neck or collar cuts a bust in two)."""
    fx0, fy0, fx1, fy1 = face["face_box"]
    _, _, _, head_bottom = bbox_of(head.pixels)
    bx0, by0, bx1, _ = bbox_of(body.pixels)
    face_height = fy1 - fy0
    return by0 >= (fy0 + fy1) / 2 and by0 - head_bottom <= face_height / 2 and bx0 <= (fx0 + fx1) / 2 < bx1


def join_bodies_to_faces(pieces: list[Piece]) -> list[Piece]:
    """Pieces with each faceless one that continues a face-holding piece below its face (`body_below`)
    joined to it, untrimmed (the face says the whole body is figure); the others as they are, in order."""
    heads = [p for p in pieces if p.face.get("face_box")]
    joined: dict[int, Piece] = {}
    for body in pieces:
        if body.face.get("faces") or not heads:
            continue
        below = [h for h in heads if body_below(h.face, h, body)]
        if below:
            head = min(below, key=lambda h: bbox_of(body.pixels)[1] - bbox_of(h.pixels)[3])
            joined[id(body)] = head
    out = []
    for piece in pieces:
        if id(piece) in joined:
            continue
        bodies = [b for b in pieces if joined.get(id(b)) is piece]
        for body in bodies:
            pixels, region = body.untrimmed
            bridge = np.zeros_like(region)
            fx0, _, fx1, _ = piece.face["face_box"]
            bridge[bbox_of(piece.pixels)[3] - 1:bbox_of(pixels)[1] + 1, fx0:fx1] = True
            piece = Piece(piece.pixels | pixels, piece.region | region | bridge, piece.split_from,
                          piece.reasons + [f"joined with the body below its face ({body.whole} px)"],
                          piece.whole + body.whole, piece.untrimmed, piece.face)
        out.append(piece)
    return out


def layer_frame(frame: dict, image: np.ndarray, mask: np.ndarray, params: SegmentParams, model: str,
                out: Path, prefix: str, motion: Any = None, detections: np.ndarray | None = None,
                finder: Any = None) -> list[dict]:
    """Write one frame's mask, background and character layers; return its manifest rows.

    `motion`: the frame's tasks.characterness.ShotMotion (None: no other frame of its shot);
    `detections`: detector boxes (N, 4) when a detector gates the layers; `finder`: the face
    detector (None: faces are not looked for).
    """
    from tasks.characterness import character_score, look_of, motion_share, trim_static_parts

    h, w = mask.shape
    stem = f"{frame['frame_index']:07d}"
    _write_png(out / "mask" / f"{stem}.png", np.clip(mask * 255 + 0.5, 0, 255).astype(np.uint8))
    mask_path = f"{prefix}/mask/{stem}.png"
    binary, instances = split_instances(mask, params)
    coverage = float(binary.mean())
    base = {"width": w, "height": h, "mask_path": mask_path}
    if coverage > params.full_mask_frac:
        return [_frame_row(frame, model, **base, area_frac=coverage, flag="mask_full", drop_reason="mask_full")]
    background = inpaint_background(image, binary, params.inpaint_radius)
    _write_png(out / "background" / f"{stem}.png", background)
    base["background_path"] = f"{prefix}/background/{stem}.png"
    if coverage < params.empty_mask_frac:
        return [_frame_row(frame, model, **base, area_frac=coverage, flag="mask_empty", drop_reason="mask_empty")]
    if not instances:
        return [_frame_row(frame, model, **base, area_frac=coverage, drop_reason="no_layers")]
    rgb, alpha = image, mask
    if params.alpha_matting:
        from models.segmenters import alpha_matte

        matte = alpha_matte(image, mask)
        rgb, alpha = matte[..., :3], matte[..., 3].astype(np.float32) / 255.0
    pieces = []
    for pixels, region, split_from, why in split_glued_instances(instances, motion, params):
        whole, untrimmed = int(pixels.sum()), (pixels, region)
        kept = trim_static_parts(motion, pixels, moving_share=params.moving_share) if params.trim_static else None
        if kept is not None:
            region = (region & ~(cv2.dilate((pixels & ~kept).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)) | kept
            pixels = kept
        reasons = [why] if why is not None else []
        if kept is not None:
            reasons.append(f"static parts trimmed ({1 - pixels.sum() / whole:.0%} of it)")
        piece = Piece(pixels, region, split_from, reasons, whole, untrimmed)
        piece.layer = crop_layer(piece, rgb, alpha, params.margin)
        piece.face = face_fields(finder, *piece.layer, params.face_min_likelihood)
        pieces.append(piece)
    rows = []
    for number, piece in enumerate(join_bodies_to_faces(pieces), start=1):
        pixels = piece.pixels
        x0, y0, x1, y1 = bbox_of(pixels)
        layer, _ = piece.layer or crop_layer(piece, rgb, alpha, params.margin)
        layer_alpha = layer[..., 3]
        name = f"{stem}_{number:02d}.png"
        _write_png(out / "character" / name, layer)
        face = piece.face
        confidence = float(mask[pixels].mean())
        moving = motion_share(motion, pixels)
        score, reasons = character_score(moving, [x0, y0, x1, y1], pixels, confidence,
                                         moving_share=params.moving_share, face=face.get("face_likelihood"))
        reasons += piece.reasons
        drop = "faint" if confidence < params.min_confidence else None
        if drop is None and detections is not None:
            from models.detectors import overlaps_detection

            if not overlaps_detection([x0, y0, x1, y1], detections, params.detector_overlap):
                drop = "no_detection"
        rows.append({
            "item_id": f"{frame['item_id']}:{number:02d}", "source_id": frame["item_id"],
            "episode": frame["episode"], "frame_index": frame["frame_index"], "instance": number,
            "bbox": [x0, y0, x1, y1], "area_frac": float(pixels.sum()) / (w * h),
            "alpha_coverage": float((layer_alpha >= 128).mean()), "model": model,
            "width": w, "height": h, "path": f"{prefix}/character/{name}",
            "mask_path": mask_path, "background_path": base["background_path"],
            "confidence": confidence, "flag": None, "kept": drop is None, "drop_reason": drop,
            "motion": moving, "character_score": score, "character_reasons": "; ".join(reasons),
            "split_from": piece.split_from, "kept_share": float(pixels.sum()) / max(piece.whole, 1),
            "cut_edges": cut_edges([x0, y0, x1, y1], w, h), **face,
            "shot_id": frame.get("shot_id"), "look": look_of(image, pixels, [x0, y0, x1, y1]).ravel().tolist(),
        })
    return rows


def shots_of(frames: list[dict]) -> list[list[dict]]:
    """Frames grouped into runs of one shot (consecutive equal `shot_id`; no shot id: alone)."""
    groups: list[list[dict]] = []
    for frame in frames:
        shot = frame.get("shot_id")
        if groups and shot is not None and groups[-1][-1].get("shot_id") == shot \
                and groups[-1][-1]["episode"] == frame["episode"]:
            groups[-1].append(frame)
        else:
            groups.append([frame])
    return groups


# ---- one shard ------------------------------------------------------------------------------

def segment_frames(frames: list[dict], run_root: Path, params: SegmentParams, segmenter: Any,
                   out: Path, prefix: str, *, label: str = "segment") -> tuple[pa.Table, dict]:
    """Segment frames into character layers, masks and background layers.

    Args:
        frames: frame rows (item_id, episode, frame_index, path relative to `run_root`, width, height).
        run_root: the folder frame paths are relative to.
        params: segmentation parameters.
        segmenter: a models.segmenters.Segmenter.
        out: folder to write into (a shard's temporary folder).
        prefix: the run-relative path `out` will have once committed.
    Returns:
        (manifest rows as a Table with SCHEMA, a report of counts).
    """
    for sub in ("character", "mask", "background"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []
    report = {"frames": len(frames), "layers": 0, "mask_empty": 0, "mask_full": 0, "no_layers": 0,
              "quarantined": 0, "split": 0, "no_detection": 0, "clean_plates": 0,
              "seconds": 0.0}
    finder = face_finder(params)
    detector = None
    if params.detector:
        from models.detectors import OnnxDetector

        detector = OnnxDetector(params.detector, threshold=params.detector_threshold)
    with StageProgress(label, len(frames)) as bar, frame_threads() as pool:
        for shot in shots_of(frames):
            first_row, evidence = len(rows), {}
            readable = []
            for frame in shot:
                image, reason = read_frame(run_root / frame["path"]) if frame.get("path") else (None, "no frame file")
                if image is None:
                    rows.append(_frame_row(frame, params.model,
                                           drop_reason=f"{QUARANTINE}{frame.get('path')}: {reason}"))
                    report["quarantined"] += 1
                    bar.advance()
                else:
                    readable.append((frame, image))
            masks = []
            for start in range(0, len(readable), params.batch_size):
                masks += segmenter.segment([image for _, image in readable[start:start + params.batch_size]])
            boxes = detector.detect([image for _, image in readable]) if detector and readable else None
            layered = layer_shot(readable, masks, boxes, params, out, prefix, finder, pool)
            for (frame, _), mask, (motion, frame_rows) in zip(readable, masks, layered):
                rows.extend(frame_rows)
                if frame_rows[0]["background_path"]:
                    evidence[frame_rows[0]["background_path"]] = (mask, motion)
                reason = frame_rows[0]["drop_reason"]
                if reason in ("mask_empty", "mask_full", "no_layers"):
                    report[reason] += 1
                report["layers"] += sum(r["kept"] for r in frame_rows)
                report["split"] += sum(r["split_from"] is not None for r in frame_rows)
                report["no_detection"] += sum(r["drop_reason"] == "no_detection" for r in frame_rows)
                bar.advance()  # per frame: a Ctrl-C stops the shard within a frame
            if params.plate_check:
                report["clean_plates"] += check_plate(rows[first_row:], evidence, out, segmenter, params)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return pa.Table.from_pylist(rows, schema=SCHEMA), report


def layer_shot(readable: list[tuple[dict, np.ndarray]], masks: list[np.ndarray], boxes: list | None,
               params: SegmentParams, out: Path, prefix: str, finder: Any, pool: ThreadPoolExecutor) -> Iterator:
    """(motion, rows) of each readable (frame, image) of one shot, in order: the shot aligned once on its
    background (tasks/characterness.AlignedShot, with the frames' masks), each frame layered (`layer_frame`) against its motion, in `pool`."""
    images = [image for _, image in readable]
    aligned = AlignedShot(images, pool.map, masks) if len(images) > 1 else None

    def layered(k: int) -> tuple[Any, list[dict]]:
        motion = aligned.motion(k, params.motion_tolerance, masks) if aligned else None
        return motion, layer_frame(readable[k][0], images[k], masks[k], params, params.model, out, prefix, motion,
                                   boxes[k] if boxes is not None else None, finder)

    return pool.map(layered, range(len(images)))


@contextmanager
def frame_threads() -> Iterator[ThreadPoolExecutor]:
    """FRAME_THREADS threads for a shot's frames and alignments (OpenCV and libnvxs release the GIL); on
    leaving, the frames not started are dropped, so a Ctrl-C stops the shard within a frame or two."""
    pool = ThreadPoolExecutor(FRAME_THREADS, thread_name_prefix="segment")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_plate(shot_rows: list[dict], evidence: dict[str, tuple[np.ndarray, Any]], out: Path, segmenter: Any,
                params: SegmentParams) -> int:
    """Check the background layer of the shot's least covered frame for characters left in it.

    `evidence`: background path -> (the frame's mask, its ShotMotion or None). The plate's residual
    (`plate_residual`) is the share of its pixels that still look like a character: what moves against
    the shot outside the inpainted holes (a figure the first pass missed), or what the segmenter marks on
    the plate itself (at half the threshold). Below `plate_max_residual` it is a `clean_plate`. When the
    motion alone reaches `plate_max_residual` the plate is not clean whatever the segmenter would add, so
    it is not segmented again and its residual is the motion's share; a frame with nothing to inpaint is
    its own plate, so its mask is not computed again either.
    Returns 1 for a clean plate, else 0.
    """
    covered: dict[str, float] = {}
    for row in shot_rows:
        if row.get("background_path") in evidence:
            covered[row["background_path"]] = covered.get(row["background_path"], 0.0) + float(row["area_frac"] or 0.0)
    if not covered:
        return 0
    plate_path = min(covered, key=lambda path: (covered[path], path))
    mask, motion = evidence[plate_path]
    left = missed_motion(mask, motion, params.threshold)
    if left.mean() < params.plate_max_residual:
        plate_mask = mask  # nothing was inpainted: the plate is the frame, and its mask is known
        if (mask >= params.threshold).any():
            plate, _ = read_frame(out / "background" / Path(plate_path).name)
            if plate is None:
                return 0
            (plate_mask,) = segmenter.segment([plate])
        left |= plate_mask >= params.threshold / 2
    residual = float(left.mean())
    clean = residual < params.plate_max_residual
    for row in shot_rows:
        if row.get("background_path") == plate_path:
            row.update(plate_residual=residual, clean_plate=clean)
    return int(clean)


def missed_motion(mask: np.ndarray, motion: Any, threshold: float) -> np.ndarray:
    """Pixels that move against the shot outside the frame's (dilated) character pixels: a figure the
    segmenter missed. None for `motion` (no other frame in the shot): no pixel."""
    if motion is None:
        return np.zeros(mask.shape, bool)
    holes = cv2.dilate((mask >= threshold).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    return motion.differs & motion.known & ~holes


# ---- plan, shard, merge ---------------------------------------------------------------------

FRAME_FIELDS = ("item_id", "episode", "frame_index", "shot_id", "path", "phash", "width", "height")


def shard_frames(frames: pa.Table, shard_size: int) -> dict[str, list[dict]]:
    """Kept frames grouped per episode in chunks of `shard_size`, keyed `<episode>-<chunk:04d>`."""
    kept = frames.filter(pc.equal(frames.column("kept"), True))
    kept = kept.select([f for f in FRAME_FIELDS if f in kept.column_names])
    kept = kept.sort_by([("episode", "ascending"), ("frame_index", "ascending")])
    shards: dict[str, list[dict]] = {}
    by_episode: dict[str, list[dict]] = {}
    for row in kept.to_pylist():
        by_episode.setdefault(row["episode"], []).append(row)
    for episode, rows in by_episode.items():
        for chunk, start in enumerate(range(0, len(rows), shard_size)):
            shards[f"{episode}-{chunk:04d}"] = rows[start:start + shard_size]
    return shards


def plan_segment(store: RunStore, params: Any, inputs: Inputs) -> Plan:
    """One shard per chunk of an episode's kept frames (of the `frames` input), its payload those frames,
    fingerprinted by their ids and perceptual hashes."""
    own = params.segment
    settings = params_affecting_output(own)
    shards = []
    for key, rows in shard_frames(store.read_manifest(inputs["frames"].stage), own.shard_size).items():
        identity = {r["item_id"]: r["phash"] for r in rows}
        shards.append(Shard(key=key, fingerprint=fingerprint(STAGE, VERSION, settings, identity), payload=rows))
    return Plan(shards=shards)


def segment_shard(store: RunStore, shard: Shard, params: Any, plan: Plan) -> StageResult:
    """Segment one shard's frames, unless that shard is already committed."""
    from models.segmenters import segmenter

    own = params.segment

    def build(out: Path, prefix: str) -> tuple[pa.Table, dict]:
        return segment_frames(shard.payload, store.root, own, segmenter(own.model), out, prefix,
                              label=f"segment {shard.key}")

    return run_shard(store, STAGE, shard.key, shard.fingerprint, build)


def count_layers(table: pa.Table) -> dict[str, int]:
    """Per-part counts the merged summary adds up (a part holds whole frames)."""
    layers = table.filter(pc.equal(table.column("kept"), True))
    per_frame = pc.value_counts(layers.column("source_id")).field("counts").to_pylist() if layers.num_rows else []
    return {"kept": layers.num_rows, "frames_with_layers": len(per_frame), "frames_with_2plus": sum(c >= 2 for c in per_frame)}


def summarize(totals: dict[str, int], reports: list[dict]) -> dict:
    """Counts for the status table and the UI, from the parts' counts and the shards' reports."""
    return {
        "frames": sum(r.get("frames", 0) for r in reports),
        "kept": totals.get("kept", 0),
        "frames_with_layers": totals.get("frames_with_layers", 0),
        "frames_with_2plus": totals.get("frames_with_2plus", 0),
        "mask_empty": sum(r.get("mask_empty", 0) for r in reports),
        "mask_full": sum(r.get("mask_full", 0) for r in reports),
        "no_layers": sum(r.get("no_layers", 0) for r in reports),
        "quarantined": sum(r.get("quarantined", 0) for r in reports),
        "clean_plates": sum(r.get("clean_plates", 0) for r in reports),
        "seconds": round(sum(r.get("seconds", 0.0) for r in reports), 2),
    }


def merge_segment(store: RunStore, plan: Plan, params: Any) -> StageResult:
    """Commit the shards' rows as the parts of `segment/manifest.parquet` (an episode added: its parts only)."""
    return merge_shard_parts(store, STAGE, plan.fingerprint, plan.shard_fingerprints(), SCHEMA, summarize, count_layers)


SEGMENT = ShardedStage(name=STAGE, version=VERSION, params=SegmentParams, inputs=("frames",), title="segment",
                       plan=plan_segment, shard=segment_shard, merge=merge_segment)
"""The segment stage: one shard per chunk of an episode's kept frames."""
