"""The colours a character's layers share, and the share of a layer in colours its character lacks.

A character keeps its palette from shot to shot (hair, eyes, skin, clothes); scenery changes with the
shot. So a layer whose pixels fall in colours the character's layers from other shots lack carries
something else: scenery glued on, background between the legs, a second figure. Layers from the layer's
own shot are left out of its comparison, as they carry the same scenery. A costume worn in fewer than half
of the character's other shots counts as foreign too; `tasks/select.py` only ever leaves such layers out
while the character keeps `min_images`.
"""

from __future__ import annotations

from typing import Hashable

import numpy as np

LEVELS = 8
"""Levels per RGB channel of the colour histogram (512 colours: flat anime colours, shaded, stay in one or two)."""
HOLDS = 0.005
"""A layer holds a colour when at least this share of its opaque pixels has it (anti-aliased edges stay below)."""
SHARED = 0.5
"""A colour is the character's when at least this share of its layers from other shots hold it."""


def colour_shares(rgba: np.ndarray) -> np.ndarray:
    """The share of an RGBA layer's opaque pixels (alpha >= 128) in each of LEVELS^3 colours."""
    levels = rgba[..., :3][rgba[..., 3] >= 128].astype(np.int64) * LEVELS // 256
    index = (levels[:, 0] * LEVELS + levels[:, 1]) * LEVELS + levels[:, 2]
    return np.bincount(index, minlength=LEVELS ** 3) / max(len(index), 1)


def foreign_shares(colours: dict[str, np.ndarray], shots: dict[str, Hashable]) -> dict[str, float]:
    """Per layer of one character: the share of its pixels in colours that fewer than SHARED of the
    character's layers from other shots hold. `colours`: layer id -> `colour_shares`; `shots`: layer id
    -> its shot (episode, shot id). A layer with no layer of another shot to compare gets no value."""
    ids = sorted(colours)
    holds = np.stack([colours[i] >= HOLDS for i in ids]) if ids else np.zeros((0, LEVELS ** 3), bool)
    shot_of = [shots.get(i, i) for i in ids]
    out = {}
    for k, item in enumerate(ids):
        others = [j for j in range(len(ids)) if shot_of[j] != shot_of[k]]
        if others:
            theirs = holds[others].mean(0) >= SHARED
            out[item] = float(colours[item][~theirs].sum())
    return out
