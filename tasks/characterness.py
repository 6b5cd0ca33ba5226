"""Character-ness of a layer without model weights: what an episode gives for free.

A shot's frames, aligned on the camera's global motion, agree wherever the picture is scenery and
disagree where something moves against it. `ShotMotion.differs` marks the pixels of a frame
that differ from the aligned other frames of its shot (the "plate" test: a pixel that matches
the rest of the shot is background). A layer's character-ness starts from the share of its
pixels that move, and shape cues lower it: touching the top edge of the frame (skies,
buildings, trees cut by the frame), spanning most of the frame's width, many fragments, a faint mask. A layer in a shot of one
sampled frame has no motion cue and starts from an even 0.5.

`split_glued` cuts a layer whose moving part is a clear minority (a character glued by the
segmenter to a tree and the sun) down to the moving part, one instance per moving blob; the still
rest is scenery only where other frames of the shot show it and the figure does not stand there
(a head that stays put while the arms move, and what a pan hides, stay with the figure).
The camera fit of a pair of frames comes from their background: ORB features outside both frames'
segmenter masks, matched and fitted with a RANSAC similarity (pan, zoom, roll), trusted from
`MIN_INLIERS` agreeing matches on. Where the background gives fewer (repeated windows, flat skies,
no masks), a dense fit decides: an affine ECC at half size started from a phase-correlation shift.
Pure functions over numpy arrays; `tasks/segment.py` calls them from its shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

UNKNOWN_MOTION = 0.5
"""Score of a layer that has no motion cue (its shot has one sampled frame)."""
GHOST_SHARE = 0.8
"""A moving part this much inside the other frames' foreground is a ghost of their character."""
WIDE = 0.6
"""A layer at least this share of the frame wide is a landscape strip (hills, a street, glued scenery)."""
HEAD_BAND = 0.2
"""The top share of a layer's height where two figures side by side show two heads."""


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def _greys(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frame in grey (0-1) at full and half size: what `align` fits on."""
    grey = _gray(image)
    return grey, cv2.pyrDown(grey)


def _fit(moving: tuple[np.ndarray, np.ndarray], fixed: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """`align` on the frames' `_greys`."""
    (dx, dy), _ = cv2.phaseCorrelate(fixed[0], moving[0])
    warp = np.float32([[1, 0, dx], [0, 1, dy]])
    guess = warp.copy()
    guess[:, 2] /= 2
    try:
        _, fitted = cv2.findTransformECC(fixed[1], moving[1], guess, cv2.MOTION_AFFINE,
                                         (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 60, 1e-4), None, 3)
        fitted[:, 2] *= 2
        warp = fitted
    except cv2.error:
        pass
    return warp  # maps fixed coordinates to moving coordinates (use with WARP_INVERSE_MAP)


def align(moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """2x3 affine that warps `moving` onto `fixed` (RGB frames of one shot).

    Phase correlation gives the shift; an ECC affine fit at half size refines it (zoom,
    sub-pixel). A failed fit keeps the shift.
    """
    return _fit(_greys(moving), _greys(fixed))


@dataclass
class ShotMotion:
    """Per-pixel motion of one frame against the other sampled frames of its shot."""

    differs: np.ndarray  # bool (H, W): differs from the aligned other frames
    known: np.ndarray    # bool (H, W): at least one other frame covers the pixel
    others: int = 0
    occupied: np.ndarray | None = None  # bool (H, W): foreground in every other frame that sees it


ORB_FEATURES = 2000
"""Background features found per frame for the camera fit."""
MIN_INLIERS = 15
"""Background matches that must agree on one camera motion before the feature fit is trusted (on the
benchmark footage a wrong fit, on repeated windows or a flat sky, gathers at most 9)."""
FOREGROUND_REACH = 15
"""Pixels around the segmenter's foreground that give no background feature (an ORB patch's radius)."""


def _background_features(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """ORB keypoints (N, 2) and descriptors of a frame, away from its foreground (soft mask >= 0.5)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    side = 2 * FOREGROUND_REACH + 1
    background = (cv2.dilate((mask >= 0.5).astype(np.uint8), np.ones((side, side), np.uint8)) == 0).astype(np.uint8)
    keypoints, descriptors = cv2.ORB_create(nfeatures=ORB_FEATURES, fastThreshold=10).detectAndCompute(
        grey, background * 255)
    return np.float32([k.pt for k in keypoints]).reshape(-1, 2), descriptors


def _feature_fit(moving: tuple[np.ndarray, np.ndarray | None], fixed: tuple[np.ndarray, np.ndarray | None]
                 ) -> np.ndarray | None:
    """The similarity mapping `fixed`'s background points onto `moving`'s (2x3, as `align` gives), or None
    when fewer than MIN_INLIERS matches agree or the fit is no camera motion (scale off 0.5-2, rolled > 15 deg)."""
    (moving_points, moving_codes), (fixed_points, fixed_codes) = moving, fixed
    if moving_codes is None or fixed_codes is None or min(len(moving_points), len(fixed_points)) < MIN_INLIERS:
        return None
    matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(fixed_codes, moving_codes)
    if len(matches) < MIN_INLIERS:
        return None
    source = fixed_points[[m.queryIdx for m in matches]]
    target = moving_points[[m.trainIdx for m in matches]]
    warp, inliers = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=2.0,
                                                maxIters=2000, confidence=0.995, refineIters=20)
    if warp is None or int(inliers.sum()) < MIN_INLIERS:
        return None
    scale, roll = np.hypot(warp[0, 0], warp[1, 0]), np.degrees(np.arctan2(warp[1, 0], warp[0, 0]))
    if not 0.5 <= scale <= 2.0 or abs(roll) > 15:
        return None
    return warp.astype(np.float32)


class AlignedShot:
    """The sampled frames of one shot aligned pairwise, each frame's greys, blur and background features
    computed once, not once per pair. Frames of different sizes are not compared.

    With the frames' segmenter `masks`, a pair is fitted once on background features (`_feature_fit`) and
    the reverse warp is its inverse; a pair the features do not settle, or every pair without masks, is
    fitted both ways by `align`'s dense fit."""

    def __init__(self, images: list[np.ndarray], mapper: Callable = map, masks: list[np.ndarray] | None = None):
        """`mapper`: how the per-frame and per-pair work is run (a thread pool's `map` runs it side by side)."""
        self.shapes = [image.shape for image in images]
        self.blurred = [cv2.GaussianBlur(image, (5, 5), 0) for image in images]
        pairs = [(j, k) for j in range(len(images)) for k in range(j + 1, len(images))
                 if self.shapes[j] == self.shapes[k]]
        fitted: list[np.ndarray | None] = [None] * len(pairs)
        if masks is not None:
            features = list(mapper(_background_features, images, masks))
            fitted = list(mapper(lambda pair: _feature_fit(features[pair[0]], features[pair[1]]), pairs))
        self.warps = {}  # (moving, fixed) -> 2x3: fixed coordinates -> moving ones
        for (j, k), warp in zip(pairs, fitted):
            if warp is not None:
                self.warps[(j, k)] = warp
                self.warps[(k, j)] = cv2.invertAffineTransform(warp.astype(np.float64)).astype(np.float32)
        dense = [pair for j, k in pairs if (j, k) not in self.warps for pair in ((j, k), (k, j))]
        if dense:
            needed = sorted({i for pair in dense for i in pair})
            greys = dict(zip(needed, mapper(_greys, [images[i] for i in needed])))
            self.warps.update(zip(dense, mapper(lambda pair: _fit(greys[pair[0]], greys[pair[1]]), dense)))

    def motion(self, k: int, tolerance: int, masks: list[np.ndarray] | None = None) -> ShotMotion:
        """Compare frame `k` with the shot's other frames; `tolerance` is the 0-255 colour step.

        `masks` (the frames' soft masks) mark where every other frame has foreground: a moving
        part lying there is mostly where another frame's character stood (a ghost).
        """
        h, w = self.shapes[k][:2]
        votes = np.zeros((h, w), np.int32)
        counts = np.zeros((h, w), np.int32)
        foreground = np.zeros((h, w), np.int32)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        others = [j for j in range(len(self.shapes)) if j != k]
        for j in others:
            if (j, k) not in self.warps:
                continue
            warp = self.warps[(j, k)]
            moved = cv2.warpAffine(self.blurred[j], warp, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT)
            valid = cv2.warpAffine(np.ones((h, w), np.uint8), warp, (w, h), flags=flags,
                                   borderMode=cv2.BORDER_CONSTANT) > 0
            valid = cv2.erode(valid.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            diff = np.maximum.reduce(cv2.split(cv2.absdiff(self.blurred[k], moved))) > tolerance
            diff = cv2.morphologyEx(diff.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
            votes += diff & valid
            counts += valid
            if masks is not None:
                theirs = cv2.warpAffine(masks[j].astype(np.float32), warp, (w, h), flags=flags,
                                        borderMode=cv2.BORDER_CONSTANT) >= 0.5
                foreground += theirs & valid
        # the median-plate rule: differs from most frames that see the pixel (from the only one when
        # one does), so where another frame had a character this one is not marked
        differs = np.where(counts >= 2, 2 * votes > counts, votes >= 1)
        occupied = (counts > 0) & (foreground >= counts) if masks is not None else None
        return ShotMotion(differs=differs, known=counts > 0, others=len(others), occupied=occupied)


def motion_share(motion: ShotMotion | None, pixels: np.ndarray) -> float | None:
    """Share of a layer's pixels that move against its shot (None: no motion cue)."""
    if motion is None or not motion.others:
        return None
    known = pixels & motion.known
    if known.sum() < 0.3 * pixels.sum():
        return None
    return float(motion.differs[known].mean())


def moving_parts(motion: ShotMotion, pixels: np.ndarray, min_pixels: float, reach: int) -> list[np.ndarray]:
    """The moving blobs of a layer's pixels: each blob's differing pixels, closed, filled to their
    convex hull, grown by `reach` and cut back to the layer.

    The work is done in the moving pixels' box grown by 2 * `reach` + 1 (a close and a grow of `reach`
    reach no farther), which gives the same parts as the whole frame at a fraction of the cost; the box
    starts on even pixels, so OpenCV's 2x2-block labelling numbers the blobs in the frame's order.
    """
    moving = motion.differs & pixels
    if not moving.any():
        return []
    x0, y0, x1, y1 = _grown_box(moving, 2 * reach + 1)
    window = (slice(y0, y1), slice(x0, x1))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    closed = cv2.morphologyEx(moving[window].astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    parts = []
    for k in range(1, count):
        if stats[k, cv2.CC_STAT_AREA] < min_pixels / 4:
            continue
        points = cv2.findNonZero((labels == k).astype(np.uint8))
        hull = np.zeros_like(closed)
        cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
        part = np.zeros_like(pixels)
        part[window] = (cv2.dilate(hull, kernel) > 0) & pixels[window]
        if part.sum() < min_pixels:
            continue
        if motion.occupied is not None and motion.occupied[part].mean() > GHOST_SHARE:
            continue  # where the other frames' foreground stood: a ghost, not a character
        parts.append(part)
    return parts


def _grown_box(pixels: np.ndarray, grow: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the pixels' box grown by `grow` on each side, inside the frame, x0 and y0 even."""
    ys, xs = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    h, w = pixels.shape
    x0, y0 = max(xs[0] - grow, 0), max(ys[0] - grow, 0)
    return x0 - x0 % 2, y0 - y0 % 2, min(xs[-1] + 1 + grow, w), min(ys[-1] + 1 + grow, h)


def split_glued(motion: ShotMotion | None, pixels: np.ndarray, min_pixels: float, *, max_share: float,
                reach: int) -> list[np.ndarray] | None:
    """The moving parts of a layer that glues moving parts to a static remainder, else None.

    Glued: the moving parts cover at most `max_share` of the layer and what is left is itself
    at least `min_pixels` (a tree, the sun, a building).
    """
    share = motion_share(motion, pixels)
    if share is None or share <= 0.02:
        return None
    parts = moving_parts(motion, pixels, min_pixels, reach)
    if not parts:
        return None
    covered = np.logical_or.reduce(parts)
    standing = still_figure(motion, pixels & motion.known & ~covered, covered)
    glued = pixels & motion.known & ~covered & ~standing
    if covered.sum() > max_share * pixels.sum() or glued.sum() < min_pixels:
        return None
    return [with_touching(part, pixels & (~motion.known | standing)) for part in parts]


def still_figure(motion: ShotMotion, rest: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """The blobs of a layer's still pixels `rest` that are foreground in every other frame of the shot
    (`ShotMotion.occupied`, at least STILL_FIGURE of them) while its `moving` part stays there too (at
    least STAYS of it): a figure standing in place, its head still while its arms move, not scenery
    glued to a figure that walks past it."""
    if motion.occupied is None or not rest.any() or motion.occupied[moving].mean() < STAYS:
        return np.zeros_like(rest)
    count, labels = cv2.connectedComponents(rest.astype(np.uint8), connectivity=8)
    share = np.bincount(labels[rest], weights=motion.occupied[rest], minlength=count) / \
        np.maximum(np.bincount(labels[rest], minlength=count), 1)
    return rest & (share >= STILL_FIGURE)[labels]


def standing_still(motion: ShotMotion, blob: np.ndarray, pixels: np.ndarray) -> bool:
    """Whether a still blob of a layer is the figure itself, standing: foreground in every other frame
    (STILL_FIGURE) and most of the layer (a still body with swinging arms). A smaller one is trimmed even
    when the figure stays in place: scenery glued in every frame looks the same (measured on the sample)."""
    if motion.occupied is None or motion.occupied[blob].mean() < STILL_FIGURE:
        return False
    return 2 * int(blob.sum()) >= int(pixels.sum())


def with_touching(part: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """A moving part with the blobs of `extra` that touch it (pixels no other frame shows, as after a pan,
    and a still figure's pixels: nothing says they are scenery, so they stay with the figure)."""
    if not extra.any():
        return part
    count, labels = cv2.connectedComponents((part | extra).astype(np.uint8), connectivity=8)
    return np.isin(labels, np.unique(labels[part])) & (labels > 0)


FACE_SCORE = 0.9
"""Character score of a layer that holds an anime face, before the shape cues."""
TOP_EDGE_PENALTY = 0.25
"""Score taken off a layer that touches the frame's top edge (a bust close-up with a face keeps FACE_SCORE)."""
STATIC_SHARE = 0.03
"""A part of a layer whose pixels differ from the shot's other frames less than this is static."""
STILL_FIGURE = 0.85
"""A still blob this much inside every other frame's foreground is the figure standing still (its head
while its arms move), not scenery glued to it (measured: 0.89-0.96 on the figure, 0.0-0.6 on most glued scenery)."""
STAYS = 0.55
"""... and when at least this share of its moving part is foreground in every other frame too (a figure
standing in place: measured 0.57-0.76 on the test footage; one walking past scenery: mostly 0.0-0.54)."""
GLUED_RIM = 0.5
"""A still blob is glued scenery when at least this share of its rim lies outside the layer (a sign
above a head); a still patch of the figure itself is mostly surrounded by the figure."""


def trim_static_parts(motion: ShotMotion | None, pixels: np.ndarray, *, moving_share: float,
                      min_share: float = 0.0015) -> np.ndarray | None:
    """A moving layer's pixels without the static things glued to its edge (a sign above a head, the sun
    and a tree beside it, a roof it touches), else None when nothing is trimmed or motion cannot tell.

    Static pixels (known, not differing from the shot's other frames) are opened with a disc of 2.5%
    of the frame's side, so the thin static streaks inside a moving figure vanish; each remaining blob
    of at least `min_share` of the frame whose rim lies mostly outside the layer (GLUED_RIM) is glued
    scenery, not a still patch of the figure. What remains must itself move (half of
    `moving_share`): a figure that stands and talks is never cut.
    """
    whole = motion_share(motion, pixels)
    if whole is None or whole < moving_share / 2:
        return None
    side = max(5, round(0.025 * max(pixels.shape)) | 1)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    still = pixels & motion.known & ~motion.differs
    opened = cv2.morphologyEx(still.astype(np.uint8), cv2.MORPH_OPEN, disc)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    glued = np.zeros(pixels.shape, bool)
    ring_kernel = np.ones((5, 5), np.uint8)
    for k in range(1, count):
        if stats[k, cv2.CC_STAT_AREA] < min_share * pixels.size:
            continue
        blob = labels == k
        rim = (cv2.dilate(blob.astype(np.uint8), ring_kernel) > 0) & ~blob
        if (~pixels[rim]).mean() >= GLUED_RIM and not standing_still(motion, blob, pixels):
            glued |= blob
    if not glued.any():
        return None
    kept = pixels & ~(cv2.dilate(glued.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)
    count, labels = cv2.connectedComponents(kept.astype(np.uint8), connectivity=8)
    for k in range(1, count):  # what the cut left beside the figure (a pole, an outline) goes when it does not move
        part = labels == k
        seen = part & motion.known
        if not seen.any() or motion.differs[seen].mean() < STATIC_SHARE:
            kept &= ~part
    share = motion_share(motion, kept) if kept.any() else None
    if share is None or share < moving_share / 2:
        return None
    return kept


def character_score(motion: float | None, bbox: list[int], pixels: np.ndarray, confidence: float,
                    *, moving_share: float, face: float | None = None) -> tuple[float, list[str]]:
    """(score 0-1, reasons) of one layer: motion against its shot or a face, then shape cues.

    `moving_share`: the share of moving pixels that counts as fully moving (score 1); `face`: the
    likelihood of an anime face on the layer (None: none found), which makes it character material
    (FACE_SCORE) whatever its motion, or the frame edge a close-up touches; a layer spread across the
    frame in fragments stays below that.
    """
    reasons = []
    if motion is None:
        score = UNKNOWN_MOTION
        reasons.append("no motion cue (one frame of its shot)")
    else:
        score = float(np.clip(motion / moving_share, 0.0, 1.0))
        reasons.append(f"{motion:.0%} of its pixels move against the shot")
    if face is not None:
        score = max(score, FACE_SCORE + TOP_EDGE_PENALTY * (bbox[1] <= 1))
        reasons.append(f"holds a face (likelihood {face:.2f})")
    if bbox[1] <= 1:
        score -= TOP_EDGE_PENALTY
        reasons.append("touches the top edge")
    if bbox[2] - bbox[0] >= WIDE * pixels.shape[1]:
        score -= 0.6
        reasons.append(f"spans {(bbox[2] - bbox[0]) / pixels.shape[1]:.0%} of the frame width")
    fragments = cv2.connectedComponents(pixels.astype(np.uint8), connectivity=8)[0] - 1
    if fragments > 3:
        score -= 0.1
        reasons.append(f"{fragments} fragments")
    if confidence < 0.9:
        score -= 0.1
        reasons.append(f"soft mask (confidence {confidence:.2f})")
    return float(np.clip(score, 0.0, 1.0)), reasons


def split_pair(pixels: np.ndarray, min_pixels: float, *, valley: float, min_height: float = 0.6
               ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(left, right, cut column) of a layer that holds two figures side by side, else None.

    Two heads, one mask: the column profile of the layer's top `HEAD_BAND` (opaque pixels per
    column; arms and hands that touch lie lower) has two peaks with a clear valley between them,
    at most `valley` times the lower peak beside it; the cut leaves at least a fifth of the
    layer's width on each side, and each side holds at least `min_pixels` and stands at least
    `min_height` of the layer's height. One figure's head band falls off towards its sides
    without rising again, so it is not cut.
    """
    cols = np.flatnonzero(pixels.any(0))
    rows = np.flatnonzero(pixels.any(1))
    if len(cols) < 10 or len(rows) < 10:
        return None
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    width, height = x1 - x0, int(rows[-1] - rows[0] + 1)
    k = max(3, width // 20)
    top = int(rows[0])
    band = pixels[top:top + max(1, round(HEAD_BAND * height)), x0:x1]
    profile = np.convolve(band.sum(0).astype(np.float32), np.ones(k, np.float32) / k, mode="same")
    left_peak = np.maximum.accumulate(profile)
    right_peak = np.maximum.accumulate(profile[::-1])[::-1]
    lo, hi = width // 5, width - width // 5
    if hi <= lo:
        return None
    ratio = profile[lo:hi] / np.maximum(np.minimum(left_peak[lo:hi], right_peak[lo:hi]), 1e-6)
    cut = lo + int(np.argmin(ratio))
    if ratio[cut - lo] > valley:
        return None
    column = np.arange(pixels.shape[1])[None, :]
    left, right = pixels & (column < x0 + cut), pixels & (column >= x0 + cut)
    for side in (left, right):
        side_rows = np.flatnonzero(side.any(1))
        if side.sum() < min_pixels or side_rows[-1] - side_rows[0] + 1 < min_height * height:
            return None
    return left, right, x0 + cut


LOOK_SIDE = 12
"""Side of the grey thumbnail that stands for a layer's appearance in the recurrence test."""


def look_of(image: np.ndarray, pixels: np.ndarray, bbox: list[int]) -> np.ndarray:
    """A layer's appearance: its box's grey pixels (the layer's own, zero elsewhere) at LOOK_SIDE^2."""
    x0, y0, x1, y1 = bbox
    grey = _gray(image[y0:y1, x0:x1]) * pixels[y0:y1, x0:x1]
    return cv2.resize(grey, (LOOK_SIDE, LOOK_SIDE), interpolation=cv2.INTER_AREA)


def recurring_shots(shots: list[object], boxes: np.ndarray, looks: np.ndarray, *, min_iou: float = 0.8,
                    max_difference: float = 0.06, chunk: int = 100_000) -> np.ndarray:
    """Per layer: in how many shots (its own included) a layer lies at the same place (box IoU >=
    `min_iou`) and looks the same (mean grey difference of the LOOK_SIDE^2 looks <= `max_difference`).

    `boxes` (n, 4) are in frame fractions, so episodes of other sizes compare. The same object at
    the same place in several shots is part of the set (a sun, a tree, a window of a recurring
    room), not a character walking through it. Two boxes with IoU >= `min_iou` have every edge
    within (1 - min_iou) / min_iou^2 of either's longer side, so a k-d tree of the box corners
    gives each layer's few candidates and only those pairs are compared (`chunk` at a time).
    """
    from scipy.spatial import cKDTree

    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    looks = np.asarray(looks, np.float32).reshape(len(boxes), -1)
    shot_ids = np.unique(np.array([str(s) for s in shots], dtype=object), return_inverse=True)[1].ravel()
    n_shots = int(shot_ids.max(initial=0)) + 1
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    near = cKDTree(boxes).query_ball_point(boxes, (1 - min_iou) / min_iou ** 2 * sides, p=np.inf)
    i = np.repeat(np.arange(len(boxes)), [len(n) for n in near])
    j = np.concatenate([np.asarray(n, np.int64) for n in near]) if len(boxes) else np.zeros(0, np.int64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    found = []
    for lo in range(0, len(i), chunk):
        a, b = i[lo:lo + chunk], j[lo:lo + chunk]
        inter = (np.clip(np.minimum(boxes[a, 2], boxes[b, 2]) - np.maximum(boxes[a, 0], boxes[b, 0]), 0, None)
                 * np.clip(np.minimum(boxes[a, 3], boxes[b, 3]) - np.maximum(boxes[a, 1], boxes[b, 1]), 0, None))
        same = inter >= min_iou * (area[a] + area[b] - inter)
        a, b = a[same], b[same]
        alike = np.abs(looks[a] - looks[b]).mean(1) <= max_difference
        found.append(a[alike] * n_shots + shot_ids[b[alike]])
    keys = np.sort(np.concatenate([*found, np.arange(len(boxes)) * n_shots + shot_ids]))  # layer * n_shots + shot
    first = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, bool)
    return np.bincount(keys[first] // n_shots, minlength=len(boxes))  # distinct shots per layer
