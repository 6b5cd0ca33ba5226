"""Training data for LoRA: a kohya package folder read leniently, aspect buckets, cached latents.

A package (what our `package` stage writes, and what kohya sd-scripts reads)::

    <package>/<repeats>_<name>/           image + same-stem .txt caption pairs
    <package>/validation/<name>/          held-out pairs
    <package>/configs/<name>_config.toml  kohya train_network.py settings (optional)
    <package>/configs/<name>_dataset.toml kohya dataset settings (optional)
    <package>/characters.parquet          trigger word per character (optional)

Folder names are parsed like kohya does: the part before the first `_` must be an integer
(the repeats), the rest is the name; other folders are skipped and reported. A dataset TOML
whose subsets name several of these folders (the package's multi-concept config) is one more
training over all of them, each folder keeping its repeats. Each image's bucket geometry
(original size, crop offset) is recorded when it is bucketed, for SDXL's micro-conditioning.

Masks: a dataset TOML subset with `alpha_mask = true` (kohya's key) says its images' alpha is
the character mask over a whole picture: their RGB is trained as stored and the alpha, at the
latent grid, weights the loss (masked loss). Transparent pixels of other images are composited
onto white.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Example:
    """One training image and its caption, with the `<repeats>_<name>` folder it came from."""

    image: Path
    caption: str
    folder: str = ""        # e.g. "10_hero" (kohya's folder: its tag frequency and repeats)
    repeats: int = 0        # times per epoch; 0 = the job's repeats
    alpha_mask: bool = False  # its subset says alpha_mask: alpha is the loss mask, RGB is kept as stored


@dataclass(frozen=True)
class Geometry:
    """Where a training image sits in its bucket (SDXL micro-conditioning, kohya's order).

    `original_hw` is the image's own (height, width); `crop_top_left` the (top, left) offset of
    the bucket-sized crop in the resized image; `target_hw` the bucket's (height, width).
    """

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]

    @property
    def bucket(self) -> tuple[int, int]:
        """The bucket as (width, height)."""
        return self.target_hw[1], self.target_hw[0]

    def time_ids(self) -> list[int]:
        """SDXL's added time ids: original size, crop top-left, target size."""
        return [*self.original_hw, *self.crop_top_left, *self.target_hw]


@dataclass
class CharacterSet:
    """One character's training data as found in a package."""

    name: str
    folder: Path
    repeats: int
    trigger: str
    train: list[Example]
    validation: list[Example] = field(default_factory=list)
    config_files: list[Path] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)   # a multi-concept training: the characters it covers


def parse_repeats_folder(name: str) -> tuple[int, str] | None:
    """kohya's `<repeats>_<name>` folder name -> (repeats, name); None when it does not parse.

    >>> parse_repeats_folder("30_char_000")
    (30, 'char_000')
    """
    m = _REPEATS.match(name)
    if not m or int(m[1]) < 1 or not m[2].strip():
        return None
    return int(m[1]), m[2].strip()


def _pairs(folder: Path, default_caption: str, repeats: int = 0,
           alpha_mask: bool = False) -> tuple[list[Example], list[str]]:
    """Image/caption pairs of a folder; unreadable images are quarantined with a reason."""
    from PIL import Image

    examples, quarantined = [], []
    for image in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(image) as im:
                im.verify()
        except Exception as exc:  # PIL raises many kinds; all mean "cannot read this image"
            quarantined.append(f"{image.name}: unreadable image ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(errors="replace").strip() if caption_file.is_file() else ""
        examples.append(Example(image=image, caption=caption or default_caption, folder=folder.name, repeats=repeats,
                                alpha_mask=alpha_mask))
    return examples, quarantined


def _triggers(package: Path) -> dict[str, str]:
    path = package / "characters.parquet"
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if not {"character", "trigger"} <= set(table.column_names):
        return {}
    return dict(zip(table.column("character").to_pylist(), table.column("trigger").to_pylist()))


def read_package(package: Path | str) -> tuple[list[CharacterSet], list[str]]:
    """Every character of a kohya package, and the folders that were skipped (with why).

    Raises FileNotFoundError when the folder has no `<repeats>_<name>` folder with images.
    """
    package = Path(package)
    if not package.is_dir():
        raise FileNotFoundError(f"package folder not found: {package}")
    roots = [package] + ([package / "img"] if (package / "img").is_dir() else [])
    triggers = _triggers(package)
    masked = alpha_mask_folders(package)
    characters, skipped = [], []
    for root in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder.name in ("validation", "configs", "img", "reg", "log", "model") or folder.name.startswith("."):
                continue
            parsed = parse_repeats_folder(folder.name)
            if parsed is None:
                skipped.append(f"{folder.name}: name is not <repeats>_<name>")
                continue
            repeats, name = parsed
            train, quarantined = _pairs(folder, name, repeats, folder.name in masked)
            if not train:
                skipped.append(f"{folder.name}: no readable images")
                continue
            validation: list[Example] = []
            if (package / "validation" / name).is_dir():
                validation, bad = _pairs(package / "validation" / name, name, alpha_mask=folder.name in masked)
                quarantined += [f"validation/{q}" for q in bad]
            trigger = triggers.get(name) or train[0].caption.split(",")[0].strip() or name
            configs = [package / "configs" / f"{name}_dataset.toml", package / "configs" / f"{name}_config.toml"]
            characters.append(CharacterSet(name=name, folder=folder, repeats=repeats, trigger=trigger, train=train,
                                           validation=validation, config_files=[c for c in configs if c.is_file()],
                                           quarantined=quarantined))
    if not characters:
        raise FileNotFoundError(f"no <repeats>_<name> image folders in {package}"
                                + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    return characters + _concepts(package, characters), skipped


def _dataset_tomls(package: Path) -> list[tuple[str, dict]]:
    """(name, parsed TOML) of each readable `configs/<name>_dataset.toml` of a package."""
    import tomllib

    found = []
    for path in sorted((package / "configs").glob("*_dataset.toml")) if (package / "configs").is_dir() else []:
        try:
            found.append((path.name[: -len("_dataset.toml")], tomllib.loads(path.read_text())))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
    return found


def _subsets(config: dict) -> list[dict]:
    return [sub for ds in config.get("datasets", []) for sub in ds.get("subsets", [])]


def alpha_mask_folders(package: Path) -> set[str]:
    """Names of the image folders whose dataset TOML subset sets `alpha_mask = true`."""
    return {Path(str(sub.get("image_dir", ""))).name for _, config in _dataset_tomls(package)
            for sub in _subsets(config) if sub.get("alpha_mask") is True}


def _concepts(package: Path, characters: list[CharacterSet]) -> list[CharacterSet]:
    """Multi-concept trainings: a `configs/<name>_dataset.toml` whose subsets name several of the
    package's `<repeats>_<name>` folders (matched by folder name) is one more training over all of
    them, each folder with its own repeats, tag frequency and validation images."""
    by_folder = {c.folder.name: c for c in characters}
    names = {c.name for c in characters}
    found = []
    for name, config in _dataset_tomls(package):
        if name in names:
            continue
        folders = [Path(str(sub.get("image_dir", ""))).name for sub in _subsets(config)]
        members = [by_folder[f] for f in folders if f in by_folder]
        if len(members) < 2 or len(members) != len(folders):
            continue
        trigger = ", ".join(m.trigger for m in members)
        configs = [package / "configs" / f"{name}_dataset.toml", package / "configs" / f"{name}_config.toml"]
        found.append(CharacterSet(name=name, folder=package, repeats=1, trigger=trigger,
                                  train=[e for m in members for e in m.train],
                                  validation=[e for m in members for e in m.validation],
                                  config_files=[c for c in configs if c.is_file()],
                                  quarantined=[q for m in members for q in m.quarantined], concepts=[m.name for m in members]))
    return found


# ---- buckets ---------------------------------------------------------------------------------

def bucket_sizes(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """(width, height) buckets: multiples of `step`, area <= resolution², sides in [min, max]."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (area // width) // step * step)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties: the larger bucket)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit(width: int, height: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], Geometry]:
    """The size an image is resized to (covering the bucket) and where its centre crop sits."""
    w, h = bucket
    scale = max(w / width, h / height)
    size = (max(w, round(width * scale)), max(h, round(height * scale)))
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    return size, Geometry(original_hw=(height, width), crop_top_left=(top, left), target_hw=(h, w))


def load_image(path: Path, bucket: tuple[int, int], keep_rgb: bool = False):
    """RGB float tensor (3, H, W) in [-1, 1]: resized to cover the bucket, centre-cropped.

    Transparent pixels are composited onto white, unless `keep_rgb` (the alpha is a loss mask over
    a whole picture: the RGB is taken as stored, as kohya does for alpha_mask subsets).
    """
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "P") and not keep_rgb:
            im = im.convert("RGBA")
            canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(canvas, im)
        im = im.convert("RGB")
        w, h = bucket
        size, geometry = fit(im.width, im.height, bucket)
        im = im.resize(size, Image.Resampling.LANCZOS)
        top, left = geometry.crop_top_left
        im = im.crop((left, top, left + w, top + h))
        array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_key(path: Path, bucket: tuple[int, int], vae_id: str, keep_rgb: bool = False) -> str:
    """Cache key of one image's latent: its bytes, the bucket, the VAE (and whether alpha was composited)."""
    h = hashlib.sha256(Path(path).read_bytes())
    h.update(f"{bucket}:{vae_id}".encode() + (b":rgb" if keep_rgb else b""))
    return h.hexdigest()[:32]


# ---- masks (masked loss) -----------------------------------------------------------------------

def has_alpha(path: Path) -> bool:
    """Whether an image file carries an alpha channel (RGBA, LA, or a palette with transparency)."""
    from PIL import Image

    with Image.open(path) as im:
        return _carries_alpha(im)


def _carries_alpha(im: Any) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def load_mask(path: Path, bucket: tuple[int, int]):
    """An image's alpha as a float tensor (H, W) in [0, 1], resized and cropped exactly as
    `load_image` does; all ones when the image has no alpha (kohya's rule)."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = bucket
    with Image.open(path) as im:
        if not _carries_alpha(im):
            return torch.ones(h, w)
        alpha = im.convert("RGBA").getchannel("A")
        size, geometry = fit(alpha.width, alpha.height, bucket)
        alpha = alpha.resize(size, Image.Resampling.LANCZOS)
        top, left = geometry.crop_top_left
        alpha = alpha.crop((left, top, left + w, top + h))
        return torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)


def latent_mask(alpha: Any, latent_hw: tuple[int, int], floor: float = 0.0):
    """The loss weights of one image at the latent grid: the alpha (H, W) area-averaged down to
    `latent_hw`, background raised to `floor`, divided by its mean (so the loss keeps its scale
    however much of the picture the character covers). Returns (1, h, w); all zeros for an empty mask."""
    import torch
    import torch.nn.functional as F

    small = F.interpolate(alpha[None, None].float(), size=tuple(latent_hw), mode="area")[0]
    weights = floor + (1.0 - floor) * small.clamp(0.0, 1.0)
    mean = float(weights.mean())
    return weights / mean if mean > 1e-6 else torch.zeros_like(weights)


def masked_loss_on(setting: str, examples: list[Example], character: str = "") -> bool:
    """Whether a training weights its loss by the images' masks: `masked_loss` on / off, or auto
    (on when any training image carries alpha). Raises ValueError for on without any mask."""
    if setting == "off":
        return False
    carried = any(has_alpha(ex.image) for ex in examples)
    if setting == "on" and not carried:
        raise ValueError(f"masked_loss is 'on' but no training image{f' of {character!r}' if character else ''} "
                         "carries an alpha channel (the mask); use masked_loss auto or off, or package the "
                         "images with their masks (package.alpha_mask true)")
    return carried


def latent_masks(examples: list[Example], latents: list[Any], geometry: list[Geometry], floor: float) -> list[Any]:
    """`latent_mask` of each example (its bucket's pixels down to its latent's grid)."""
    return [latent_mask(load_mask(ex.image, geo.bucket), tuple(lat.shape[-2:]), floor)
            for ex, lat, geo in zip(examples, latents, geometry)]


def encode_latents(examples: list[Example], buckets: list[tuple[int, int]], vae: Any, vae_id: str,
                   cache_dir: Path | None, *, device: Any, dtype: Any, batch: int = 8) -> list[tuple[Any, Geometry]]:
    """Latents (scaled, CPU float32) and bucket geometry of each example (read from / written to
    `cache_dir`); the geometry (original size, crop) is recorded here, when the bucket is chosen."""
    import torch
    from safetensors.torch import load_file, save_file

    out: list[Any] = [None] * len(examples)
    sizes = []
    todo: dict[tuple[int, int], list[int]] = {}
    for i, ex in enumerate(examples):
        from PIL import Image

        with Image.open(ex.image) as im:
            bucket = nearest_bucket(im.width, im.height, buckets)
            sizes.append(fit(im.width, im.height, bucket)[1])
        key = image_key(ex.image, bucket, vae_id, ex.alpha_mask)
        cached = cache_dir / f"{key}.safetensors" if cache_dir else None
        if cached is not None and cached.is_file():
            out[i] = load_file(str(cached))["latent"]
        else:
            todo.setdefault(bucket, []).append(i)
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for bucket, indices in todo.items():
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            pixels = torch.stack([load_image(examples[i].image, bucket, examples[i].alpha_mask)
                                  for i in chunk]).to(device, dtype)
            with torch.no_grad():
                latents = (vae.encode(pixels).latent_dist.mode() - shift) * scaling
            for i, latent in zip(chunk, latents.float().cpu()):
                out[i] = latent.contiguous()
                if cache_dir is not None:
                    import os
                    import uuid

                    cache_dir.mkdir(parents=True, exist_ok=True)
                    final = cache_dir / f"{image_key(examples[i].image, bucket, vae_id, examples[i].alpha_mask)}.safetensors"
                    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:6]}.tmp")
                    save_file({"latent": out[i]}, str(tmp))
                    os.replace(tmp, final)
    return list(zip(out, sizes))


def epoch_batches(buckets_of: list[tuple[int, int]], repeats: list[int], batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """One epoch's micro-batches (example indices), kohya-style: image i `repeats[i]` times (its
    folder's repeats), batches drawn within a bucket, shuffled; the same (seed, epoch) always
    gives the same epoch."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, bucket in enumerate(buckets_of):
        by_bucket.setdefault(bucket, []).extend([i] * repeats[i])
    batches = []
    for bucket in sorted(by_bucket):
        items = by_bucket[bucket]
        order = torch.randperm(len(items), generator=gen).tolist()
        shuffled = [items[j] for j in order]
        batches += [shuffled[k:k + batch_size] for k in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[j] for j in order]
