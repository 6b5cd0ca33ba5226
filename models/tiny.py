"""Tiny randomly-initialised models built from configs in code, for tests and the offline demo.

Each builder saves a model folder with `save_pretrained`; code loads it back through the same
`from_pretrained(local dir)` the real model ids use. Builders live in their own small modules
and are gathered here:

    build_tiny_sd15(path), build_tiny_sdxl(path)    Stable Diffusion pipelines (models/tiny_sd.py)
    build_tiny_blip2(path)                        BLIP2 captioner + processor (models/tiny_blip2.py)
    build_tiny_clip / _siglip / _dinov2(path)     layer embedders (models/tiny_embedders.py)
    build_tiny_onnx_embedder(path)                an ONNX image embedder (models/tiny_embedders.py)
"""

from models.tiny_sd import build_tiny_sd15, build_tiny_sdxl, ensure_tiny_base  # noqa: F401
from models.tiny_blip2 import build_tiny_blip2, ensure_tiny_blip2  # noqa: F401
from models.tiny_embedders import (build_tiny_clip, build_tiny_dinov2, build_tiny_onnx_embedder,  # noqa: F401
                                   build_tiny_siglip)
