"""Person / head detectors that gate segment layers: RGB frames in, boxes out.

`OnnxDetector(path)` runs a YOLO-style ONNX model, such as the public anime person and head
detectors (YOLOv8 exports): one NCHW float input in 0..1 (fixed size, or dynamic: the frame's
longer side scaled to 640 and padded to a multiple of 32), letterboxed with grey; one output,
either YOLOv8 `(1, 4 + classes, boxes)` (cx, cy, w, h, class scores) or YOLOv5
`(1, boxes, 5 + classes)` (cx, cy, w, h, objectness, class scores), in input pixels. A box
counts when its best score is at least `threshold`. onnxruntime is imported when a detector is built.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

DYNAMIC_SIDE = 640


class DetectorFileMissing(FileNotFoundError):
    """The detector's .onnx file is not where the parameter says."""


def _check(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DetectorFileMissing(f"segment.detector: detector file {path} does not exist; give the path of a "
                                  f"YOLO-style anime person or head detector exported to .onnx")
    return path


def detector_identity(path: str | Path) -> str:
    """What determines the detector's output, for fingerprints: the file's content digest."""
    import hashlib

    path = _check(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name}@{digest.hexdigest()[:16]}"


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The image scaled into (width, height) with grey padding: (padded, scale, (pad x, pad y))."""
    h, w = image.shape[:2]
    tw, th = size
    scale = min(tw / w, th / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.full((th, tw, 3), 114, np.uint8)
    px, py = (tw - nw) // 2, (th - nh) // 2
    canvas[py:py + nh, px:px + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return canvas, scale, (px, py)


def decode(output: np.ndarray, threshold: float) -> np.ndarray:
    """(N, 5) boxes [x0, y0, x1, y1, score] in input pixels from one image's YOLO output."""
    out = np.asarray(output, np.float32)
    if out.ndim == 3:
        out = out[0]
    if out.ndim != 2 or max(out.shape) < 5:
        raise ValueError(f"segment.detector: expected a YOLO output (1, 4+classes, boxes) or (1, boxes, 5+classes), "
                         f"got shape {tuple(output.shape)}")
    if out.shape[0] < out.shape[1]:  # YOLOv8: attributes first (fewer attributes than boxes)
        rows = out.T
        scores = rows[:, 4:].max(1)
    else:  # YOLOv5: boxes first, objectness then classes
        rows = out
        scores = rows[:, 4] * (rows[:, 5:].max(1) if rows.shape[1] > 5 else 1.0)
    keep = scores >= threshold
    cx, cy, bw, bh = (rows[keep, i] for i in range(4))
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, scores[keep]], 1).astype(np.float32)


class OnnxDetector:
    """A YOLO-style ONNX detector (see the module docstring)."""

    def __init__(self, path: str | Path, threshold: float = 0.35):
        import onnxruntime as ort

        from models.segmenters import providers

        self.path = _check(path)
        self.threshold = threshold
        self.session = ort.InferenceSession(str(self.path), providers=providers())
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = model_input.shape
        self.fixed = (shape[3], shape[2]) if all(isinstance(d, int) for d in shape[2:4]) else None
        self.lock = threading.Lock()

    def _size(self, image: np.ndarray) -> tuple[int, int]:
        if self.fixed:
            return self.fixed
        h, w = image.shape[:2]
        scale = DYNAMIC_SIDE / max(h, w)
        return (int(np.ceil(w * scale / 32) * 32), int(np.ceil(h * scale / 32) * 32))

    def detect(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 frames -> per frame (N, 5) boxes [x0, y0, x1, y1, score] in frame pixels."""
        found = []
        for image in images:
            padded, scale, (px, py) = letterbox(image, self._size(image))
            x = np.ascontiguousarray(padded.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)
            with self.lock:
                output = self.session.run(None, {self.input_name: x})[0]
            boxes = decode(output, self.threshold)
            boxes[:, [0, 2]] = (boxes[:, [0, 2]] - px) / scale
            boxes[:, [1, 3]] = (boxes[:, [1, 3]] - py) / scale
            found.append(boxes)
        return found


def overlaps_detection(bbox: list[int], boxes: np.ndarray, min_cover: float) -> bool:
    """Whether the layer box covers at least `min_cover` of some detection box."""
    for x0, y0, x1, y1, _ in np.asarray(boxes).reshape(-1, 5):
        ix = max(0.0, min(bbox[2], x1) - max(bbox[0], x0))
        iy = max(0.0, min(bbox[3], y1) - max(bbox[1], y0))
        area = max((x1 - x0) * (y1 - y0), 1e-6)
        if ix * iy / area >= min_cover:
            return True
    return False
