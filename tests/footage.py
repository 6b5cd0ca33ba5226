"""Synthetic cartoon episodes with exact ground truth, for tests and the shipped sample.

An episode is a black intro, then shots with hard cuts, then (optionally) one shot
repeated pixel-for-pixel as a "recap". Each shot has a generated background and 0-2
CC0 sprite characters from the arcade wheel. Beside ``ep.mp4`` we write
``ep.truth.json`` (shots, per-frame instances with bboxes) and ``ep.masks.npz``
(``labels``: per-frame instance label map, 0 = background).

    python -m tests.footage OUT.mp4 [--seed N] [--shots N] [--width W --height H] [--fps F]
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np

IDENTITIES: tuple[str, ...] = (
    "female_adventurer",
    "female_person",
    "male_adventurer",
    "male_person",
    "robot",
    "zombie",
)
WALK = tuple(f"walk{i}" for i in range(8))
ARCADE = "arcade==3.3.3"
WHEEL_PREFIX = "arcade/resources/assets/images/animated_characters/"
REPO = Path(__file__).resolve().parent.parent
ZOOM = 1.15  # zoom shots go between 1.0 and this factor


@dataclass
class ShotSpec:
    """One shot of the episode."""

    background_seed: int
    characters: tuple[str, ...]  # 0, 1 or 2 identities
    seconds: float
    camera: Literal["static", "pan", "zoom"] = "static"


# ---------------------------------------------------------------- sprites


def sprite_dir() -> Path:
    """Folder of the arcade character sprites; downloads the wheel with pip on first use."""
    dest = REPO / ".cache" / "sprites" / "animated_characters"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as dl:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", ARCADE, "-d", dl],
            check=True,
        )
        wheel = next(Path(dl).glob("arcade-*.whl"))
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
        try:
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if name.startswith(WHEEL_PREFIX) and not name.endswith("/"):
                        target = tmp / name[len(WHEEL_PREFIX):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(zf.read(name))
            tmp.chmod(0o755)
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a lost race with another process
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


@lru_cache(maxsize=None)
def _pose_rgba(identity: str, pose: str) -> np.ndarray:
    """The 128x96 RGBA canvas of one pose."""
    from PIL import Image

    (path,) = (sprite_dir() / identity).glob(f"*_{pose}.png")
    return np.asarray(Image.open(path).convert("RGBA"))


@lru_cache(maxsize=None)
def _metrics(identity: str) -> tuple[int, int]:
    """(visible height of the idle pose, widest half-extent from canvas centre over used poses)."""
    alpha = _pose_rgba(identity, "idle")[..., 3] > 127
    rows = np.flatnonzero(alpha.any(1))
    half = 0
    for pose in (*WALK, "idle", "jump"):
        cols = np.flatnonzero(_pose_rgba(identity, pose)[..., 3].max(0) > 127)
        centre = _pose_rgba(identity, pose).shape[1] / 2
        half = max(half, int(np.ceil(max(centre - cols[0], cols[-1] + 1 - centre))))
    return int(rows[-1] - rows[0] + 1), half


@lru_cache(maxsize=4096)
def _sprite(identity: str, pose: str, height: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scaled sprite canvas as (premultiplied RGB float32, alpha float32 in 0..1)."""
    rgba = _pose_rgba(identity, pose).astype(np.float32) / 255.0
    rgba[..., :3] *= rgba[..., 3:]
    width = max(1, round(rgba.shape[1] * height / rgba.shape[0]))
    interp = cv2.INTER_AREA if height < rgba.shape[0] else cv2.INTER_NEAREST
    rgba = cv2.resize(rgba, (width, height), interpolation=interp)
    if flip:
        rgba = rgba[:, ::-1]
    return np.ascontiguousarray(rgba[..., :3] * 255.0), np.ascontiguousarray(rgba[..., 3])


# ---------------------------------------------------------------- backgrounds


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255)


def _gradient(img: np.ndarray, y0: int, y1: int, top, bottom) -> None:
    t = np.linspace(0.0, 1.0, max(y1 - y0, 1), dtype=np.float32)[:, None, None]
    img[y0:y1] = (np.float32(top) * (1 - t) + np.float32(bottom) * t).astype(np.uint8)


def _sky(img, rng, hue, horizon) -> None:
    H, W = img.shape[:2]
    _gradient(img, 0, horizon, _hsv(hue, 0.25, 1.0), _hsv(hue + 0.05, 0.55, 0.9))
    cv2.circle(img, (int(rng.uniform(0.1, 0.9) * W), int(rng.uniform(0.1, 0.3) * H)),
               int(rng.uniform(0.05, 0.09) * H), _hsv(0.13, 0.55, 1.0), -1, cv2.LINE_AA)
    for _ in range(rng.integers(2, 5)):  # clouds
        cx, cy = rng.uniform(0, W), rng.uniform(0.05, 0.3) * H
        for _ in range(3):
            axes = (int(rng.uniform(0.06, 0.12) * H), int(rng.uniform(0.03, 0.05) * H))
            centre = (int(cx + rng.uniform(-0.08, 0.08) * H), int(cy + rng.uniform(-0.02, 0.02) * H))
            cv2.ellipse(img, centre, axes, 0, 0, 360, (250, 250, 252), -1, cv2.LINE_AA)


def _landscape(img, rng, hue) -> None:
    H, W = img.shape[:2]
    horizon = int(rng.uniform(0.55, 0.68) * H)
    ground = hue + rng.uniform(0.25, 0.45)
    _sky(img, rng, hue, horizon)
    xs = np.arange(0, W + 8, 8)
    for layer in range(2):  # hills
        phase, freq = rng.uniform(0, 6.3), rng.uniform(1.5, 4.0) * 2 * np.pi / W
        ys = horizon - (0.12 - 0.05 * layer) * H * (1 + np.sin(xs * freq + phase)) / 2 - 2
        poly = np.concatenate([np.stack([xs, ys], 1), [[W, horizon + 2], [0, horizon + 2]]])
        cv2.fillPoly(img, [poly.astype(np.int32)], _hsv(ground + 0.05 * layer, 0.5, 0.5 + 0.15 * layer), cv2.LINE_AA)
    _gradient(img, horizon, H, _hsv(ground, 0.55, 0.75), _hsv(ground, 0.65, 0.5))
    for _ in range(rng.integers(30, 60)):  # grass strokes
        x, y = int(rng.uniform(0, W)), int(rng.uniform(horizon + 3, H))
        cv2.line(img, (x, y), (x + int(rng.integers(-2, 3)), y - 4), _hsv(ground, 0.7, 0.4), 1, cv2.LINE_AA)
    for _ in range(rng.integers(3, 8)):  # trees
        x, base = int(rng.uniform(0, W)), int(horizon + rng.uniform(0, 0.06) * H)
        h = int(rng.uniform(0.15, 0.3) * H)
        cv2.rectangle(img, (x - 2, base - h), (x + 2, base), _hsv(0.07, 0.6, 0.4), -1)
        cv2.circle(img, (x, base - h), int(h * 0.45), _hsv(0.3 + rng.uniform(-0.06, 0.06), 0.6, 0.45), -1, cv2.LINE_AA)
    for _ in range(rng.integers(2, 5)):  # rocks
        c = (int(rng.uniform(0, W)), int(rng.uniform(horizon + 0.1 * H, H)))
        axes = (int(rng.uniform(0.03, 0.07) * H), int(rng.uniform(0.015, 0.03) * H))
        cv2.ellipse(img, c, axes, 0, 0, 360, _hsv(hue, 0.1, rng.uniform(0.45, 0.7)), -1, cv2.LINE_AA)


def _room(img, rng, hue) -> None:
    H, W = img.shape[:2]
    floor_y = int(rng.uniform(0.66, 0.74) * H)
    _gradient(img, 0, floor_y, _hsv(hue, 0.25, 0.95), _hsv(hue, 0.4, 0.75))
    step = int(rng.uniform(0.06, 0.12) * H)
    for x in range(0, W, 2 * step):  # wallpaper stripes
        img[:floor_y, x:x + step] = (img[:floor_y, x:x + step] * 0.9).astype(np.uint8)
    wood = hue + rng.uniform(0.3, 0.5)
    _gradient(img, floor_y, H, _hsv(wood, 0.5, 0.7), _hsv(wood, 0.6, 0.45))
    y, gap = floor_y, 0.03 * H
    while y < H:  # floor planks, wider towards the viewer
        cv2.line(img, (0, int(y)), (W, int(y)), _hsv(wood, 0.6, 0.35), 1)
        y, gap = y + gap, gap * 1.35
    cv2.rectangle(img, (0, floor_y - 4), (W, floor_y), _hsv(wood, 0.3, 0.95), -1)
    x = int(rng.uniform(0, 0.15) * W)
    while x < W - 0.2 * H:  # windows, doors, pictures along the wall
        kind, w = rng.integers(3), int(rng.uniform(0.2, 0.35) * H)
        if kind == 0:  # window with sky
            y0, y1 = int(0.12 * H), int(0.5 * H)
            _gradient(img[:, x:x + w], y0, y1, _hsv(0.58, 0.3, 1.0), _hsv(0.58, 0.6, 0.9))
            cv2.rectangle(img, (x, y0), (x + w, y1), (245, 245, 240), 3)
            cv2.line(img, (x + w // 2, y0), (x + w // 2, y1), (245, 245, 240), 2)
            cv2.line(img, (x, (y0 + y1) // 2), (x + w, (y0 + y1) // 2), (245, 245, 240), 2)
        elif kind == 1:  # door
            cv2.rectangle(img, (x, int(0.2 * H)), (x + w, floor_y), _hsv(wood, 0.6, 0.5), -1)
            cv2.circle(img, (x + w - 5, int(0.5 * H)), 3, (230, 200, 80), -1, cv2.LINE_AA)
        else:  # framed picture
            y0 = int(rng.uniform(0.15, 0.3) * H)
            cv2.rectangle(img, (x, y0), (x + w, y0 + int(0.7 * w)), _hsv(hue + 0.5, 0.6, 0.7), -1)
            cv2.circle(img, (x + w // 2, y0 + int(0.35 * w)), w // 5, _hsv(hue + 0.2, 0.7, 0.9), -1, cv2.LINE_AA)
            cv2.rectangle(img, (x, y0), (x + w, y0 + int(0.7 * w)), _hsv(0.08, 0.7, 0.35), 3)
        x += w + int(rng.uniform(0.1, 0.4) * H)


def _city(img, rng, hue) -> None:
    H, W = img.shape[:2]
    road_y = int(rng.uniform(0.68, 0.76) * H)
    _sky(img, rng, hue + 0.5, road_y)
    x = -int(rng.uniform(0, 0.1) * H)
    while x < W:  # buildings with window grids
        w, h = int(rng.uniform(0.2, 0.45) * H), int(rng.uniform(0.3, 0.6) * H)
        colour = _hsv(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.25, 0.6), rng.uniform(0.5, 0.85))
        cv2.rectangle(img, (x, road_y - h), (x + w, road_y), colour, -1)
        lit = _hsv(0.14, 0.5, 1.0) if rng.random() < 0.5 else _hsv(0.6, 0.4, 0.45)
        for wy in range(road_y - h + 6, road_y - 10, 12):
            for wx in range(x + 5, x + w - 8, 10):
                cv2.rectangle(img, (wx, wy), (wx + 4, wy + 6), lit, -1)
        x += w + int(rng.uniform(0, 0.08) * H)
    _gradient(img, road_y, H, _hsv(0, 0, 0.5), _hsv(0, 0, 0.3))
    cv2.rectangle(img, (0, road_y), (W, road_y + 5), _hsv(hue, 0.1, 0.8), -1)
    mid = (road_y + H) // 2 + 4
    for x in range(int(rng.integers(0, 30)), W, 30):
        cv2.rectangle(img, (x, mid), (x + 14, mid + 2), (240, 210, 60), -1)


def make_background(seed: int, size: tuple[int, int]) -> np.ndarray:
    """RGB background (H, 1.5*W, 3) for view size (W, H); extra width is room for pans."""
    W, H = size
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W + W // 2, 3), np.uint8)
    scene = (_landscape, _room, _city)[rng.integers(3)]
    scene(img, rng, rng.random())
    return img


# ---------------------------------------------------------------- shots


def default_shots(seed: int, n_shots: int = 8) -> list[ShotSpec]:
    """A varied, deterministic shot list: 0/1/2-character shots, every identity appears."""
    rng = np.random.default_rng(seed)
    rest = max(n_shots - 2, 0)
    counts = [2, 1] + [int(c) for c in rng.choice([0, 1, 2, 2], size=rest)]
    for i in range(2, len(counts)):  # enough character slots for all identities
        if sum(counts) < len(IDENTITIES):
            counts[i] = 2
    counts = counts[:n_shots]
    rng.shuffle(counts)
    cameras = ["pan", "zoom"] + [str(c) for c in rng.choice(["static", "static", "pan", "zoom"], size=rest)]
    cameras = cameras[:n_shots]
    rng.shuffle(cameras)

    unseen = [str(i) for i in rng.permutation(IDENTITIES)]
    thumbs: list[np.ndarray] = []
    shots = []
    for count, camera in zip(counts, cameras):
        chars: list[str] = []
        for _ in range(count):
            pick = unseen.pop(0) if unseen else str(rng.choice([i for i in IDENTITIES if i not in chars]))
            chars.append(pick)
        for _ in range(50):  # background clearly different from every earlier shot
            bg_seed = int(rng.integers(0, 2**31 - 1))
            thumb = make_background(bg_seed, (64, 36)).astype(np.int16)
            if all(np.abs(thumb - t).mean() > 30 for t in thumbs):
                break
        thumbs.append(thumb)
        seconds = float(np.round(rng.uniform(1.75, 3.0) * 4) / 4)
        shots.append(ShotSpec(bg_seed, tuple(chars), seconds, camera))  # type: ignore[arg-type]
    return shots


def _layout(spec: ShotSpec, size, n: int, fps: int, rng) -> list[list[tuple[str, int, int, bool, int]]]:
    """Per character, per frame: (pose, x centre, y feet, flipped, canvas height), in unzoomed screen pixels."""
    W, H = size
    if not spec.characters:
        return []
    zmax = ZOOM if spec.camera == "zoom" else 1.0
    frac = rng.uniform(0.48, 0.56)  # visible idle height / frame height
    drift = rng.uniform(0.02, 0.04) * W
    margin, min_gap = 0.02 * W, 0.12 * W
    for _ in range(20):  # shrink until the characters fit with the required gap
        scales = [frac * H / _metrics(c)[0] for c in spec.characters]
        halves = [_metrics(c)[1] * s + drift for c, s in zip(spec.characters, scales)]
        lo = W / 2 - (W / 2 - margin) / zmax + halves[0]
        hi = W / 2 + (W / 2 - margin) / zmax - halves[-1]
        if len(halves) == 1 or hi - lo - halves[0] - halves[1] >= min_gap:
            break
        frac *= 0.92
    if len(halves) == 1:
        centres = [rng.uniform(lo, max(lo, hi))]
    else:
        slack = max(0.0, hi - lo - halves[0] - halves[1] - min_gap)
        centres = [lo + rng.uniform(0, slack / 2), hi - rng.uniform(0, slack / 2)]

    tracks = []
    for char, scale, cx in zip(spec.characters, scales, centres):
        names = [str(p) for p in rng.permutation(["walk", "idle", "jump"])]
        durations = rng.dirichlet([{"walk": 4, "idle": 2, "jump": 1.5}[p] for p in names])
        ends = np.cumsum(durations)
        direction = rng.choice([-1, 1])
        speed = direction * drift / max(1, round(durations[names.index("walk")] * n))
        feet = int(H * rng.uniform(0.86, 0.92))
        canvas_h = round(_pose_rgba(char, "idle").shape[0] * scale)
        x, walked, track = cx - direction * drift / 2, 0, []
        for f in range(n):
            u = f / n
            i = min(int(np.searchsorted(ends, u, side="right")), 2)
            dy = 0
            if names[i] == "walk":
                pose = WALK[(walked * 10 // fps) % 8]  # ~10 walk poses a second
                walked += 1
                x += speed
            elif names[i] == "idle":
                pose = "idle"
            else:
                pose = "jump"
                start = ends[i - 1] if i else 0.0
                v = (u - start) / max(ends[i] - start, 1e-6)
                dy = int(np.sin(np.pi * min(v, 1.0)) * 0.1 * H)
            x = float(np.clip(x, cx - drift, cx + drift))
            track.append((pose, int(round(x)), feet - dy, bool(direction < 0), canvas_h))
        tracks.append(track)
    return tracks


def _paste(frame, labels, rgb, alpha, x0, y0, k) -> list[int] | None:
    """Alpha-composite a premultiplied sprite at (x0, y0); write label k; return its bbox."""
    H, W = labels.shape
    h, w = alpha.shape
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if fx0 >= fx1 or fy0 >= fy1:
        return None
    a = alpha[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    src = rgb[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]
    region = frame[fy0:fy1, fx0:fx1]
    region[:] = np.clip(region * (1 - a[..., None]) + src + 0.5, 0, 255).astype(np.uint8)
    mask = a > 127 / 255
    if not mask.any():
        return None
    labels[fy0:fy1, fx0:fx1][mask] = k
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(fx0 + xs[0]), int(fy0 + ys[0]), int(fx0 + xs[-1] + 1), int(fy0 + ys[-1] + 1)]


def _render_shot(spec: ShotSpec, size, fps: int):
    """Yield (rgb frame, label map, instances) for every frame of one shot.

    Depends only on the spec (and size, fps): equal specs give equal pixels, in any episode.
    """
    W, H = size
    rng = np.random.default_rng([spec.background_seed, zlib.crc32(repr(spec).encode())])
    n = max(1, round(spec.seconds * fps))
    bg = make_background(spec.background_seed, size)
    extra = bg.shape[1] - W
    if spec.camera == "pan":
        a, b = (0, extra) if rng.random() < 0.5 else (extra, 0)
        offsets = [round(a + (b - a) * f / max(n - 1, 1)) for f in range(n)]
    else:
        offsets = [int(rng.integers(0, extra + 1))] * n
    z0, z1 = (1.0, ZOOM) if rng.random() < 0.5 else (ZOOM, 1.0)
    tracks = _layout(spec, size, n, fps, rng)
    for f in range(n):
        z = z0 + (z1 - z0) * f / max(n - 1, 1) if spec.camera == "zoom" else 1.0
        if z == 1.0:
            frame = bg[:, offsets[f]:offsets[f] + W].copy()
        else:  # zoom about the frame centre
            m = np.float32([[z, 0, W / 2 - z * (offsets[f] + W / 2)], [0, z, H / 2 - z * H / 2]])
            frame = cv2.warpAffine(bg, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        labels = np.zeros((H, W), np.uint8)
        instances = []
        for k, (char, track) in enumerate(zip(spec.characters, tracks), start=1):
            pose, x, y, flip, canvas_h = track[f]
            height = max(2, round(canvas_h * z))
            rgb, alpha = _sprite(char, pose, height, flip)
            sx, sy = W / 2 + (x - W / 2) * z, H / 2 + (y - H / 2) * z
            bbox = _paste(frame, labels, rgb, alpha, round(sx - alpha.shape[1] / 2), round(sy) - height, k)
            if bbox:
                instances.append({"identity": char, "bbox": bbox, "label": k})
        yield frame, labels, instances


# ---------------------------------------------------------------- episode


def _encoder(container, codec: str, size, fps: int):
    """A yuv420p video stream at constant fps, with quality high enough for accurate masks."""
    options = {"libx264": {"crf": "18", "preset": "fast", "threads": "1"},
               "libvpx-vp9": {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}}.get(codec, {})
    stream = container.add_stream(codec, rate=fps, options=options)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.thread_count = 1  # one encoder thread: the same bytes in every process
    if codec == "mpeg4":  # constant quantiser 2, like `ffmpeg -q:v 2`
        stream.codec_context.qscale = True
        stream.codec_context.global_quality = 2 * 118  # FF_QP2LAMBDA
    return stream


def render_episode(
    out: Path,
    *,
    shots: list[ShotSpec] | None = None,
    seed: int = 0,
    size: tuple[int, int] = (320, 180),
    fps: int = 12,
    black_intro_s: float = 1.0,
    repeat_shot: int | None = 1,
    codec: str = "libx264",
) -> dict:
    """Write the episode video plus ``.truth.json`` and ``.masks.npz`` beside it; return the truth.

    shots defaults to ``default_shots(seed)``; a shot's pixels depend only on its ShotSpec.
    size is (width, height). Truth shot "end" and bbox x1/y1 are exclusive; "repeat_of"
    indexes the truth "shots" list (which starts with the intro when there is one).
    """
    out = Path(out)
    shots = default_shots(seed) if shots is None else shots
    W, H = size
    plan: list[tuple[ShotSpec, int | None]] = [(s, None) for s in shots]  # (spec, repeat of)
    if repeat_shot is not None:
        plan.append((shots[repeat_shot], repeat_shot))
    n_intro = round(black_intro_s * fps)
    n_total = n_intro + sum(max(1, round(s.seconds * fps)) for s, _ in plan)

    labels = np.zeros((n_total, H, W), np.uint8)
    truth_shots: list[dict] = []
    frames: list[dict] = []
    if n_intro:
        truth_shots.append({"start": 0, "end": n_intro, "characters": [], "background_seed": None,
                            "camera": "static", "kind": "intro", "repeat_of": None})
    first = len(truth_shots)  # truth index of shots[0]

    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), "w") as container:
        stream = _encoder(container, codec, size, fps)

        def write(rgb: np.ndarray) -> None:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = len(frames), Fraction(1, fps)  # stream.time_base changes once muxing starts
            container.mux(stream.encode(frame))

        black = np.zeros((H, W, 3), np.uint8)
        for _ in range(n_intro):
            write(black)
            frames.append({"frame_index": len(frames), "shot": 0, "instances": []})
        for spec, repeat_of in plan:
            shot_i, start = len(truth_shots), len(frames)
            for rgb, lab, instances in _render_shot(spec, size, fps):
                labels[len(frames)] = lab
                write(rgb)
                frames.append({"frame_index": len(frames), "shot": shot_i, "instances": instances})
            truth_shots.append({"start": start, "end": len(frames), "characters": list(spec.characters),
                                "background_seed": spec.background_seed, "camera": spec.camera,
                                "kind": "shot" if repeat_of is None else "recap",
                                "repeat_of": None if repeat_of is None else first + repeat_of})
        container.mux(stream.encode(None))

    return write_truth(out, fps, (W, H), truth_shots, frames, labels)


def write_truth(out: Path, fps: int, size: tuple[int, int], shots: list[dict], frames: list[dict],
                labels: np.ndarray) -> dict:
    """Write ``<stem>.truth.json`` and ``<stem>.masks.npz`` beside the video ``out``; return the truth."""
    truth = {"fps": fps, "size": list(size), "n_frames": len(frames),
             "shot_starts": [s["start"] for s in shots], "shots": shots, "frames": frames}
    stem = out.with_suffix("")
    Path(f"{stem}.truth.json").write_text(json.dumps(truth, separators=(",", ":")))
    np.savez_compressed(f"{stem}.masks.npz", labels=labels)
    return truth


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=180)
    p.add_argument("--fps", type=int, default=12)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    truth = render_episode(args.out, shots=default_shots(args.seed, args.shots), seed=args.seed,
                           size=(args.width, args.height), fps=args.fps)
    print(f"{args.out}: {truth['n_frames']} frames, {len(truth['shots'])} shots, "
          f"{truth['n_frames'] / args.fps:.1f} s, rendered in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
