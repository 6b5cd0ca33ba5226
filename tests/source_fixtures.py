"""Generated image sources for the render and photo tests: turntable renders and photo sets.

`turntable(angle)` draws a small "product" (a dark rounded body with a green sensor dot) turned by
`angle` degrees on a white background, as a render would; `write_sequence` writes a numbered
sequence of them in the Kyana guide's naming with captions. `photo(seed)` is a distinct picture
(a gradient with coloured discs) standing in for a photo of a person; `write_photos` writes a set
in either layout of the FLUX guide's dataset contract.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def turntable(angle: float, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """One render of the product turned by `angle` degrees (RGB uint8)."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    cx, cy, r = w // 2, h // 2, min(w, h) // 3
    corners = [(cx + r * math.cos(math.radians(angle + 45 + 90 * k)),
                cy + 0.7 * r * math.sin(math.radians(angle + 45 + 90 * k))) for k in range(4)]
    cv2.fillPoly(img, [np.array(corners, np.int32)], (25, 25, 30))
    dot = (int(cx + 0.5 * r * math.cos(math.radians(angle))), cy)
    cv2.circle(img, dot, max(2, min(w, h) // 14), (40, 170, 70), -1)
    return img


def write_sequence(folder: Path, name: str, frames: int, *, size: tuple[int, int] = (64, 64),
                   trigger: str = "Kyana", skip: tuple[int, ...] = ()) -> list[Path]:
    """`NAME_0000.png` ... with a `.txt` caption each; frame numbers in `skip` are left out."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(frames):
        if f in skip:
            continue
        path = folder / f"{name}_{f:04d}.png"
        Image.fromarray(turntable(f * 360 / frames, size)).save(path)
        path.with_suffix(".txt").write_text(f"{trigger} smartwatch, {name.lower().replace('_', ' ')}, "
                                            f"view {f * 360 // frames} degrees")
        paths.append(path)
    return paths


def photo(seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A distinct picture per seed (RGB uint8, width x height = size)."""
    rng = np.random.default_rng(seed)
    w, h = size
    top, bottom = rng.integers(0, 255, 3).astype(np.float32), rng.integers(0, 255, 3).astype(np.float32)
    img = (top + (bottom - top) * np.linspace(0, 1, h)[:, None, None]).repeat(w, axis=1).astype(np.uint8)
    for _ in range(6):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(5, max(6, w // 3))), colour, -1)
    return np.ascontiguousarray(img)


SIZES = ((96, 128), (128, 96), (112, 112))  # portrait, landscape, square: a mixed set


def write_photos(folder: Path, n: int, *, trigger: str = "ohwx", layout: str = "side-by-side",
                 first_seed: int = 0) -> list[Path]:
    """n distinct photos with varied captions that carry the trigger; returns the image paths."""
    images = folder / "images" if layout == "images+captions" else folder
    captions = folder / "captions" if layout == "images+captions" else folder
    images.mkdir(parents=True, exist_ok=True)
    captions.mkdir(parents=True, exist_ok=True)
    poses = ("standing", "sitting", "walking", "smiling", "looking left", "arms crossed")
    places = ("in a park", "indoors", "on a street", "at the beach", "in an office")
    paths = []
    for i in range(n):
        seed = first_seed + i
        path = images / f"photo{seed:02d}.jpg"
        Image.fromarray(photo(seed, SIZES[seed % len(SIZES)])).save(path, quality=95)
        (captions / f"photo{seed:02d}.txt").write_text(f"{trigger}, a person {poses[seed % 6]} {places[seed % 5]}, "
                                                       f"shot {seed}")
        paths.append(path)
    return paths
