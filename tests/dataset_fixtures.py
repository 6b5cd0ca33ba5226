"""A tiny run folder that looks like the select and segment stages' output (for the dataset stages).

`make_run(tmp_path, {"hero": ("human", 6), ...})` writes RGBA character layers cut from the
arcade sprites (tests/footage.py), a few RGB background layers, and commits hand-written
`select/manifest.parquet`, `select/characters.parquet` and `segment/manifest.parquet`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from tasks.run.store import RunStore, write_table

POSES = ("idle", "walk0", "walk2", "walk4", "walk6", "jump", "fall", "climb0", "walk1", "walk3", "walk5", "walk7")
SPRITES = {"human": ("male_person", "female_person", "male_adventurer", "female_adventurer"),
           "creature": ("robot", "zombie"), "unknown": ("zombie", "robot")}


def sprite_layer(identity: str, pose: str, height: int, cut_bottom: bool = False) -> np.ndarray:
    """An RGBA layer of one sprite pose: cropped to its box plus a margin, scaled to `height`."""
    from tests.footage import sprite_dir

    (path,) = (sprite_dir() / identity).glob(f"*_{pose}.png")
    rgba = np.asarray(Image.open(path).convert("RGBA"))
    ys, xs = np.nonzero(rgba[..., 3] > 8)
    rgba = rgba[max(0, ys.min() - 4):ys.max() + 5, max(0, xs.min() - 4):xs.max() + 5]
    width = max(1, round(rgba.shape[1] * height / rgba.shape[0]))
    rgba = cv2.resize(rgba, (width, height), interpolation=cv2.INTER_NEAREST)
    if cut_bottom:  # the character was cut by the frame's lower edge
        return np.ascontiguousarray(rgba[: int(height * 0.6)])
    return cv2.copyMakeBorder(rgba, 4, 4, 4, 4, cv2.BORDER_CONSTANT, value=(0, 0, 0, 0))


def background_layer(seed: int, size: tuple[int, int] = (160, 90)) -> np.ndarray:
    from tests.footage import make_background

    return make_background(seed, size)


def make_run(root: Path, characters: dict[str, tuple[str, int]], *, backgrounds: int = 3,
             name: str = "fixture") -> RunStore:
    """A run with `n` layers per character (name -> (kind, n)) committed as the select stage."""
    store = RunStore(root, name)
    layer_dir = store.root / "layers"
    bg_dir = store.root / "backgrounds"
    layer_dir.mkdir(parents=True, exist_ok=True)
    bg_dir.mkdir(parents=True, exist_ok=True)
    rows, summary = [], []
    for c, (character, (kind, n)) in enumerate(sorted(characters.items())):
        identity = SPRITES[kind][c % len(SPRITES[kind])]
        for i in range(n):
            layer = sprite_layer(identity, POSES[i % len(POSES)], 96 + 8 * (i % 5), cut_bottom=(i % 4 == 3))
            path = layer_dir / f"{character}_{i:03d}.png"
            Image.fromarray(layer, "RGBA").save(path)
            rows.append({"item_id": f"ep01:{c:02d}{i:05d}:01", "source_id": f"ep01:{c:02d}{i:05d}",
                         "character": character, "trigger": f"{character}_tok", "cluster_id": c, "kind": kind,
                         "path": path.relative_to(store.root).as_posix()})
        summary.append({"character": character, "trigger": f"{character}_tok", "kind": kind, "cluster_ids": [c],
                        "n_images": n})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("item_id", pa.string()), ("source_id", pa.string()), ("character", pa.string()), ("trigger", pa.string()),
        ("cluster_id", pa.int64()), ("kind", pa.string()), ("path", pa.string())]))
    store.stage_dir("select").mkdir(parents=True, exist_ok=True)
    write_table(pa.Table.from_pylist(summary, schema=pa.schema([
        ("character", pa.string()), ("trigger", pa.string()), ("kind", pa.string()),
        ("cluster_ids", pa.list_(pa.int64())), ("n_images", pa.int64())])),
        store.stage_dir("select") / "characters.parquet")
    store.commit_stage("select", table, "fixture-select", outputs=["select/characters.parquet"])
    bg_rows = []
    for b in range(backgrounds):
        path = bg_dir / f"bg{b:02d}.png"
        Image.fromarray(background_layer(100 + b), "RGB").save(path)
        bg_rows.append({"item_id": f"ep01:bg{b:02d}:01", "background_path": path.relative_to(store.root).as_posix()})
    store.stage_dir("segment").mkdir(parents=True, exist_ok=True)
    store.commit_stage("segment", pa.Table.from_pylist(bg_rows, schema=pa.schema([
        ("item_id", pa.string()), ("background_path", pa.string())])), "fixture-segment")
    return store
