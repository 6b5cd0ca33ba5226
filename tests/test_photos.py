"""Photo sets as a source: the dataset contract, the FLUX guide's analysis (each warning from a
generated set that has that defect), the ingest stage, the CLI, and the flow to a LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tasks.sources.ingest_photos import IngestPhotosParams, analyze_photos, find_photos, format_analysis
from tasks.run.store import QUARANTINE, RunStore
from tests.source_fixtures import photo, write_photos
from tests.stages import run_plain


def params(**changes) -> IngestPhotosParams:
    return IngestPhotosParams(**{"name": "anna", "trigger": "ohwx", "min_side": 64, **changes})


def ingest(store: RunStore, folder: str, checks: IngestPhotosParams):
    """The photos pipeline's ingest stage on `folder`, as a plain call."""
    return run_plain(store, "ingest", source="photos", sources=[folder], ingest=checks)


def codes(analysis: dict) -> dict[str, list[str]]:
    return {w["code"]: w["files"] for w in analysis["warnings"]}


@pytest.fixture
def defective(tmp_path) -> Path:
    """Too few photos, with a duplicate, a near-duplicate, a caption without the trigger, two
    identical captions, an odd aspect ratio, a missing caption, an unreadable file and an orphan caption."""
    folder = tmp_path / "set"
    write_photos(folder, 8)
    shutil.copy(folder / "photo00.jpg", folder / "copy_of_00.jpg")                       # duplicate
    (folder / "copy_of_00.txt").write_text("ohwx, a person, copied")
    near = cv2.resize(photo(3), (86, 115), interpolation=cv2.INTER_AREA)
    Image.fromarray(np.clip(near.astype(int) + 10, 0, 255).astype(np.uint8)).save(folder / "brighter_03.jpg")  # near-duplicate
    (folder / "brighter_03.txt").write_text("ohwx, a person, brighter")
    (folder / "photo01.txt").write_text("a person standing in a park")                     # trigger missing
    (folder / "photo04.txt").write_text("ohwx, a person smiling")                          # identical captions
    (folder / "photo05.txt").write_text("ohwx,  a person   Smiling")                       # (case and spacing aside)
    Image.fromarray(photo(40, (300, 100))).save(folder / "strip.jpg")                      # odd aspect ratio 3:1
    (folder / "strip.txt").write_text("ohwx, a panorama")
    Image.fromarray(photo(41, (112, 112))).save(folder / "nocaption.png")                  # missing caption
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")            # unreadable
    (folder / "lonely.txt").write_text("ohwx, no image for me")                            # orphan caption
    return folder


def test_each_defect_gives_its_warning(defective):
    analysis = analyze_photos(defective, params())
    found = codes(analysis)
    assert analysis["layout"] == "side-by-side"
    assert analysis["count"] == {"images": 11, "files": 13, "minimum": 15, "recommended": [15, 30], "verdict": "too_few"}
    assert "too_few_images" in found
    assert analysis["duplicates"] == [{"image": "photo00.jpg", "duplicate_of": "copy_of_00.jpg"}]
    assert found["duplicates"] == ["photo00.jpg"]
    assert [(d["image"], d["similar_to"]) for d in analysis["near_duplicates"]] == [("photo03.jpg", "brighter_03.jpg")]
    assert found["trigger_missing"] == ["photo01.jpg"]
    assert analysis["captions"]["identical"] == [["photo04.jpg", "photo05.jpg"]]
    assert found["odd_aspect_ratio"] == ["strip.jpg"] and analysis["aspect_ratios"]["odd"] == [{"image": "strip.jpg", "ratio": 3.0}]
    assert found["missing_captions"] == ["nocaption.png"]
    assert found["unreadable_images"] == ["broken.jpg"]
    assert found["orphan_captions"] == ["lonely.txt"]
    assert "uniform_framing" not in found and analysis["aspect_ratios"]["distinct"] > 1
    assert analysis["resolution"]["min_side"] == 86 and analysis["resolution"]["max_side"] == 112
    text = format_analysis(analysis)
    assert "images: 11 usable of 13 (recommended 15-30): too few" in text
    assert "If identity realism degrades, fix the dataset first" in text
    assert any("Keep the text encoder frozen" in r for r in analysis["recommendations"])
    json.dumps(analysis)  # JSON-ready


def test_a_clean_set_has_no_warnings(tmp_path):
    write_photos(tmp_path / "clean", 16, layout="images+captions")
    analysis = analyze_photos(tmp_path / "clean", params())
    assert analysis["layout"] == "images+captions" and analysis["count"]["verdict"] == "ok"
    assert analysis["warnings"] == []
    assert analysis["aspect_ratios"]["portrait"] and analysis["aspect_ratios"]["landscape"] and analysis["aspect_ratios"]["square"]


def test_more_warnings_from_the_guide(tmp_path):
    folder = tmp_path / "many"
    write_photos(folder, 32)
    for path in sorted(folder.glob("*.jpg"))[:3]:  # one shape only: the angle-diversity warning
        Image.fromarray(photo(int(path.stem[-2:]), (96, 128))).save(path)
    (folder / "photo00.txt").write_text("ohwx, " + " ".join(["word"] * 45))
    found = codes(analyze_photos(folder, params(min_side=512)))
    assert "many_images" in found and found["long_captions"] == ["photo00.jpg"]
    assert len(found["low_resolution"]) == 32
    uniform = tmp_path / "uniform"
    uniform.mkdir()
    for i in range(4):
        Image.fromarray(photo(i, (96, 128))).save(uniform / f"p{i}.jpg")
        (uniform / f"p{i}.txt").write_text(f"ohwx, shot {i}")
    assert "uniform_framing" in codes(analyze_photos(uniform, params()))


def test_the_dataset_contract(tmp_path):
    with pytest.raises(FileNotFoundError, match="photo folder not found"):
        find_photos(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected images/ \+ captions/, or images and .txt captions side by side"):
        find_photos(tmp_path / "empty")
    write_photos(tmp_path / "split", 2, layout="images+captions")
    (tmp_path / "split" / "captions" / "photo01.txt").unlink()
    found = find_photos(tmp_path / "split")
    assert [(Path(i).name, c and Path(c).name) for i, c in found.photos] == [("photo00.jpg", "photo00.txt"), ("photo01.jpg", None)]
    with pytest.raises(ValueError, match="min_images .20. must be <= max_images .10."):
        params(min_images=20, max_images=10)
    with pytest.raises(ValueError, match="trigger must be a non-empty word"):
        params(trigger="oh wx,")
    with pytest.raises(ValueError, match="ingest.trigger must be set"):
        analyze_photos(tmp_path / "split", IngestPhotosParams(name="anna"))


def test_ingest_drops_duplicates_quarantines_broken_files_and_keeps_captions(tmp_path, defective):
    exif = Image.open(defective / "photo02.jpg").getexif()
    exif[0x0112] = 6  # taken rotated: stored landscape, shown portrait
    Image.open(defective / "photo02.jpg").save(defective / "rotated.jpg", exif=exif)
    (defective / "rotated.txt").write_text("ohwx, rotated")
    store = RunStore(tmp_path / "runs", "anna")
    result = ingest(store, str(defective), params())
    rows = {r["source_id"]: r for r in store.read_manifest("ingest").to_pylist()}
    assert rows["photo00.jpg"]["drop_reason"] == "duplicate: same pixels as copy_of_00.jpg"
    assert rows["broken.jpg"]["drop_reason"].startswith(f"{QUARANTINE}broken.jpg: unreadable image")
    assert rows["photo01.jpg"]["caption"] == "ohwx, a person standing in a park"  # trigger put in front
    assert rows["nocaption.png"]["caption"] is None and rows["nocaption.png"]["kept"]  # the caption stage writes one
    assert rows["photo03.jpg"]["kept"] and "near_duplicates" in rows["photo03.jpg"]["issues"]
    upright = Image.open(store.root / rows["rotated.jpg"]["path"])
    assert upright.size == Image.open(defective / "photo02.jpg").size[::-1]
    assert result.summary["kept"] == 12 and result.summary["quarantined"] == 1 and result.summary["duplicates_dropped"] == 1
    assert json.loads((store.stage_dir("ingest") / "analysis.json").read_text())["count"]["verdict"] == "too_few"
    assert not ingest(store, str(defective), params()).recomputed
    (defective / "photo07.txt").write_text("ohwx, a new caption")
    assert ingest(store, str(defective), params()).recomputed  # an edited caption is ingested again


def test_cli_analyze_and_dry_run(tmp_path, defective):
    from typer.testing import CliRunner

    from episode2lora.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["photos", str(defective), "--trigger", "ohwx", "--analyze", "--json", "-"])
    assert out.exit_code == 0, out.output
    assert {"too_few_images", "duplicates", "identical_captions"} <= set(codes(json.loads(out.output)))
    saved = tmp_path / "analysis.json"
    out = runner.invoke(app, ["photos", str(defective), "--trigger", "ohwx", "--analyze", "--json", str(saved)])
    assert "Recommendations:" in out.output and json.loads(saved.read_text())["trigger"] == "ohwx"

    out = runner.invoke(app, ["photos", str(defective), "--name", "anna", "--trigger", "ohwx", "--profile", "final",
                              "--dry-run", "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    trainings = out.output[out.output.index("anna: profile final"):]
    for line in ("resolution: 768", "max_steps: 2500", "rank: 64", "dropout: 0.1", "lr_scheduler: cosine",
                 "warmup_steps: 500", "noise_offset: 0.1", "min_snr_gamma: 5.0", "train_text_encoder: false"):
        assert line in trainings
    assert "package/configs/anna_ai_toolkit.yaml" in out.output and not (tmp_path / "runs").exists()
    fast = runner.invoke(app, ["photos", str(defective), "--name", "anna", "--trigger", "ohwx", "--dry-run"])
    assert "resolution: 512" in fast.output and "max_steps: 1500" in fast.output and "rank: 32" in fast.output

    missing = runner.invoke(app, ["photos", str(defective), "--name", "anna"])
    assert missing.exit_code == 2 and "--trigger is required" in missing.output
    wrong = runner.invoke(app, ["photos", str(defective), "--name", "anna", "--trigger", "ohwx", "--profile", "slow", "--dry-run"])
    assert wrong.exit_code == 2 and "train.profile" in wrong.output and "slow" in wrong.output


def test_flow_from_a_photo_set_to_a_lora(prefect_api, tmp_path):
    """ingest -> augment -> caption -> package -> validate -> train, given captions kept."""
    from flows.source_params import SourceParams
    from flows.source_to_lora import source_to_lora

    folder = tmp_path / "set"
    write_photos(folder, 6, layout="images+captions")
    (folder / "captions" / "photo05.txt").unlink()
    run_params = SourceParams.model_validate({
        "package": {"render": {"resolution": 64}}, "validate": {"min_resolution": 64},
        "train": {"profile": "demo", "base": "tiny", "max_steps": 2, "save_every_steps": 2, "sample_prompts": []},
    })
    runs = tmp_path / "runs"
    results = source_to_lora("photos", str(folder), "anna", trigger="ohwx", runs_dir=str(runs), params=run_params)
    assert list(results) == ["ingest", "augment", "caption", "package", "validate", "train"]
    store = RunStore(runs, "anna")
    assert results["ingest"].summary["verdict"] == "too_few" and results["validate"].summary["passed"]
    captions = {r["group_id"]: r for r in store.read_manifest("caption").to_pylist()}
    given = captions["photo:images/photo00.jpg"]
    assert given["captioner"] == "given" and given["caption"].startswith("ohwx, a person standing")
    written = captions["photo:images/photo05.jpg"]
    assert written["captioner"] == "template" and written["caption"].startswith("ohwx, photo of a person")
    packaged = sorted((store.root / "package").glob("*_anna/*.txt"))
    assert packaged and all(p.read_text().startswith("ohwx") for p in packaged)
    (lora,) = store.read_manifest("train").to_pylist()
    assert lora["steps"] == 2 and (store.root / lora["lora_path"]).is_file()
    again = source_to_lora("photos", str(folder), "anna", trigger="ohwx", runs_dir=str(runs), params=run_params)
    assert not any(r.recomputed for r in again.values())


def test_a_run_recorded_by_the_old_photos_flow_resumes(tmp_path, cli_env):
    """`resume` of a run whose run.json the old `photos-to-lora` flow wrote (with `caption.captions_from`, now
    the pipeline's given_captions input): the run goes on through the one flow, as a new attempt, and its
    finished stages are reused (their fingerprints did not change)."""
    import yaml

    from tests.conftest import run_cli

    folder, runs = tmp_path / "set", tmp_path / "runs"
    write_photos(folder, 6)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"package": {"render": {"resolution": 64}}, "validate": {"min_resolution": 64}}))
    first = run_cli(["photos", str(folder), "--name", "anna", "--trigger", "ohwx", "--config", str(config),
                     "--until", "caption", "--runs-dir", str(runs)], cli_env, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    store = RunStore(runs, "anna")
    record = store.read_run_record()
    assert record["flow"] == "photos-to-lora" and "captions_from" not in record["params"]["caption"]
    old = {**record, "params": {**record["params"], "caption": {**record["params"]["caption"], "captions_from": "ingest"}}}
    store.write_run_record(old)
    caption_marker = (store.stage_dir("caption") / "_DONE.json").stat().st_mtime_ns

    resumed = run_cli(["resume", "anna", "--runs-dir", str(runs)], cli_env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((store.root / "attempts" / "001.json").read_text())["params"]["caption"]["captions_from"] == "ingest"
    assert store.read_run_record() == record  # written again as the one flow writes it
    assert (store.stage_dir("caption") / "_DONE.json").stat().st_mtime_ns == caption_marker
    assert {r["captioner"] for r in store.read_manifest("caption").to_pylist()} == {"given"}
