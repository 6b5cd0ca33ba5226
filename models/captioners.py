"""Captioners: training images in, one description per image out.

Registry by name (`captioner(spec)`):

- `template` (the offline demo default): fills a kind-specific template with what it measures
  in the image: dominant colours of the character named in words, framing and pose from the
  character's box, plain or scene background, lighting. No model, no download.
- `blip2:<hf id or local dir>`: BLIP2 through transformers (`Blip2ForConditionalGeneration`,
  e.g. `Salesforce/blip2-opt-2.7b`, `Salesforce/blip2-opt-6.7b`, `Salesforce/blip2-flan-t5-xl`),
  batched, bf16/fp16 on CUDA, fp32 on CPU. `blip2:tiny` is an untrained tiny stand-in built
  locally (models/tiny_blip2.py), for tests and offline demos.

Images are RGBA: RGB is the training image as it will be packaged, alpha marks the character
(captioners that look at the whole picture ignore it). Each captioner has `default_prompts`,
one per character kind ("human", "creature", "unknown").
"""

from __future__ import annotations

import threading

import os
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from PIL import Image

KINDS = ("human", "creature", "unknown")


class Captioner(Protocol):
    """Describe a batch of images, one prompt per image."""

    name: str
    default_prompts: dict[str, str]

    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """RGBA images (alpha = the character) and prompts -> one raw caption per image."""
        ...


class CaptionerMissing(FileNotFoundError):
    """A captioner's model is not available locally (and cannot be downloaded)."""


# ---- template ---------------------------------------------------------------------------------

_COLOUR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "red")
_HUE_EDGES = np.array([15, 40, 70, 160, 195, 255, 290, 335, 361])  # degrees: upper edge of each name above


def colour_names(rgb: np.ndarray) -> list[str]:
    """Plain English colour names for an (N, 3) array of RGB pixels (0-255)."""
    x = np.asarray(rgb, np.float32).reshape(-1, 3) / 255.0
    hi, lo = x.max(axis=1), x.min(axis=1)
    light, span = (hi + lo) / 2.0, hi - lo
    sat = np.where(light <= 0.5, span / np.maximum(hi + lo, 1e-6), span / np.maximum(2.0 - hi - lo, 1e-6))
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    safe = np.maximum(span, 1e-6)
    hue = np.where(hi == r, (g - b) / safe, np.where(hi == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.mod(hue * 60.0, 360.0)
    names = np.array(_COLOUR_NAMES, dtype=object)[np.searchsorted(_HUE_EDGES, hue, side="right")]
    names = np.where((hue >= 15) & (hue < 45) & (light < 0.45), "brown", names)
    names = np.where(sat < 0.18, "grey", names)
    names = np.where(light > 0.88, "white", names)
    names = np.where(light < 0.18, "black", names)
    return names.tolist()


def colour_name(rgb: tuple[float, float, float]) -> str:
    """A plain English name for one RGB colour (0-255 channels)."""
    return colour_names(np.array([rgb]))[0]


def dominant_colours(rgb: np.ndarray, mask: np.ndarray, k: int = 2, min_share: float = 0.12) -> list[str]:
    """Names of the most frequent colours among masked pixels (at most k, each >= min_share)."""
    pixels = rgb[mask]
    if len(pixels) == 0:
        return []
    names, counts = np.unique(np.array(colour_names(pixels[:: max(1, len(pixels) // 4000)]), dtype=object),
                              return_counts=True)
    total = counts.sum()
    ranked = sorted(zip(names.tolist(), counts.tolist()), key=lambda kv: (-kv[1], kv[0]))
    return [name for name, n in ranked[:k] if n / total >= min_share]


FRAMINGS = ("portrait", "upper body", "cropped", "full body")
"""The framing words `framing` says."""
CROP_FRAMING = {"head": "portrait", "upper_body": "upper body"}
"""The framing a head or upper-body crop (tasks/select.py) is captioned with, whatever its edges say."""


def framing(top: bool, bottom: bool, side: bool, height_share: float) -> str:
    """How a rendered figure is framed, from the canvas edges its pixels touch (a figure cut by its
    frame stays against the canvas edge where it was cut, tasks/composite.render).

    Cut at the bottom: "portrait" when it also reaches the top or fills 90% of the height, else
    "upper body"; cut elsewhere only (top or a side): "cropped"; cut nowhere: "full body".
    """
    if bottom:
        return "portrait" if top or height_share > 0.9 else "upper body"
    return "cropped" if top or side else "full body"


def measure(image: Image.Image) -> dict[str, str]:
    """What the template captioner can tell from one RGBA training image."""
    arr = np.asarray(image.convert("RGBA"))
    rgb, alpha = arr[..., :3], arr[..., 3]
    mask = alpha > 127
    h, w = alpha.shape
    facts = {"colours": "", "framing": "", "pose": "", "setting": "", "lighting": ""}
    if mask.any():
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        facts["framing"] = framing(y0 <= 0, y1 >= h - 1, x0 <= 0 or x1 >= w - 1, (y1 - y0) / h)
        if facts["framing"] == "full body":  # a pose is read from the whole figure only
            aspect = (y1 - y0) / max(1, x1 - x0)
            facts["pose"] = "standing" if aspect > 1.3 else ("wide stance" if aspect < 0.8 else "compact pose")
        names = dominant_colours(rgb, mask)
        facts["colours"] = f"{' and '.join(names)} colours" if names else ""
    background = alpha < 8
    if background.any():  # plain: nearly every background pixel is close to the median colour
        pixels = rgb[background][:: max(1, int(background.sum()) // 20000)].astype(np.int16)
        off = float((np.abs(pixels - np.median(pixels, axis=0)).max(axis=1) > 24).mean())
        facts["setting"] = "plain background" if off < 0.05 else "scene background"
    luma = float(np.asarray(image.convert("L")).mean())
    facts["lighting"] = "dim lighting" if luma < 70 else ("bright lighting" if luma > 185 else "soft lighting")
    return facts


class TemplateCaptioner:
    """Offline captioner: kind-specific templates filled with measured facts.

    Template placeholders: {colours} {framing} {pose} {setting} {lighting}; empty facts vanish.
    """

    name = "template"
    default_prompts = {
        "human": "anime character, {pose}, {framing}, {setting}, {lighting}, {colours}",
        "creature": "creature, {pose}, {framing}, {setting}, {lighting}, {colours}",
        "unknown": "character, {pose}, {framing}, {setting}, {lighting}, {colours}",
    }

    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        out = []
        for image, prompt in zip(images, prompts):
            text = prompt.format(**measure(image))
            out.append(", ".join(part.strip() for part in text.split(",") if part.strip()))
        return out


# ---- BLIP2 ------------------------------------------------------------------------------------

def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, dtype: str = "auto"):
    """bf16 on CUDA when supported, else fp16 on CUDA, fp32 on CPU (unless given)."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype != "auto":
        if dtype not in table:
            raise ValueError(f"dtype must be auto or one of {', '.join(table)}, got {dtype!r}")
        return table[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Blip2Captioner:
    """BLIP2 (`Blip2ForConditionalGeneration` + `Blip2Processor`) from a hub id or a local folder."""

    default_prompts = {
        "human": "Question: Describe the pose, clothing, expression and setting of this anime character. Answer:",
        "creature": "Question: Describe the pose, body shape, expression and setting of this creature. Answer:",
        "unknown": "Question: Describe this picture: pose, framing and setting. Answer:",
    }

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 40,
                 batch_size: int = 8):
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor
        from transformers.utils import logging as hf_logging

        self.name = f"blip2:{model}"
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        hf_logging.set_verbosity_error()
        try:
            self.processor = Blip2Processor.from_pretrained(model)
            self.model = Blip2ForConditionalGeneration.from_pretrained(model, dtype=self.dtype)
        except OSError as exc:
            from models.local_paths import missing_path

            if missing := missing_path(model, "BLIP2 model"):
                raise CaptionerMissing(f"{missing}; pass caption.captioner=blip2:<an existing folder> or a Hugging "
                                       "Face id (or 'template' for the offline captioner)") from None
            offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes")
            how = ("the hub is offline (HF_HUB_OFFLINE=1); download it on a machine with internet "
                   f"(`huggingface-cli download {model}`) or" if offline else "check the id, or")
            raise CaptionerMissing(
                f"BLIP2 model '{model}' could not be loaded ({type(exc).__name__}); {how} pass "
                "caption.captioner=blip2:/path/to/local/folder (or 'template' for the offline captioner)"
            ) from None
        self.model.to(self.device).eval()
        if self.processor.num_query_tokens is None:  # older processor configs: expand <image> like the model
            self.processor.num_query_tokens = self.model.config.num_query_tokens
        self.processor.tokenizer.padding_side = "left"
        self._torch = torch

    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._batch(images[start:start + self.batch_size], prompts[start:start + self.batch_size]))
        return out

    def _batch(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        torch = self._torch
        rgb = [im.convert("RGB") for im in images]
        inputs = self.processor(images=rgb, text=prompts, return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if not self.model.config.text_config.is_encoder_decoder:  # decoder-only output repeats the prompt
            ids = ids[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


# ---- registry ---------------------------------------------------------------------------------

def _blip2(arg: str, **options) -> Blip2Captioner:
    if not arg:
        raise ValueError("blip2 needs a model: blip2:<hf id or local folder>, e.g. blip2:Salesforce/blip2-opt-2.7b")
    if arg == "tiny":
        from models.tiny_blip2 import ensure_tiny_blip2

        arg = str(ensure_tiny_blip2())
    elif Path(arg).expanduser().is_dir():
        arg = str(Path(arg).expanduser().resolve())
    elif arg.startswith((".", "/", "~")) or "\\" in arg or arg.count("/") > 1:
        raise CaptionerMissing(f"BLIP2 model folder '{arg}' does not exist; pass blip2:<hub id> "
                               "(e.g. blip2:Salesforce/blip2-opt-2.7b) or blip2:/path/to/local/folder")
    return Blip2Captioner(arg, **options)


def _template(arg: str, **options) -> TemplateCaptioner:
    return TemplateCaptioner()


CAPTIONERS: dict[str, Callable[..., Captioner]] = {"template": _template, "blip2": _blip2}
"""name -> factory(argument after ':', device=, dtype=, max_new_tokens=, batch_size=)."""


_cache: dict[tuple, Captioner] = {}
_lock = threading.Lock()


def captioner(spec: str, **options) -> Captioner:
    """The captioner `name` or `name:argument` (e.g. `blip2:Salesforce/blip2-opt-6.7b`), built once per
    process for the same options (thread-safe)."""
    name, _, arg = spec.partition(":")
    if name not in CAPTIONERS:
        raise KeyError(f"unknown captioner '{name}'; known captioners: {', '.join(CAPTIONERS)}")
    key = (spec, tuple(sorted((k, str(v)) for k, v in options.items())))
    with _lock:
        if key not in _cache:
            _cache[key] = CAPTIONERS[name](arg, **options)
        return _cache[key]
