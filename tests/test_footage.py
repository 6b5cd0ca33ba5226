"""The synthetic episode generator: decoded video agrees with its ground truth."""

from __future__ import annotations

import dataclasses
import json

import av
import numpy as np
import pytest

from tests.footage import IDENTITIES, ShotSpec, default_shots, main, render_episode

SIZE, FPS, SEED = (192, 108), 8, 7


def _shots():
    return [dataclasses.replace(s, seconds=1.0) for s in default_shots(SEED, n_shots=4)]


def _render(folder):
    out = folder / "ep.mp4"
    truth = render_episode(out, shots=_shots(), seed=SEED, size=SIZE, fps=FPS, repeat_shot=1)
    return out, truth


@pytest.fixture(scope="module")
def short_episode(tmp_path_factory):
    out, truth = _render(tmp_path_factory.mktemp("episode"))
    with av.open(str(out)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    labels = np.load(out.with_suffix(".masks.npz"))["labels"]
    return out, truth, frames, labels


def test_files_and_frame_count(short_episode):
    out, truth, frames, labels = short_episode
    assert json.loads(out.with_suffix(".truth.json").read_text()) == truth
    n = truth["n_frames"]
    assert len(frames) == n == len(labels) == len(truth["frames"])
    assert frames.shape[1:] == (SIZE[1], SIZE[0], 3) and labels.shape[1:] == (SIZE[1], SIZE[0])
    assert labels.dtype == np.uint8
    assert [f["frame_index"] for f in truth["frames"]] == list(range(n))
    assert truth["shot_starts"] == [s["start"] for s in truth["shots"]]
    assert truth["shots"][-1]["end"] == n
    for a, b in zip(truth["shots"], truth["shots"][1:]):
        assert a["end"] == b["start"]
    # intro + 4 shots + recap
    assert len(truth["shots"]) == 6 and truth["shot_starts"][:2] == [0, FPS]


def test_intro_is_black(short_episode):
    _, truth, frames, labels = short_episode
    intro = truth["shots"][0]
    assert intro["kind"] == "intro" and intro["start"] == 0
    assert frames[: intro["end"]].max() <= 2
    assert not labels[: intro["end"]].any()


def test_bboxes_match_masks(short_episode):
    _, truth, frames, labels = short_episode
    W, H = SIZE
    seen = set()
    for f in truth["frames"]:
        lab = labels[f["frame_index"]]
        assert {i["label"] for i in f["instances"]} == set(np.unique(lab)) - {0}
        chars = truth["shots"][f["shot"]]["characters"]
        for inst in f["instances"]:
            x0, y0, x1, y1 = inst["bbox"]
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            ys, xs = np.nonzero(lab == inst["label"])
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == inst["bbox"]
            assert inst["identity"] == chars[inst["label"] - 1]
            assert 0.35 * H <= y1 - y0 <= 0.7 * H  # ~45-60% of the height, zoom adds up to 15%
            seen.add(inst["identity"])
    assert seen == set(IDENTITIES)


def test_two_character_shot_has_separate_labels(short_episode):
    _, truth, _, labels = short_episode
    shot = next(i for i, s in enumerate(truth["shots"]) if len(s["characters"]) == 2)
    for f in (f for f in truth["frames"] if f["shot"] == shot):
        a, b = sorted((i["bbox"] for i in f["instances"]))
        assert b[0] - a[2] >= 0.08 * SIZE[0]  # horizontal gap between the boxes
        lab = labels[f["frame_index"]]
        one = np.pad(lab == 1, 1)
        grown = one[1:-1, 1:-1] | one[:-2, 1:-1] | one[2:, 1:-1] | one[1:-1, :-2] | one[1:-1, 2:]
        assert not (grown & (lab == 2)).any()


def test_recap_repeats_the_shot(short_episode):
    _, truth, frames, labels = short_episode
    recap = truth["shots"][-1]
    orig = truth["shots"][recap["repeat_of"]]
    assert recap["kind"] == "recap" and orig["kind"] == "shot"
    assert recap["characters"] == orig["characters"] and recap["end"] - recap["start"] == orig["end"] - orig["start"]
    a = frames[orig["start"]:orig["end"]].astype(np.int16)
    b = frames[recap["start"]:recap["end"]].astype(np.int16)
    assert np.abs(a - b).mean() < 3  # only re-encoding noise
    assert np.array_equal(labels[orig["start"]:orig["end"]], labels[recap["start"]:recap["end"]])
    other = truth["shots"][recap["repeat_of"] + 1]
    c = frames[other["start"]:other["start"] + len(a)].astype(np.int16)
    assert np.abs(a[: len(c)] - c).mean() > 20


def test_hard_cuts_stand_out(short_episode):
    _, truth, frames, _ = short_episode
    diff = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    cuts = {s - 1 for s in truth["shot_starts"][1:]}
    within = [d for i, d in enumerate(diff) if i not in cuts]
    assert min(diff[i] for i in cuts) > 1.3 * max(within)


def test_same_seed_same_truth(short_episode, tmp_path):
    out, truth, _, labels = short_episode
    out2, truth2 = _render(tmp_path)
    assert truth2 == truth
    assert np.array_equal(np.load(out2.with_suffix(".masks.npz"))["labels"], labels)


def test_default_shots():
    for seed in range(5):
        shots = default_shots(seed)
        assert shots == default_shots(seed)
        assert {c for s in shots for c in s.characters} == set(IDENTITIES)
        assert {1, 2} <= {len(s.characters) for s in shots}
        assert len({s.background_seed for s in shots}) == len(shots)
    assert default_shots(1) != default_shots(2)


def test_cli(tmp_path):
    main([str(tmp_path / "cli.mp4"), "--seed", "3", "--shots", "2", "--width", "128", "--height", "72", "--fps", "4"])
    truth = json.loads((tmp_path / "cli.truth.json").read_text())
    assert truth["size"] == [128, 72] and truth["fps"] == 4
    assert np.load(tmp_path / "cli.masks.npz")["labels"].shape == (truth["n_frames"], 72, 128)


def test_equal_specs_render_equal_shots(tmp_path):
    opening = ShotSpec(background_seed=77, characters=("robot",), seconds=1.0, camera="pan")
    other = ShotSpec(background_seed=5, characters=("zombie", "male_person"), seconds=0.5)
    kw = dict(size=(128, 72), fps=FPS, black_intro_s=0, repeat_shot=None)
    a = render_episode(tmp_path / "a.mp4", shots=[opening], seed=1, **kw)
    b = render_episode(tmp_path / "b.mp4", shots=[other, opening], seed=2, **kw)
    start = b["shot_starts"][1]
    assert [f["instances"] for f in a["frames"]] == [f["instances"] for f in b["frames"][start:]]
    masks_a, masks_b = (np.load(tmp_path / f"{n}.masks.npz")["labels"] for n in "ab")
    assert np.array_equal(masks_a, masks_b[start:])
