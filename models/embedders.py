"""Layer embedders: RGBA character layers in, L2-normalised identity vectors out.

Registry by spec string (`load_embedder(spec, ...)`), `<family>` or `<family>:<model>`:

- `colour-shape` — the offline default; no weights. Alpha-masked colour histograms in HSV
  (whole figure and head / torso / legs bands) plus shape features of the alpha and its edges
  (Hu moments, width profiles, folded edge orientations); invariant to left/right flips.
- `clip:<hf id or folder>`, `siglip:<...>`, `dinov2:<...>` — transformers models (GPU and fp16
  when CUDA is present, batched). CLIP and SigLIP also embed text, which gives the tier stage
  its zero-shot `kind`. Without a model part the real defaults below are used; they download on
  first use, so offline give a local folder.
- `onnx:<path>` — any image model file (e.g. an anime identity model such as CCIP); input size,
  mean and std are options; the first output, flattened, is the embedding.

Layers are composited on a flat background and padded to a square before a model sees them.
Heavy imports (torch, transformers, onnxruntime) happen when an embedder is built.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import cv2
import numpy as np

DEFAULT_MODELS = {
    "clip": "openai/clip-vit-base-patch32",
    "siglip": "google/siglip-base-patch16-224",
    "dinov2": "facebook/dinov2-small",
}
TEXT_FAMILIES = ("clip", "siglip")


@runtime_checkable
class Embedder(Protocol):
    """Identity vectors for a batch of character layers."""

    name: str
    dim: int

    def embed(self, layers: list[np.ndarray]) -> np.ndarray:
        """RGBA uint8 (H, W, 4) layers -> float32 (n, dim), each row L2-normalised."""
        ...


@runtime_checkable
class TextEmbedder(Embedder, Protocol):
    """An embedder whose text vectors live in the same space as its image vectors (CLIP-type)."""

    def embed_text(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> float32 (n, dim), each row L2-normalised."""
        ...


class ModelNotAvailable(FileNotFoundError):
    """An embedder's model cannot be loaded (missing file, or offline without a local copy)."""


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def layer_on_background(layer: np.ndarray, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """RGBA layer -> RGB square: cropped to its opaque pixels, composited, padded centred."""
    alpha = layer[..., 3]
    ys, xs = np.nonzero(alpha > 0)
    if len(ys):
        layer = layer[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    a = layer[..., 3:4].astype(np.float32) / 255.0
    rgb = layer[..., :3].astype(np.float32) * a + np.float32(background) * (1.0 - a)
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.empty((side, side, 3), np.float32)
    square[:] = background
    y0, x0 = (side - h) // 2, (side - w) // 2
    square[y0:y0 + h, x0:x0 + w] = rgb
    return np.clip(square + 0.5, 0, 255).astype(np.uint8)


# ---- colour-shape (offline default) -----------------------------------------------------------

class ColourShapeEmbedder:
    """Hand-made identity features of an RGBA layer; needs no model weights.

    Colour: soft hue x saturation x value histograms of the opaque pixels (greys binned by
    value), for the whole figure and for three horizontal bands. Shape: Hu moments, aspect,
    row and folded column profiles of the alpha, and flip-folded edge orientations per band.
    Each block is normalised and weighted, then the whole vector is L2-normalised.
    """

    name = "colour-shape"
    HUE, GREY, BANDS, SIDE = 12, 4, 3, 96
    WEIGHTS = {"colour": 1.0, "bands": 1.0, "shape": 0.35, "edges": 0.35}

    def __init__(self) -> None:
        self.dim = len(self._features(np.zeros((4, 4, 4), np.uint8)))

    def embed(self, layers: list[np.ndarray]) -> np.ndarray:
        if not layers:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(np.stack([self._features(layer) for layer in layers]))

    # -- blocks
    def _colour_hist(self, hsv: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Soft histogram: 12 hues x 2 saturations x 2 values for colours, 4 values for greys."""
        h, s, v = (hsv[:, i].astype(np.float32) for i in range(3))
        chroma = np.clip((s - 40.0) / 30.0, 0.0, 1.0) * np.clip((v - 40.0) / 30.0, 0.0, 1.0)
        pos = h / 180.0 * self.HUE - 0.5
        lo = np.floor(pos)
        frac = pos - lo
        lo = lo.astype(np.int64) % self.HUE
        hi = (lo + 1) % self.HUE
        tone = (s >= 150).astype(np.int64) * 2 + (v >= 170).astype(np.int64)
        w = weight * chroma
        hist = np.bincount(lo * 4 + tone, w * (1 - frac), self.HUE * 4)
        hist += np.bincount(hi * 4 + tone, w * frac, self.HUE * 4)
        gpos = np.clip(v / 256.0 * self.GREY - 0.5, 0, self.GREY - 1)
        glo = np.floor(gpos).astype(np.int64)
        gfrac = gpos - glo
        ghi = np.minimum(glo + 1, self.GREY - 1)
        gw = weight * (1 - chroma)
        grey = np.bincount(glo, gw * (1 - gfrac), self.GREY) + np.bincount(ghi, gw * gfrac, self.GREY)
        full = np.concatenate([hist, grey])
        return np.sqrt(full / max(full.sum(), 1e-6))  # Hellinger: sqrt of proportions

    def _features(self, layer: np.ndarray) -> np.ndarray:
        alpha = layer[..., 3]
        ys, xs = np.nonzero(alpha > 127)
        n_colour = self.HUE * 4 + self.GREY
        if len(ys) < 4:  # an empty layer: a zero colour part, shape of a point
            crop = np.zeros((2, 2, 4), np.uint8)
        else:
            crop = layer[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        h, w = crop.shape[:2]
        scale = self.SIDE / max(h, w)
        if scale < 1:
            crop = cv2.resize(crop, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        rgb, a = crop[..., :3], crop[..., 3].astype(np.float32) / 255.0
        hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).reshape(-1, 3)
        weight = a.reshape(-1)
        colour = self._colour_hist(hsv, weight)
        rows = np.arange(crop.shape[0])
        band_of_row = np.minimum(rows * self.BANDS // max(crop.shape[0], 1), self.BANDS - 1)
        band_of_px = np.repeat(band_of_row, crop.shape[1])
        bands = [self._colour_hist(hsv[band_of_px == b], weight[band_of_px == b]) for b in range(self.BANDS)]
        blocks = {
            "colour": _unit(colour),
            "bands": _unit(np.concatenate(bands)),
            "shape": _unit(_shape_features(a)),
            "edges": _unit(_edge_features(rgb, a, band_of_row, self.BANDS)),
        }
        if not weight.any():
            blocks["colour"] = np.zeros(n_colour, np.float32)
            blocks["bands"] = np.zeros(n_colour * self.BANDS, np.float32)
        return np.concatenate([self.WEIGHTS[k] * v for k, v in blocks.items()]).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / max(float(np.linalg.norm(x)), 1e-6)


def _shape_features(alpha: np.ndarray) -> np.ndarray:
    """Flip-invariant silhouette measures, centred so that cosine similarity can tell them apart."""
    mask = (alpha > 0.5).astype(np.uint8)
    hu = cv2.HuMoments(cv2.moments(mask, binaryImage=True)).reshape(-1)[:4]
    hu = -np.sign(hu) * np.log10(np.abs(hu) + 1e-30)
    hu = (np.clip(hu, 0, 12) - np.array([0.7, 2.2, 3.5, 3.5])) / 2.0
    h, w = mask.shape
    aspect = np.log(h / max(w, 1)) - 0.5
    rows = cv2.resize(mask.astype(np.float32), (1, 12), interpolation=cv2.INTER_AREA).reshape(-1) - 0.6
    cols = cv2.resize(mask.astype(np.float32), (8, 1), interpolation=cv2.INTER_AREA).reshape(-1)
    cols = (cols + cols[::-1])[:4] / 2 - 0.6
    return np.concatenate([hu, [aspect], rows, cols])


def _edge_features(rgb: np.ndarray, alpha: np.ndarray, band_of_row: np.ndarray, n_bands: int) -> np.ndarray:
    """Gradient orientation histograms (folded so a mirrored figure gives the same) per band."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32) * alpha + 128.0 * (1 - alpha)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    angle = np.degrees(np.arctan2(np.abs(gy), np.abs(gx)))  # 0..90: folded over both mirror axes
    bins = np.minimum((angle / 90.0 * 6).astype(np.int64), 5)
    out = []
    for b in range(n_bands):
        sel = band_of_row == b
        hist = np.bincount(bins[sel].reshape(-1), mag[sel].reshape(-1), 6)
        out.append(hist / max(hist.sum(), 1e-6) - 1.0 / 6)
    return np.concatenate(out)


# ---- transformers models ----------------------------------------------------------------------

def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a GPU, else `cpu`."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _missing_model(family: str, model: str, exc: BaseException) -> ModelNotAvailable:
    from models.local_paths import missing_path

    if missing := missing_path(model, f"{family} model"):
        return ModelNotAvailable(f"{missing}; pass '{family}:<an existing folder saved with save_pretrained>', "
                                 "a Hugging Face id, or the offline default 'colour-shape'")
    return ModelNotAvailable(
        f"{family} model {model!r} could not be loaded ({type(exc).__name__}: {str(exc).strip()[:200]}). "
        f"Downloads need internet (and HF_HUB_OFFLINE unset); offline, save the model with "
        f"save_pretrained into a folder and pass '{family}:<folder>', or use the offline default 'colour-shape'."
    )


class TransformersEmbedder:
    """CLIP / SigLIP image (and text) towers, or a DINOv2 backbone, through transformers."""

    def __init__(self, family: str, model: str, *, device: str = "auto", batch_size: int = 32,
                 background: tuple[int, int, int] = (255, 255, 255)):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.family, self.model_id = family, model
        self.name = f"{family}:{model}"
        self.device = resolve_device(device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.batch_size, self.background = batch_size, background
        try:
            self.model = AutoModel.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
            self.processor = AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise _missing_model(family, model, exc) from exc
        self._tokenizer = None
        self.dim = int(self.embed([np.zeros((8, 8, 4), np.uint8)]).shape[1])

    def _image_vectors(self, pixel_values: Any) -> Any:
        import torch

        if self.family == "dinov2":
            out = self.model(pixel_values=pixel_values)
            return out.pooler_output
        out = self.model.get_image_features(pixel_values=pixel_values)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def embed(self, layers: list[np.ndarray]) -> np.ndarray:
        import torch

        chunks = []
        for start in range(0, len(layers), self.batch_size):
            images = [layer_on_background(layer, self.background) for layer in layers[start:start + self.batch_size]]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                vectors = self._image_vectors(pixels.to(self.device, self.dtype))
            chunks.append(vectors.float().cpu().numpy())
        if not chunks:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return l2_normalise(np.concatenate(chunks))

    def embed_text(self, prompts: list[str]) -> np.ndarray:
        import torch
        from transformers import AutoTokenizer

        if self.family not in TEXT_FAMILIES:
            raise TypeError(f"{self.name} has no text tower; text embedding needs one of {TEXT_FAMILIES}")
        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_id)
            except (OSError, ValueError) as exc:
                raise _missing_model(self.family, self.model_id, exc) from exc
        padding = "max_length" if self.family == "siglip" else True
        tokens = self._tokenizer(prompts, padding=padding, truncation=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.get_text_features(**tokens)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return l2_normalise(out.float().cpu().numpy())


class ImageOnlyTransformersEmbedder(TransformersEmbedder):
    """DINOv2: no text tower, so it is not a TextEmbedder."""

    embed_text = None  # type: ignore[assignment]


# ---- ONNX models ------------------------------------------------------------------------------

class OnnxEmbedder:
    """Any image model file: square input (NCHW or NHWC), (x/255 - mean) / std, first output flattened."""

    def __init__(self, path: str, *, input_size: int = 224, mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                 std: tuple[float, float, float] = (0.5, 0.5, 0.5), batch_size: int = 32,
                 background: tuple[int, int, int] = (255, 255, 255)):
        import onnxruntime as ort

        file = Path(path).expanduser()
        if not file.is_file():
            raise ModelNotAvailable(f"onnx model file {file} does not exist; pass 'onnx:<path to .onnx>'")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        available = ort.get_available_providers()
        providers = (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(file), sess_options=options, providers=providers)
        model_input = self.session.get_inputs()[0]
        shape = list(model_input.shape)
        self.input_name = model_input.name
        self.channels_last = len(shape) == 4 and shape[-1] == 3 and shape[1] != 3
        spatial = shape[1:3] if self.channels_last else shape[2:4]
        fixed = [d for d in spatial if isinstance(d, int) and d > 0]
        self.size = fixed[0] if fixed else input_size
        self.batched = not (isinstance(shape[0], int) and shape[0] == 1)
        self.mean, self.std = np.float32(mean), np.float32(std)
        self.batch_size, self.background = batch_size, background
        self.name = f"onnx:{path}"
        self.dim = int(self.embed([np.zeros((8, 8, 4), np.uint8)]).shape[1])

    def _pixels(self, layer: np.ndarray) -> np.ndarray:
        square = layer_on_background(layer, self.background)
        side = square.shape[0]
        interp = cv2.INTER_AREA if side > self.size else cv2.INTER_CUBIC
        x = (cv2.resize(square, (self.size, self.size), interpolation=interp).astype(np.float32) / 255.0 - self.mean) / self.std
        return x if self.channels_last else x.transpose(2, 0, 1)

    def embed(self, layers: list[np.ndarray]) -> np.ndarray:
        step = self.batch_size if self.batched else 1
        chunks = []
        for start in range(0, len(layers), step):
            batch = np.stack([self._pixels(layer) for layer in layers[start:start + step]]).astype(np.float32)
            out = self.session.run(None, {self.input_name: batch})[0]
            chunks.append(np.asarray(out, np.float32).reshape(len(batch), -1))
        if not chunks:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return l2_normalise(np.concatenate(chunks))


# ---- registry ---------------------------------------------------------------------------------

def _transformers(family: str) -> Callable[..., Embedder]:
    def build(model: str | None, **options: Any) -> Embedder:
        cls = ImageOnlyTransformersEmbedder if family not in TEXT_FAMILIES else TransformersEmbedder
        kwargs = {k: options[k] for k in ("device", "batch_size", "background") if k in options}
        return cls(family, model or DEFAULT_MODELS[family], **kwargs)
    return build


def _onnx(model: str | None, **options: Any) -> Embedder:
    if not model:
        raise ValueError("the onnx embedder needs a model file: 'onnx:<path to .onnx>'")
    kwargs = {k: options[k] for k in ("input_size", "mean", "std", "batch_size", "background") if k in options}
    return OnnxEmbedder(model, **kwargs)


REGISTRY: dict[str, Callable[..., Embedder]] = {
    "colour-shape": lambda model=None, **options: ColourShapeEmbedder(),
    "clip": _transformers("clip"),
    "siglip": _transformers("siglip"),
    "dinov2": _transformers("dinov2"),
    "onnx": _onnx,
}
_cache: dict[tuple, Embedder] = {}
_lock = threading.Lock()


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`family[:model]` -> (family, model or None); KeyError listing the known families."""
    family, _, model = str(spec).partition(":")
    family = family.strip().lower()
    if family not in REGISTRY:
        known = ", ".join(f"{name}:<model>" if name != "colour-shape" else name for name in REGISTRY)
        raise KeyError(f"unknown embedder {spec!r}; known embedders: {known}")
    if family == "colour-shape" and model:
        raise KeyError(f"embedder 'colour-shape' takes no model part, got {spec!r}")
    if family == "onnx" and not model:
        raise KeyError(f"embedder 'onnx' needs a model file: 'onnx:<path to .onnx>', got {spec!r}")
    return family, (model or None)


def embedder_identity(spec: str) -> str:
    """What determines an embedder's vectors, for fingerprints: the spec plus local file digests."""
    from models.weights import file_identity

    family, model = parse_spec(spec)
    if family == "colour-shape":
        return f"colour-shape@{ColourShapeEmbedder.HUE}.{ColourShapeEmbedder.BANDS}.v1"
    path = Path(model or DEFAULT_MODELS.get(family, "")).expanduser()
    if path.is_file():
        return f"{spec}@{file_identity(path)[:16]}"
    if path.is_dir():
        parts = [f"{f.name}:{file_identity(f)[:16]}" for f in sorted(path.iterdir())
                 if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".onnx")]
        return f"{spec}@{'|'.join(parts)}"
    return spec


def load_embedder(spec: str, **options: Any) -> Embedder:
    """The embedder for `spec`, built once per process for the same options (thread-safe).

    Options: device, batch_size, background (all), input_size, mean, std (onnx).
    """
    family, model = parse_spec(spec)
    key = (family, model, tuple(sorted((k, str(v)) for k, v in options.items())))
    with _lock:
        if key not in _cache:
            _cache[key] = REGISTRY[family](model, **options)
        return _cache[key]


def supports_text(embedder: Embedder) -> bool:
    return callable(getattr(embedder, "embed_text", None))
