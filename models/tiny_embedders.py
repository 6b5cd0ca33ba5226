"""Tiny randomly-initialised embedder models built from configs in code, for tests and benchmarks.

Real classes and file layouts (`CLIPModel`, `SiglipModel`, `Dinov2Model` with their image
processors, saved with `save_pretrained`), so `clip:<folder>` etc. load through exactly the code
path a hub checkpoint uses. `build_tiny_onnx_embedder` writes a small ONNX image model. Their
vectors carry no meaning: they exercise the plumbing without a download.
"""

from __future__ import annotations

from pathlib import Path

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _vision(hidden: int = 16) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                image_size=32, patch_size=8)


def build_tiny_clip(path: Path | str, seed: int = 0, projection_dim: int = 8) -> Path:
    """A tiny `CLIPModel` + its image processor + character-level `CLIPTokenizer` in `path`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    path = Path(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _LETTERS:
        vocab[c] = len(vocab)
        vocab[f"{c}</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=_vision(), projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_siglip(path: Path | str, seed: int = 0) -> Path:
    """A tiny `SiglipModel` + its image processor (no tokenizer: image embedding only) in `path`."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    path = Path(path)
    config = SiglipConfig(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=1,
                                           pad_token_id=1),
                          vision_config=_vision())
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(path)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def build_tiny_dinov2(path: Path | str, seed: int = 0) -> Path:
    """A tiny `Dinov2Model` + DINOv2's image processor (`BitImageProcessorPil`) in `path`."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    path = Path(path)
    config = Dinov2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8)
    torch.manual_seed(seed)
    Dinov2Model(config).eval().save_pretrained(path)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def build_tiny_onnx_embedder(path: Path | str, *, size: int = 16, dim: int = 6, seed: int = 0,
                             channels_last: bool = False) -> tuple[Path, "object"]:
    """An ONNX model `pixel_values (N, 3, size, size) -> mean over pixels @ W (N, dim)`.

    Returns (file, W) so a test can compute the expected vectors by hand.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    weight = np.random.default_rng(seed).normal(size=(3, dim)).astype(np.float32)
    shape = ["n", size, size, 3] if channels_last else ["n", 3, size, size]
    nodes = []
    pixels = "pixel_values"
    if channels_last:
        nodes.append(helper.make_node("Transpose", [pixels], ["nchw"], perm=[0, 3, 1, 2]))
        pixels = "nchw"
    nodes += [helper.make_node("GlobalAveragePool", [pixels], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
              helper.make_node("MatMul", ["flat", "W"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "tiny_embedder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", dim])],
        initializer=[numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path, weight
