"""Score a segment manifest against the generated footage's ground truth (tests and benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa


def box_iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def score(manifest: pa.Table, run_root: Path, videos: dict[str, Path], *, threshold: float = 0.5,
          match_iou: float = 0.5) -> dict:
    """Mean mask IoU over frames with characters, and instance recall / precision by box IoU.

    Args:
        manifest: the segment manifest.
        run_root: the run folder (manifest paths are relative to it).
        videos: episode id -> the generated video (truth files beside it).
    Returns:
        {"frames", "mean_iou", "instances", "recall", "layers", "precision", "two_char_frames",
         "two_char_split"}: recall = truth instances matched by a layer box / truth instances.
    """
    truth, labels = {}, {}
    for episode, video in videos.items():
        stem = Path(video).with_suffix("")
        truth[episode] = json.loads(Path(f"{stem}.truth.json").read_text())
        labels[episode] = np.load(f"{stem}.masks.npz")["labels"]
    frames: dict[str, dict] = {}
    for row in manifest.to_pylist():
        if row["mask_path"] is None:
            continue
        frame = frames.setdefault(row["source_id"], {"episode": row["episode"], "index": row["frame_index"],
                                                     "mask": row["mask_path"], "boxes": []})
        if row["kept"]:
            frame["boxes"].append(row["bbox"])
    ious, found, present, matched_layers, layers, two, two_split = [], 0, 0, 0, 0, 0, 0
    for frame in frames.values():
        instances = truth[frame["episode"]]["frames"][frame["index"]]["instances"]
        layers += len(frame["boxes"])
        matched_layers += sum(any(box_iou(b, t["bbox"]) >= match_iou for t in instances) for b in frame["boxes"])
        if not instances:
            continue
        gt = labels[frame["episode"]][frame["index"]] > 0
        pred = cv2.imread(str(run_root / frame["mask"]), cv2.IMREAD_GRAYSCALE) >= threshold * 255
        ious.append(float((gt & pred).sum()) / max(float((gt | pred).sum()), 1.0))
        present += len(instances)
        found += sum(any(box_iou(b, t["bbox"]) >= match_iou for b in frame["boxes"]) for t in instances)
        if len(instances) == 2:
            two += 1
            two_split += all(any(box_iou(b, t["bbox"]) >= match_iou for b in frame["boxes"]) for t in instances)
    return {
        "frames": len(ious), "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "instances": present, "recall": found / present if present else 0.0,
        "layers": layers, "precision": matched_layers / layers if layers else 0.0,
        "two_char_frames": two, "two_char_split": two_split,
    }
