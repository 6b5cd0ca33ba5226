"""Embedders (colour-shape, tiny transformers models, ONNX) and the `embed` stage."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from models.embedders import (ColourShapeEmbedder, ModelNotAvailable, layer_on_background, load_embedder,
                              parse_spec, supports_text)
from tasks.embed import EmbedParams, read_embeddings
from tasks.composite import read_layer
from tasks.run.store import QUARANTINE, RunStore
from tests.stages import run_plain
from tests.truth_layers import commit_truth_segment


@pytest.fixture(scope="module")
def truth_run(tmp_path_factory, episode):
    """A run whose segment stage holds the true layers of one generated episode (every 2nd frame)."""
    store = RunStore(tmp_path_factory.mktemp("runs"), "truth")
    table, identities = commit_truth_segment(store, [episode], stride=2)
    return store, table, identities


def _layers(store, table, n=None):
    paths = table.column("path").to_pylist()[:n]
    return [read_layer(store.root / p) for p in paths]


# ---- colour-shape ------------------------------------------------------------------------------

def test_colour_shape_vectors_are_unit_flip_invariant_and_deterministic(truth_run):
    store, table, _ = truth_run
    layers = _layers(store, table, 12)
    embedder = ColourShapeEmbedder()
    vectors = embedder.embed(layers)
    assert vectors.shape == (12, embedder.dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    mirrored = embedder.embed([np.ascontiguousarray(layer[:, ::-1]) for layer in layers])
    assert np.abs(vectors - mirrored).max() < 1e-4
    assert np.array_equal(vectors, embedder.embed(layers))


def test_colour_shape_nearest_neighbour_is_the_same_character(truth_run):
    store, table, identities = truth_run
    vectors = ColourShapeEmbedder().embed(_layers(store, table))
    truth = np.array([identities[i] for i in table.column("item_id").to_pylist()])
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -2)
    nearest = truth[similarity.argmax(1)]
    assert (nearest == truth).mean() >= 0.97
    same = truth[:, None] == truth[None, :]
    np.fill_diagonal(same, False)
    assert similarity[same].mean() > similarity[~same & (similarity > -2)].mean() + 0.1


def test_colour_shape_survives_an_empty_layer():
    vectors = ColourShapeEmbedder().embed([np.zeros((10, 6, 4), np.uint8), np.zeros((1, 1, 4), np.uint8)])
    assert np.isfinite(vectors).all() and vectors.shape[0] == 2


def test_layer_on_background_crops_to_alpha_and_pads_square():
    layer = np.zeros((20, 30, 4), np.uint8)
    layer[5:15, 10:14] = (255, 0, 0, 255)
    square = layer_on_background(layer, (0, 0, 255))
    assert square.shape == (10, 10, 3)
    assert tuple(square[5, 5]) == (255, 0, 0) and tuple(square[5, 0]) == (0, 0, 255)


# ---- registry -----------------------------------------------------------------------------------

def test_unknown_embedder_lists_the_known_ones():
    with pytest.raises(KeyError, match="known embedders: colour-shape, clip:<model>"):
        parse_spec("resnet:foo")
    with pytest.raises(KeyError, match="onnx:<path to .onnx>"):
        parse_spec("onnx")
    with pytest.raises(ValidationError, match="embedder") as info:
        EmbedParams(embedder="nope")
    assert "known embedders" in str(info.value)
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        EmbedParams(device="gpu")


def test_missing_models_say_how_to_provide_them(tmp_path):
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_embedder(f"onnx:{tmp_path / 'missing.onnx'}")
    with pytest.raises(ModelNotAvailable, match=r"does not exist .*an existing folder saved with save_pretrained"):
        load_embedder(f"clip:{tmp_path / 'no-model-here'}")


# ---- real model classes, tiny weights -------------------------------------------------------------

@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_transformers_embedders_load_from_a_local_folder(tmp_path, family, truth_run):
    from models import tiny_embedders

    folder = getattr(tiny_embedders, f"build_tiny_{family}")(tmp_path / family)
    store, table, _ = truth_run
    embedder = load_embedder(f"{family}:{folder}", batch_size=3, device="cpu")
    vectors = embedder.embed(_layers(store, table, 7))
    assert vectors.shape == (7, embedder.dim) and embedder.dim in (8, 16)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len(np.unique(vectors.round(5), axis=0)) > 1  # different layers, different vectors
    assert supports_text(embedder) == (family != "dinov2")
    if family == "clip":
        text = embedder.embed_text(["a human", "a creature"])
        assert text.shape == (2, embedder.dim)


def test_onnx_embedder_applies_size_mean_and_std(tmp_path):
    from models.tiny_embedders import build_tiny_onnx_embedder

    for channels_last in (False, True):
        path, weight = build_tiny_onnx_embedder(tmp_path / f"m{channels_last}.onnx", channels_last=channels_last)
        embedder = load_embedder(f"onnx:{path}", mean=(0.2, 0.3, 0.4), std=(0.5, 0.25, 0.1), batch_size=2)
        colours = [(200, 40, 90), (10, 220, 30), (128, 128, 128)]
        layers = [np.full((24, 24, 4), (*c, 255), np.uint8) for c in colours]  # square: no padding
        got = embedder.embed(layers)
        pixels = (np.array(colours, np.float32) / 255 - (0.2, 0.3, 0.4)) / (0.5, 0.25, 0.1)
        expected = pixels @ weight
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        assert embedder.size == 16 and embedder.channels_last == channels_last
        assert np.allclose(got, expected, atol=1e-4)


# ---- the stage -------------------------------------------------------------------------------------

def test_embed_stage_writes_fixed_size_vectors_and_quarantines_bad_layers(tmp_path, episode):
    store = RunStore(tmp_path, "run")
    table, _ = commit_truth_segment(store, [episode], stride=4)
    broken = table.column("path").to_pylist()[3]
    (store.root / broken).write_bytes(b"not a png")
    result = run_plain(store, "embed", after="segment", embed=EmbedParams())
    manifest = store.read_manifest("embed")
    dim = ColourShapeEmbedder().dim
    assert manifest.schema.field("embedding").type.list_size == dim
    assert manifest.num_rows == table.num_rows and set(manifest.column("embedder").to_pylist()) == {"colour-shape"}
    rows = {r["item_id"]: r for r in manifest.to_pylist()}
    bad = rows[table.column("item_id").to_pylist()[3]]
    assert bad["kept"] is False and bad["drop_reason"].startswith(QUARANTINE) and "unreadable image" in bad["drop_reason"]
    assert result.summary["quarantined"] == 1 and result.summary["kept"] == table.num_rows - 1
    assert any("unreadable image" in line for line in store.quarantine_report())
    kept = manifest.filter(manifest.column("kept"))
    vectors = read_embeddings(kept)
    assert vectors.shape == (table.num_rows - 1, dim)
    assert all(len(r["phash"]) == 16 and r["sharpness"] > 0 for r in kept.to_pylist())
    assert not run_plain(store, "embed", after="segment", embed=EmbedParams()).recomputed  # same inputs: cached


def test_a_new_episode_embeds_only_its_own_layers(tmp_path, episode, two_episodes):
    store = RunStore(tmp_path, "run")
    commit_truth_segment(store, [episode], stride=6)
    run_plain(store, "embed", after="segment", embed=EmbedParams(shard_size=10_000))
    first_shards = {p.name: os.stat(p / "_DONE.json").st_mtime_ns for p in (store.stage_dir("embed") / "shards").iterdir()}
    table, _ = commit_truth_segment(store, [episode, two_episodes[0]], stride=6)
    run_plain(store, "embed", after="segment", embed=EmbedParams(shard_size=10_000))
    shards = {p.name: os.stat(p / "_DONE.json").st_mtime_ns for p in (store.stage_dir("embed") / "shards").iterdir()}
    assert set(first_shards) < set(shards)
    assert all(shards[k] == first_shards[k] for k in first_shards)  # untouched
    manifest = pq.read_table(store.manifest_path("embed"))
    assert sorted(manifest.column("item_id").to_pylist()) == sorted(table.column("item_id").to_pylist())
