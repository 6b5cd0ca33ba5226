"""Stage `augment`: the seed's multipliers, recorded and reproducible ops, flips off for asymmetric
characters, background swaps, quarantine, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from flows.params import RunParams
from tasks.augment import AUGMENT, AugmentParams, apply_ops, draw_ops, multiplier, target_count
from tasks.composite import read_layer
from tasks.run.runner import on_disk
from tasks.run.stage import RunRef
from tests.dataset_fixtures import make_run
from tests.stages import run_plain


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """hero (human, 6 layers), blob (creature, 12), big (human, 32: above max_original)."""
    store = make_run(tmp_path_factory.mktemp("aug"), {"hero": ("human", 6), "blob": ("creature", 12),
                                                      "big": ("human", 32)})
    params = AugmentParams(intensity="heavy", background_swap_probability=0.5)
    result = run_plain(store, "augment", after="select", augment=params)
    return store, params, result


def _rows(store):
    return store.read_manifest("augment").to_pylist()


# ---- how many -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,low,high", [(5, 6, 8), (10, 6, 8), (11, 4, 5), (15, 4, 5), (16, 3, 4), (20, 3, 4),
                                        (21, 1.5, 2), (30, 1.5, 2)])
def test_multipliers_follow_the_seed(n, low, high):
    assert multiplier(n, "light") == low
    assert multiplier(n, "heavy") == high
    assert multiplier(n, "medium") == (low + high) / 2
    assert target_count(n, AugmentParams(intensity="heavy")) == round(n * high)
    assert target_count(n, AugmentParams(intensity="light")) == round(n * low)


def test_only_clusters_between_min_and_max_are_augmented():
    params = AugmentParams()
    assert target_count(4, params) == 4
    assert target_count(31, params) == 31
    assert target_count(5, params) == 35
    assert target_count(3, AugmentParams(min_original=3)) == round(3 * 7)
    assert target_count(30, AugmentParams(max_original=20)) == 30


def test_counts_in_the_manifest(augmented):
    store, params, result = augmented
    rows = [r for r in _rows(store) if r["kept"]]
    count = {c: sum(r["character"] == c for r in rows) for c in ("hero", "blob", "big")}
    assert count == {"hero": 6 * 8, "blob": round(12 * 5), "big": 32}
    assert result.summary["augmented"] == 48 - 6 + 60 - 12
    originals = [r for r in rows if not r["augmented"]]
    assert len(originals) == 6 + 12 + 32
    assert all(r["ops"] == "{}" and r["path"].startswith("layers/") for r in originals)
    for r in rows:
        assert (store.root / r["path"]).is_file()
        if r["augmented"]:
            assert r["source_id"] == r["group_id"] and r["item_id"].startswith(r["source_id"] + ":aug")


# ---- ops ----------------------------------------------------------------------------------------

def test_ops_are_recorded_within_the_seed_ranges(augmented):
    store, params, _ = augmented
    backgrounds = {r["background_path"] for r in store.read_manifest("segment").to_pylist()}
    ops = [json.loads(r["ops"]) for r in _rows(store) if r["augmented"]]
    assert len(ops) == 90
    for op in ops:
        assert set(op) == {"flip", "rotate", "crop", "crop_x", "crop_y", "brightness", "contrast", "hue", "blur", "background"}
        assert abs(op["rotate"]) <= 5 and 0.8 <= op["brightness"] <= 1.2 and 0.9 <= op["contrast"] <= 1.1
        assert abs(op["hue"]) <= 10 and 0.95 <= op["crop"] <= 1.0 and 0 <= op["blur"] <= 0.8
        assert op["background"] is None or op["background"] in backgrounds
    assert any(op["flip"] for op in ops) and not all(op["flip"] for op in ops)
    assert any(op["background"] for op in ops) and not all(op["background"] for op in ops)
    assert any(op["blur"] for op in ops)
    light = [draw_ops(AugmentParams(intensity="light"), "hero", k, []) for k in range(50)]
    assert max(abs(o["rotate"]) for o in light) <= 2.5 and min(o["crop"] for o in light) >= 0.975


def test_recorded_ops_reproduce_each_image(augmented):
    store, _, _ = augmented
    rows = _rows(store)
    by_id = {r["item_id"]: r for r in rows}
    for row in [r for r in rows if r["augmented"]][::7]:
        original = read_layer(store.root / by_id[row["source_id"]]["path"])
        again = apply_ops(original, json.loads(row["ops"]))
        saved = np.asarray(Image.open(store.root / row["path"]))
        assert np.array_equal(again, saved), row["item_id"]
        assert row["background_path"] == json.loads(row["ops"])["background"]


def test_same_seed_same_images_other_seed_other_images(tmp_path, augmented):
    store, params, _ = augmented
    other = make_run(tmp_path, {"hero": ("human", 6), "blob": ("creature", 12), "big": ("human", 32)})
    run_plain(other, "augment", after="select", augment=params)
    mine = {r["item_id"]: r for r in _rows(store)}
    assert len(_rows(other)) == len(mine)
    for row in _rows(other):
        assert row["ops"] == mine[row["item_id"]]["ops"]
        if row["augmented"]:
            assert np.array_equal(np.asarray(Image.open(other.root / row["path"])),
                                  np.asarray(Image.open(store.root / mine[row["item_id"]]["path"])))
    reseeded = [draw_ops(params.model_copy(update={"seed": 1}), "hero", k, []) for k in range(5)]
    assert [o["rotate"] for o in reseeded] != [draw_ops(params, "hero", k, [])["rotate"] for k in range(5)]


def test_asymmetric_characters_are_never_flipped():
    params = AugmentParams(asymmetric=["hero"])
    assert not any(draw_ops(params, "hero", k, [])["flip"] for k in range(60))
    assert any(draw_ops(params, "blob", k, [])["flip"] for k in range(60))
    assert not any(draw_ops(AugmentParams(flip=False), "blob", k, [])["flip"] for k in range(60))


def test_each_op_changes_what_it_names():
    rng = np.random.default_rng(0)
    layer = np.zeros((60, 40, 4), np.uint8)
    layer[10:50, 5:25, :3] = rng.integers(40, 200, (40, 20, 3))
    layer[10:50, 5:25, 3] = 255
    none = dict(flip=False, rotate=0.0, crop=1.0, crop_x=0.5, crop_y=0.5, brightness=1.0, contrast=1.0, hue=0.0, blur=0.0)
    assert np.array_equal(apply_ops(layer, none), layer)
    assert np.array_equal(apply_ops(layer, {**none, "flip": True}), layer[:, ::-1])
    bright = apply_ops(layer, {**none, "brightness": 1.2})
    assert bright[..., :3][layer[..., 3] > 0].mean() > layer[..., :3][layer[..., 3] > 0].mean() * 1.1
    assert apply_ops(layer, {**none, "crop": 0.95}).shape[:2] == (57, 38)
    rotated = apply_ops(layer, {**none, "rotate": 5.0})
    assert rotated.shape == layer.shape and not np.array_equal(rotated[..., 3], layer[..., 3])
    hued = apply_ops(layer, {**none, "hue": 10.0})
    assert np.array_equal(hued[..., 3], layer[..., 3]) and not np.array_equal(hued[..., :3], layer[..., :3])
    blurred = apply_ops(layer, {**none, "blur": 0.8})
    assert 0 < blurred[..., 3][9, 15] < 255  # the hard edge is softened


# ---- bad input, parameters, resume, Prefect -------------------------------------------------------

def test_unreadable_layer_is_quarantined_and_the_rest_goes_on(tmp_path):
    store = make_run(tmp_path, {"hero": ("human", 6)})
    bad = store.read_manifest("select").to_pylist()[2]["path"]
    (store.root / bad).write_bytes(b"not a png")
    run_plain(store, "augment", after="select", augment=AugmentParams())
    rows = _rows(store)
    broken = [r for r in rows if not r["kept"]]
    assert len(broken) == 1 and broken[0]["drop_reason"].startswith("quarantine: " + bad)
    assert sum(r["kept"] for r in rows) == 5 * 7  # 5 readable originals, medium 7x
    assert all(r["source_id"] != broken[0]["item_id"] for r in rows if r["augmented"])
    assert "augment" in "\n".join(store.quarantine_report())


def test_parameters_are_checked_with_the_field_named():
    with pytest.raises(ValidationError, match="min_original"):
        AugmentParams(min_original=10, max_original=5)
    with pytest.raises(ValidationError, match="brightness"):
        AugmentParams(brightness=(1.2, 0.8))
    with pytest.raises(ValidationError, match="intensity"):
        AugmentParams(intensity="extreme")
    with pytest.raises(ValidationError, match="extra"):
        AugmentParams(multiplier=3)


def test_a_lost_shard_is_redone_alone(tmp_path):
    store = make_run(tmp_path, {"hero": ("human", 5), "blob": ("creature", 6)})
    params = AugmentParams()
    run_plain(store, "augment", after="select", augment=params)
    kept = store.shard_dir("augment", "hero") / "rows.parquet"
    stamp = kept.stat().st_mtime_ns
    before = {r["item_id"]: r["ops"] for r in _rows(store)}
    import shutil

    shutil.rmtree(store.shard_dir("augment", "blob"))  # as if the run died while writing blob
    (store.stage_dir("augment") / "_DONE.json").unlink()
    result = run_plain(store, "augment", after="select", augment=params)
    assert result.recomputed and kept.stat().st_mtime_ns == stamp
    assert {r["item_id"]: r["ops"] for r in _rows(store)} == before


def test_prefect_tasks(prefect_api, tmp_path):
    from prefect import flow

    store = make_run(tmp_path, {"hero": ("human", 5)})
    run = RunRef(runs_dir=str(tmp_path), name=store.name)
    select = on_disk(store, "select")

    @flow
    def augment_flow():  # the spec's plan, shard and merge tasks
        return AUGMENT.submit(run, RunParams(), {"images": select})

    result = augment_flow()
    assert result.summary["kept"] == 35 and store.is_done("augment", result.fingerprint)
    assert augment_flow().recomputed is False
