"""Dataset-stage throughput: BLIP2 captioning at batch 1 vs batch 8, and augmentation images/s.

    .venv/bin/python benchmarks/dataset.py [--images 48] [--tokens 20] [--augment 200]

Captioning uses the tiny BLIP2 (models/tiny_blip2.py) through the same adapter and
`from_pretrained(local dir)` path as a hub checkpoint; the ratio batch-8 / batch-1 is what
batching buys per image (on a GPU with the real model the ratio is larger: the model is
bigger than the per-call overhead). Augmentation draws and applies the recorded ops to
sprite layers, with and without writing the PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def bench_caption(n_images: int, tokens: int) -> dict[str, float]:
    import numpy as np
    import torch
    from PIL import Image

    from models.captioners import captioner
    from models.tiny_blip2 import build_tiny_blip2

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 4), dtype=np.uint8), "RGBA") for _ in range(n_images)]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_blip2(Path(tmp) / "tiny-blip2")
        rates = {}
        for batch in (1, 8):
            cap = captioner(f"blip2:{path}", max_new_tokens=tokens, batch_size=batch)
            prompts = [cap.default_prompts["human"]] * n_images
            cap.caption(images[:batch], prompts[:batch])  # warm-up
            rates[batch] = max(_rate(n_images, lambda: cap.caption(images, prompts)) for _ in range(2))
    return rates


def bench_augment(n: int) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from tasks.augment import AugmentParams, apply_ops, draw_ops
    from tests.dataset_fixtures import sprite_layer

    layers = [sprite_layer(identity, "walk2", 160) for identity in ("male_person", "robot", "zombie", "female_person")]
    params = AugmentParams(intensity="heavy", blur_probability=0.5)
    ops = [draw_ops(params, "bench", k, []) for k in range(n)]

    def only_ops():
        for k, op in enumerate(ops):
            apply_ops(layers[k % len(layers)], op)

    with tempfile.TemporaryDirectory() as tmp:
        def with_png():
            for k, op in enumerate(ops):
                Image.fromarray(apply_ops(layers[k % len(layers)], op), "RGBA").save(Path(tmp) / f"{k}.png", compress_level=3)

        def png_only():  # baseline: just writing the originals
            for k in range(n):
                Image.fromarray(layers[k % len(layers)], "RGBA").save(Path(tmp) / f"b{k}.png", compress_level=3)

        return {"ops": _rate(n, only_ops), "ops+png": _rate(n, with_png), "png only": _rate(n, png_only),
                "size": float(np.mean([l.shape[0] * l.shape[1] for l in layers]) ** 0.5)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images captioned per batch size")
    parser.add_argument("--tokens", type=int, default=20, help="max new tokens per caption")
    parser.add_argument("--augment", type=int, default=200, help="augmented images")
    args = parser.parse_args(argv)

    rates = bench_caption(args.images, args.tokens)
    print(f"captioning (tiny BLIP2, {args.images} images, {args.tokens} new tokens, CPU threads {__import__('torch').get_num_threads()})")
    print(f"  batch 1: {rates[1]:8.1f} images/s")
    print(f"  batch 8: {rates[8]:8.1f} images/s")
    print(f"  batch 8 / batch 1: {rates[8] / rates[1]:.1f}x")
    aug = bench_augment(args.augment)
    print(f"augmentation ({args.augment} images, sprite layers ~{aug['size']:.0f} px)")
    print(f"  ops only:       {aug['ops']:8.1f} images/s")
    print(f"  ops + PNG:      {aug['ops+png']:8.1f} images/s")
    print(f"  PNG only (baseline): {aug['png only']:8.1f} images/s  -> augmentation costs "
          f"{aug['png only'] / aug['ops+png']:.1f}x a plain copy")


if __name__ == "__main__":
    main()
