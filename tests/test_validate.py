"""Stage `validate` and `episode2lora validate DIR`: every kind of defect is found and counted,
a clean tree passes, the CLI exits non-zero on errors, and a failing report stops the flow."""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from flows.params import RunParams
from tasks.package import PackageParams
from tasks.run.runner import on_disk
from tasks.run.stage import RunRef
from tasks.validate import DatasetInvalidError, ValidateParams, format_summary, validate_dataset
from tests.conftest import ROOT, run_cli
from tests.dataset_fixtures import make_run
from tests.stages import run_plain


def _image(path, size=(512, 512), seed=0, mode="RGB", fmt=None):
    """A smooth random picture (coarse noise scaled up), different for every seed."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    coarse = rng.integers(0, 255, (max(2, size[1] // 16), max(2, size[0] // 16), channels), dtype=np.uint8)
    Image.fromarray(cv2.resize(coarse, size, interpolation=cv2.INTER_LINEAR), mode).save(path, format=fmt)


def _pair(folder, stem, caption="hero, standing, full body, plain background", **image):
    folder.mkdir(parents=True, exist_ok=True)
    _image(folder / f"{stem}.png", **image)
    (folder / f"{stem}.txt").write_text(caption)


def clean_tree(root):
    """20_hero with 4 pairs and validation/hero with 1."""
    for i in range(4):
        _pair(root / "20_hero", f"img{i}", seed=i)
    _pair(root / "validation" / "hero", "val0", seed=99)
    return root


def defect_tree(root):
    """A clean tree plus one file per kind of defect."""
    clean_tree(root)
    hero = root / "20_hero"
    (hero / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (hero / "broken.txt").write_text("hero, a broken file")
    _image(hero / "bitmap.bmp", seed=11, fmt="BMP")
    (hero / "bitmap.txt").write_text("hero, a bitmap image here")
    _pair(hero, "small", size=(256, 256), seed=12)
    _pair(hero, "wide", size=(1600, 512), seed=13)
    _image(hero / "nocaption.png", seed=14)
    _pair(hero, "emptycaption", caption="  \n", seed=15)
    _pair(hero, "notrigger", caption="a boy standing in a park", seed=16)
    _pair(hero, "triggerlast", caption="a boy standing, hero", seed=17)
    _pair(hero, "short", caption="hero, boy", seed=18)
    shutil.copy(hero / "img0.png", hero / "copy.png")
    (hero / "copy.txt").write_text("hero, standing, upper body, plain background")
    hero.joinpath("black.txt").write_text("hero, standing, full body, dark")
    Image.fromarray(np.zeros((512, 512, 3), np.uint8)).save(hero / "black.png")
    hero.joinpath("grey.txt").write_text("hero, standing, full body, grey")
    Image.fromarray(np.full((512, 512, 3), 128, np.uint8)).save(hero / "grey.png")
    _pair(hero, "alpha", mode="RGBA", seed=19)
    hero.joinpath("wrapped.txt").write_text("hero, standing, full body, white background")
    Image.fromarray(wrapped_image()).save(hero / "wrapped.png")
    (hero / "orphan.txt").write_text("hero, an orphan caption")
    _pair(root / "hero", "x0", seed=20)          # no repeats in the folder name
    _pair(root / "0_nobody", "x1", seed=21)      # zero repeats
    (root / "5_empty").mkdir()
    _image(root / "stray.png", seed=22)
    return root


def wrapped_image():
    """A 512x512 white picture with a red figure whose 40 contour pixels wrapped to cyan (255 + 5 -> 4)."""
    image = np.full((512, 512, 3), 255, np.uint8)
    image[100:400, 150:350] = (230, 20, 30)
    image[100, 150:190] = (4, 255, 255)
    return image


EXPECTED = {
    "unreadable_image": ["20_hero/broken.png"], "bad_format": ["20_hero/bitmap.bmp"],
    "low_resolution": ["20_hero/small.png"], "extreme_aspect_ratio": ["20_hero/wide.png"],
    "caption_missing": ["20_hero/nocaption.png"], "caption_empty": ["20_hero/emptycaption.png"],
    "trigger_missing": ["20_hero/notrigger.png"], "trigger_not_first": ["20_hero/triggerlast.png"],
    "short_caption": ["20_hero/short.png"], "duplicate_image": ["20_hero/img0.png"],
    "black_image": ["20_hero/black.png"], "wrapped_colours": ["20_hero/wrapped.png"], "uniform_image": ["20_hero/grey.png"], "not_rgb": ["20_hero/alpha.png"],
    "orphan_caption": ["20_hero/orphan.txt"], "bad_folder_name": ["0_nobody", "hero"],
    "empty_folder": ["5_empty"], "stray_image": ["stray.png"],
}
"""Where each defect is reported (the second of two identical files, in name order, is the duplicate)."""


def test_every_kind_of_defect_is_found_where_it_is(tmp_path):
    report = validate_dataset(defect_tree(tmp_path / "tree"), ValidateParams())
    found: dict[str, list[str]] = {}
    for f in report["findings"]:
        found.setdefault(f["issue"], []).append(f["path"])
    assert {k: sorted(v) for k, v in found.items()} == EXPECTED
    assert report["passed"] is False
    assert report["errors"] == {"unreadable_image": 1, "bad_format": 1, "low_resolution": 1, "caption_missing": 1,
                                "caption_empty": 1, "trigger_missing": 1, "black_image": 1, "uniform_image": 1,
                                "wrapped_colours": 1, "bad_folder_name": 2, "empty_folder": 1}
    assert set(report["warnings"]) == {"extreme_aspect_ratio", "trigger_not_first", "short_caption", "duplicate_image",
                                       "not_rgb", "orphan_caption", "stray_image"}
    hero = report["characters"]["hero"]
    assert hero["train"] == 18 and hero["validation"] == 1
    assert sum(hero["errors"].values()) == 9 and report["invalid"] == 9
    assert report["characters"]["empty"]["errors"] == {"empty_folder": 1}
    summary = format_summary(report)
    assert "VALIDATION FAILED" in summary and "low_resolution: 1" in summary and "hero: 18 train, 1 validation" in summary


def test_clean_tree_passes(tmp_path):
    report = validate_dataset(clean_tree(tmp_path / "tree"), ValidateParams())
    assert report["passed"] and report["findings"] == [] and report["images"] == report["valid"] == 5
    assert "VALIDATION PASSED" in format_summary(report)


def test_thresholds_are_parameters(tmp_path):
    root = clean_tree(tmp_path / "tree")
    assert validate_dataset(root, ValidateParams(min_resolution=1024))["errors"] == {"low_resolution": 5}
    assert validate_dataset(root, ValidateParams(min_caption_words=10))["warnings"] == {"short_caption": 5}
    strict = validate_dataset(root, ValidateParams(min_caption_words=10, fail_on_warnings=True))
    assert strict["passed"] is False and not strict["errors"]
    with pytest.raises(ValidationError, match="min_resolution"):
        ValidateParams(min_resolution=0)


def test_the_trigger_comes_from_characters_parquet_when_there_is_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = clean_tree(tmp_path / "tree")
    pq.write_table(pa.table({"character": ["hero"], "trigger": ["zx_hero"]}), root / "characters.parquet")
    assert validate_dataset(root, ValidateParams())["errors"] == {"trigger_missing": 5}


def test_cli_exits_non_zero_on_errors_and_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from episode2lora.cli import app

    cli = CliRunner()
    bad = cli.invoke(app, ["validate", str(defect_tree(tmp_path / "bad")), "--report", str(tmp_path / "bad.json")])
    assert bad.exit_code == 1, bad.output
    assert "VALIDATION FAILED" in bad.stdout and "caption_missing: 1" in bad.stdout
    report = json.loads((tmp_path / "bad.json").read_text())
    assert report["errors"]["bad_folder_name"] == 2 and report["characters"]["hero"]["train"] == 18
    good = cli.invoke(app, ["validate", str(clean_tree(tmp_path / "good"))])
    assert good.exit_code == 0 and "VALIDATION PASSED" in good.stdout
    strict = cli.invoke(app, ["validate", str(tmp_path / "good"), "--min-resolution", "1024"])
    assert strict.exit_code == 1 and "low_resolution: 5" in strict.stdout
    missing = cli.invoke(app, ["validate", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such folder" in missing.output


def test_cli_subprocess_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = run_cli(["validate", str(defect_tree(tmp_path / "bad"))], env)
    assert bad.returncode == 1 and "VALIDATION FAILED" in bad.stdout, bad.stderr


# ---- on a run --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packaged_run(tmp_path_factory):
    store = make_run(tmp_path_factory.mktemp("val"), {"hero": ("human", 5), "blob": ("creature", 6)})
    run_plain(store, "package", after="select", package=PackageParams())
    return store


def test_validate_stage_reports_the_run_package(packaged_run):
    store = packaged_run
    result = run_plain(store, "validate", after="package", validate=ValidateParams())
    assert result.summary["passed"] and result.summary["images"] == 35 + 42
    report = json.loads((store.stage_dir("validate") / "report.json").read_text())
    assert report["passed"] and report["characters"]["blob"]["train"] + report["characters"]["blob"]["validation"] == 42
    rows = store.read_manifest("validate").to_pylist()
    package_ids = set(store.read_manifest("package").column("item_id").to_pylist())
    assert len(rows) == 77 and {r["item_id"] for r in rows} == package_ids and all(r["ok"] for r in rows)
    assert run_plain(store, "validate", after="package", validate=ValidateParams()).recomputed is False


def test_a_failing_report_stops_the_flow(prefect_api, packaged_run):
    from prefect import flow

    from tasks.pipelines import PIPELINES
    from tasks.run.runner import run_pipeline

    store = packaged_run
    run = RunRef(runs_dir=str(store.root.parent), name=store.name)
    earlier = {stage: on_disk(store, stage) for stage in ("segment", "select")}  # what the slice reads: handed to it

    @flow
    def dataset_flow(params: RunParams, until: str):
        results = run_pipeline(run, params, PIPELINES["episode"], until, after="select", results=earlier)
        return {name: result for name, result in results.items() if name not in earlier}

    results = dataset_flow(RunParams(), "validate")
    assert list(results) == ["augment", "caption", "package", "validate"]
    assert results["validate"].summary["passed"] and not results["package"].recomputed  # all cache hits
    assert list(dataset_flow(RunParams(), "caption")) == ["augment", "caption"]
    strict = RunParams.model_validate({"validate": {"min_resolution": 1024}})
    with pytest.raises(DatasetInvalidError, match=r"low_resolution: 77.*report\.json"):
        dataset_flow(strict, "validate")
