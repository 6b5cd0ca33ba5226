"""The anime footage generator (Live2D characters): decoded video agrees with its ground truth.

The first run installs the Live2D packages with npm into .cache/live2d/ and renders the sprite
clips of the four test identities once (headless Chromium, about 45 s of CPU); later runs read
the cache. No test here uses the held-out models (izumi, z16).
"""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

import tests.anime_footage as af
from tests.anime_footage import HELD_OUT, IDENTITIES, ShotSpec, default_shots, main, render_episode

SIZE, FPS = (480, 270), 10
W, H = SIZE

# Explicit shots so that every case below is there whatever default_shots does.
SHOTS = [
    ShotSpec(11, ("shizuku",), 1.5, "static", "bust", ("talk",)),
    ShotSpec(12, ("hibiki", "haru_dress"), 1.5, "static", "knee", ("still", "talk")),
    ShotSpec(13, ("haru_uniform", "hibiki"), 1.5, "pan", "full", ("gesture", "still")),
    ShotSpec(14, ("haru_dress", "haru_uniform"), 1.5, "static", "distant", ("turn", "talk")),
]


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    out = tmp_path_factory.mktemp("anime") / "ep.mp4"
    truth = render_episode(out, shots=SHOTS, size=SIZE, fps=FPS, black_intro_s=0.5, repeat_shot=1)
    with av.open(str(out)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    labels = np.load(out.with_suffix(".masks.npz"))["labels"]
    return out, truth, frames, labels


def _instances(truth):
    for f in truth["frames"]:
        for inst in f["instances"]:
            yield f, inst


def test_files_and_frame_count(episode):
    out, truth, frames, labels = episode
    assert json.loads(out.with_suffix(".truth.json").read_text()) == truth
    n = truth["n_frames"]
    assert len(frames) == n == len(labels) == len(truth["frames"])
    assert frames.shape[1:] == (H, W, 3) and labels.shape[1:] == (H, W) and labels.dtype == np.uint8
    assert [f["frame_index"] for f in truth["frames"]] == list(range(n))
    assert truth["shot_starts"] == [s["start"] for s in truth["shots"]]
    assert [s["kind"] for s in truth["shots"]] == ["intro", "shot", "shot", "shot", "shot", "recap"]
    assert truth["shots"][-1]["repeat_of"] == 2 and truth["shots"][-1]["end"] == n
    for a, b in zip(truth["shots"], truth["shots"][1:]):
        assert a["end"] == b["start"]
    assert frames[: truth["shots"][0]["end"]].max() <= 2  # black intro


def test_bboxes_match_masks(episode):
    _, truth, _, labels = episode
    seen = set()
    for f in truth["frames"]:
        lab = labels[f["frame_index"]]
        assert {i["label"] for i in f["instances"]} == set(np.unique(lab)) - {0}
        shot = truth["shots"][f["shot"]]
        for inst in f["instances"]:
            x0, y0, x1, y1 = inst["bbox"]
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            ys, xs = np.nonzero(lab == inst["label"])
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == inst["bbox"]
            assert inst["identity"] == shot["characters"][inst["label"] - 1]
            assert inst["action"] == shot["actions"][inst["label"] - 1] and inst["framing"] == shot["framing"]
            seen.add(inst["identity"])
    assert seen == set(IDENTITIES) and not seen & set(HELD_OUT)


def test_face_boxes_inside_instance_boxes_and_on_the_character(episode):
    _, truth, _, labels = episode
    n, with_face = 0, 0
    for f, inst in _instances(truth):
        n += 1
        face = inst["face"]
        if face is None:
            continue
        with_face += 1
        x0, y0, x1, y1 = inst["bbox"]
        assert x0 <= face[0] < face[2] <= x1 and y0 <= face[1] < face[3] <= y1
        assert (face[2] - face[0]) * (face[3] - face[1]) < 0.5 * (x1 - x0) * (y1 - y0)
        mask = labels[f["frame_index"]][face[1]:face[3], face[0]:face[2]] == inst["label"]
        assert mask.mean() > 0.7, (inst, mask.mean())  # a face lies on the character (skin, hair; gaps by the neck)
        aspect = (face[2] - face[0]) / (face[3] - face[1])
        assert 0.7 < aspect < 2.0
    assert with_face >= 0.9 * n


def test_a_bust_close_up_touches_the_top_edge_with_its_face_in_frame(episode):
    _, truth, _, _ = episode
    busts = [inst for _, inst in _instances(truth) if inst["framing"] == "bust"]
    assert busts and all(inst["bbox"][1] == 0 and inst["bbox"][3] == H for inst in busts)
    assert all(inst["face"] is not None and inst["face"][1] > 0 for inst in busts)
    assert min(inst["face"][3] - inst["face"][1] for inst in busts) > 0.25 * H
    distant = [inst for _, inst in _instances(truth) if inst["framing"] == "distant"]
    assert distant and max(inst["face"][3] - inst["face"][1] for inst in distant if inst["face"]) < 0.12 * H


def _track(truth, shot_index: int, label: int):
    shot = truth["shots"][shot_index]
    return [next((i for i in truth["frames"][t]["instances"] if i["label"] == label), None)
            for t in range(shot["start"], shot["end"])]


def test_a_still_character_never_moves_but_blinks_and_talks(episode):
    _, truth, frames, labels = episode
    shot = truth["shots"][2]  # static knee shot: hibiki still (label 1), haru_dress talking (label 2)
    still = _track(truth, 2, 1)
    assert all(inst is not None for inst in still)
    assert len({tuple(inst["bbox"]) for inst in still}) == 1  # never moves
    masks = labels[shot["start"]:shot["end"]] == 1
    assert (masks == masks[0]).all()  # not one pixel of its silhouette changes
    x0, y0, x1, y1 = still[0]["face"]
    faces = frames[shot["start"]:shot["end"], y0:y1, x0:x1].astype(np.int16)
    assert np.abs(faces - faces[0]).max(axis=(1, 2, 3)).max() > 60  # mouth flaps or blinks
    talking = _track(truth, 2, 2)
    assert len({tuple(inst["bbox"]) for inst in talking}) > 1  # the other one sways as she talks


def test_pan_slides_characters_with_the_background(episode):
    _, truth, _, _ = episode
    track = [inst for inst in _track(truth, 3, 2) if inst is not None]  # hibiki, still, in a pan
    xs = [(inst["bbox"][0] + inst["bbox"][2]) / 2 for inst in track if 0 < inst["bbox"][0] and inst["bbox"][2] < W]
    assert len(xs) >= 2 and abs(xs[-1] - xs[0]) > 0.1 * W


def test_recap_repeats_its_shot_pixel_for_pixel(episode):
    _, truth, _, labels = episode
    a, b = truth["shots"][2], truth["shots"][-1]
    assert (labels[a["start"]:a["end"]] == labels[b["start"]:b["end"]]).all()
    assert truth["frames"][a["start"]]["instances"] == truth["frames"][b["start"]]["instances"]


def test_truth_layers_cut_from_anime_footage(episode, tmp_path):
    from tasks.run.store import RunStore
    from tests.truth_layers import cut_episode_layers

    out, truth, _, _ = episode
    rows, identities = cut_episode_layers(out, RunStore(tmp_path / "runs", "anime"), stride=3)
    assert rows and set(identities.values()) == set(IDENTITIES)


def test_default_shots_cover_framings_identities_and_cameras():
    for seed in range(6):
        shots = default_shots(seed, 5)
        assert {s.framing for s in shots} == {"bust", "knee", "full", "distant"}
        assert {c for s in shots for c in s.characters} == set(IDENTITIES)
        assert {s.camera for s in shots} == {"static", "pan"}
        assert any(a == "gesture" for s in shots for a in s.actions)
        for s in shots:
            assert len(s.actions) == len(s.characters) and len(set(s.characters)) == len(s.characters)
            assert s.framing != "bust" or len(s.characters) == 1
            assert all(a == "still" for c, a in zip(s.characters, s.actions) if c in af.STILL)
    assert default_shots(3) == default_shots(3)


def test_composite_is_deterministic(tmp_path):
    shots = [ShotSpec(21, ("haru_dress", "shizuku"), 0.6, "pan", "knee", ("talk", "turn"))]
    a = render_episode(tmp_path / "a.mp4", shots=shots, size=(320, 180), fps=5, black_intro_s=0, repeat_shot=None)
    b = render_episode(tmp_path / "b.mp4", shots=shots, size=(320, 180), fps=5, black_intro_s=0, repeat_shot=None)
    assert a == b
    assert (np.load(tmp_path / "a.masks.npz")["labels"] == np.load(tmp_path / "b.masks.npz")["labels"]).all()


def test_cli(tmp_path, capsys):
    main([str(tmp_path / "cli.mp4"), "--seed", "2", "--shots", "4", "--width", "320", "--height", "180", "--fps", "4"])
    assert "frames" in capsys.readouterr().out
    truth = json.loads((tmp_path / "cli.truth.json").read_text())
    assert truth["size"] == [320, 180] and truth["fps"] == 4
    assert (tmp_path / "cli.mp4").is_file() and (tmp_path / "cli.masks.npz").is_file()


def test_ensure_live2d_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(af, "LIVE2D_HOME", tmp_path / "live2d")
    monkeypatch.setattr(af.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm is missing"):
        af.ensure_live2d()
    monkeypatch.setattr(af, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(RuntimeError, match="chromium"):
        af.ensure_live2d()
    with pytest.raises(ValueError, match="unknown"):
        af.ensure_live2d(("nobody",))


def test_an_anime_face_detector_finds_the_true_faces(episode):
    """The faces are real anime faces: libnvxs (models/faces.py) finds them inside the truth face boxes."""
    faces_module = pytest.importorskip("models.faces")
    from tests.segment_scores import box_iou

    _, truth, frames, _ = episode
    detector = faces_module.face_detector("animeface", min_face=32, colours=False)
    found: dict[str, list[bool]] = {}
    for f in truth["frames"][::3]:
        big = [i for i in f["instances"] if i["face"] and i["face"][3] - i["face"][1] >= 28]
        if not big:
            continue
        detected = detector.detect([frames[f["frame_index"]]])[0]
        for inst in big:
            found.setdefault(inst["identity"], []).append(
                any(box_iou(list(face.box), inst["face"]) >= 0.3 for face in detected))
    hits = [ok for oks in found.values() for ok in oks]
    assert len(found) >= 3 and all(any(oks) for oks in found.values()), found
    assert sum(hits) >= 0.8 * len(hits), found
