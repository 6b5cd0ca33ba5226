"""The face detectors (models/faces.py): libnvxs on real anime-style art, scenery, the registry.

The art is Ren'Py's example-game sprites and backgrounds from Debian packages, fetched at test
time (tests/anime_art.py says why that art and how); none of it is committed.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from models import faces as F
from tests import anime_art
from tests.footage import make_background


@pytest.fixture(scope="module")
def detector():
    return F.face_detector("animeface")


@pytest.fixture(scope="module")
def art():
    anime_art.ensure_art()
    return anime_art


def _on_head(box, alpha: np.ndarray) -> bool:
    """The box's centre is in the sprite's upper 40 % and on the drawn character."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    return cy <= 0.4 * alpha.shape[0] and alpha[cy, cx] > 128


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_finds_the_one_face_of_every_anime_sprite_with_the_projects_pillow(detector, art):
    import PIL

    assert int(PIL.__version__.split(".")[0]) >= 11  # the wheel's own binding finds nothing here
    found = {}
    for name in art.SPRITES:
        found[name] = detector.detect([art.load(name)])[0]
    assert {n: len(f) for n, f in found.items()} == {n: 1 for n in art.SPRITES}
    for name, (face,) in found.items():
        assert face.likelihood >= 0.85, (name, face)
        assert _on_head(face.box, art.alpha(name)), (name, face)
        assert 90 <= face.box[2] - face.box[0] <= 190, (name, face)  # heads are 100-180 px in these sprites
        assert min(face.skin) >= 200, (name, face)  # light anime skin


def test_colours_tell_characters_apart_and_repeat(detector, art):
    (lucy,) = detector.detect([art.load("lucy happy")])[0]
    (sylvie,) = detector.detect([art.load("sylvie blue normal")])[0]
    assert max(lucy.hair) < 60  # black hair
    assert sylvie.hair[0] > sylvie.hair[2] + 60  # orange-brown hair
    assert sylvie.eyes[2] > sylvie.eyes[0]  # blue-violet eyes
    again = detector.detect([art.load("sylvie blue normal")])[0][0]
    assert again == sylvie  # the analysis is reseeded: same image, same colours
    row = sylvie.row()
    assert row["box"] == list(sylvie.box) and len(row["hair"]) == 3


def test_a_sprite_in_a_frame_is_found_where_it_stands(detector, art):
    frame = cv2.resize(art.load("bg club"), (960, 540), interpolation=cv2.INTER_AREA)
    sprite, alpha = art.load("eileen happy"), art.alpha("eileen happy")
    small = cv2.resize(sprite, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    a = cv2.resize(alpha, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)[:, :, None] / 255.0
    x, y = 600, 540 - small.shape[0]
    region = frame[y:, x:x + small.shape[1]]
    frame[y:, x:x + small.shape[1]] = (small * a + region * (1 - a)).astype(np.uint8)
    (face,) = detector.detect([frame])[0]
    alone = detector.detect([art.load("eileen happy")])[0][0].box
    expected = [x + 0.6 * alone[0], y + 0.6 * alone[1], x + 0.6 * alone[2], y + 0.6 * alone[3]]
    assert _iou(face.box, expected) >= 0.6, (face.box, expected)  # libnvxs scans in 9.5 % size steps


def test_a_close_up_cut_by_the_top_edge_is_found_with_padding(art):
    plain, padded = F.face_detector("animeface"), F.face_detector("animeface", pad=0.25)
    sprite = art.load("sylvie green normal")
    (face,) = plain.detect([sprite])[0]
    x0, y0, x1, y1 = face.box
    side = x1 - x0
    cut = sprite[y0 + side // 5:]  # the top fifth of the face is off the frame
    close_up = sprite[y0:y0 + side, x0:x1]  # the face fills the image
    assert plain.detect([cut, close_up]) == [[], []]  # libnvxs scans only whole windows <= 3/4 of the image
    found_cut, found_close = padded.detect([cut, close_up])
    assert len(found_cut) == 1 and found_cut[0].box[1] < 0 and found_cut[0].likelihood >= 0.9
    assert len(found_close) == 1 and abs(found_close[0].box[2] - found_close[0].box[0] - side) <= side // 4


def test_small_faces_are_found_with_min_face(art):
    sprite = cv2.resize(art.load("sylvie green normal"), None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    assert F.face_detector("animeface").detect([sprite]) == [[]]  # a 26-px face: below libnvxs's window
    (face,) = F.face_detector("animeface", min_face=20).detect([sprite])[0]
    assert 18 <= face.box[2] - face.box[0] <= 40 and face.likelihood >= 0.9
    full = art.load("sylvie green normal")  # min_face above 42.6 px downscales: faster, big faces only
    (coarse,) = F.face_detector("animeface", min_face=64, colours=False).detect([full])[0]
    assert _iou(coarse.box, F.face_detector("animeface").detect([full])[0][0].box) >= 0.6


def test_no_face_on_scenery_frames_and_crops(detector, art):
    false = []
    for name in art.SCENERY:
        frame = cv2.resize(art.load(name), (960, 540), interpolation=cv2.INTER_AREA)
        crops = [frame[y:y + 240, x:x + 240] for y in (0, 150, 300) for x in (0, 180, 360, 540, 720)]
        for i, found in enumerate(detector.detect([frame, *crops])):
            false += [(name, i, f.box, f.likelihood) for f in found]
    assert false == []


def test_no_face_on_plain_or_generated_backgrounds(detector):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 480, dtype=np.float32)
    images = [
        np.full((270, 480, 3), 200, np.uint8),
        np.zeros((270, 480, 3), np.uint8),
        np.stack([np.tile(ramp, (270, 1))] * 3, axis=2).astype(np.uint8),
        rng.integers(0, 256, (270, 480, 3), dtype=np.uint8),
        *[make_background(seed, (480, 270)) for seed in range(6)],
        np.zeros((30, 30, 3), np.uint8),  # smaller than libnvxs's window
    ]
    assert detector.detect(images) == [[] for _ in images]


def test_rgba_layers_are_composited_and_bad_images_are_refused(detector, art):
    from PIL import Image

    with Image.open(anime_art._file("lucy happy")) as im:
        rgba = np.asarray(im.convert("RGBA"))
    assert detector.detect([rgba]) == detector.detect([art.load("lucy happy")])
    with pytest.raises(ValueError, match="uint8, got float32"):
        detector.detect([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(ValueError, match=r"got shape \(64, 64, 2\)"):
        detector.detect([np.zeros((64, 64, 2), np.uint8)])
    with pytest.raises(ValueError, match="a 2000x2000 image is too large for libnvxs at min_face=8"):
        F.face_detector("animeface", min_face=8).detect([np.zeros((2000, 2000, 3), np.uint8)])


def test_threads_detect_together_with_the_same_results(detector, art):
    images = [art.load(n) for n in ("sylvie blue smile", "eileen vhappy", "lucy mad")]
    serial = detector.detect(images)
    results = [None] * len(images)

    def work(i):
        results[i] = detector.detect([images[i]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_the_none_detector_finds_nothing():
    none = F.face_detector("none")
    assert none.name == "none" and none.identity() == "none"
    assert none.detect([np.zeros((64, 64, 3), np.uint8)] * 2) == [[], []]


def test_unknown_names_list_the_known_detectors():
    with pytest.raises(KeyError, match="unknown face detector 'yolo'; known face detectors: animeface, none, <path"):
        F.face_detector("yolo")
    assert F.check_face_detector("animeface") == "animeface"
    assert F.check_face_detector("/models/head.onnx") == "/models/head.onnx"


def test_invalid_options_name_the_field():
    with pytest.raises(ValueError, match="faces.pad must be in \\[0, 1\\], got 2"):
        F.face_detector("animeface", pad=2)
    with pytest.raises(ValueError, match="faces.min_face must be >= 8 px, got 4"):
        F.face_detector("animeface", min_face=4)


def test_an_onnx_head_detector_gives_faces_without_colours(tmp_path):
    from models.detectors import DetectorFileMissing
    from tests.test_characterness import tiny_yolo

    model = tiny_yolo(tmp_path / "head.onnx", [[12.5, 31, 15, 20, 0.9], [60, 60, 4, 4, 0.1]])
    heads = F.face_detector(str(model))
    assert heads.detect([np.full((64, 128, 3), 120, np.uint8)]) == [[F.Face((10, 10, 40, 50), pytest.approx(0.9))]]
    assert heads.identity().startswith("head.onnx@")
    with pytest.raises(DetectorFileMissing, match="nope.onnx does not exist"):
        F.face_detector(str(tmp_path / "nope.onnx"))


def test_a_missing_library_names_what_to_install(monkeypatch):
    import ctypes.util
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", not_installed)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(F, "_lib", None)
    with pytest.raises(ImportError, match=r"pip install animeface==2\.0\.3"):
        F.face_detector("animeface")
    assert F.face_detector("none").detect([np.zeros((8, 8, 3), np.uint8)]) == [[]]  # `none` needs no library
