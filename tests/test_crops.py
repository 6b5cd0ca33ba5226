"""Head and upper-body crops (issue 21): a selected layer with a face also trains as its face-centred
head crop ("portrait") and its upper-body crop ("upper body"), down to the kohya package."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from tasks.augment import AugmentParams
from tasks.caption import frame_caption
from tasks.package import PackageParams
from tasks.run.store import RunStore, fingerprint
from tasks.run.runner import on_disk
from tasks.run.spec import run_stage
from tasks.run.stage import StageResult
from tasks.select import HEAD_SCALE, SELECT, SelectParams, crop_boxes
from tests.stages import run_params, run_plain

MARGIN = 8  # the segment stage's default
FACE = (255, 0, 0)


def _figure(size: tuple[int, int], face: tuple[int, int, int, int]) -> np.ndarray:
    """An RGBA layer (w, h) with a grey figure from its margin to its margin and a red face square."""
    w, h = size
    layer = np.zeros((h, w, 4), np.uint8)
    layer[MARGIN:h - MARGIN, MARGIN:w - MARGIN] = (90, 120, 200, 255)
    x0, y0, x1, y1 = face
    layer[y0:y1, x0:x1] = (*FACE, 255)
    return layer


# layer id -> (layer (w, h), its top-left corner in the frame, face in layer pixels or None)
LAYERS = {
    "ep01:0000010:01": ((200, 400), (92, 42), (70, 40, 130, 100)),   # tall figure, 60-px face: both crops
    "ep01:0000020:01": ((90, 180), (300, 100), (35, 20, 55, 40)),    # small figure: crops under the floor
    "ep01:0000030:01": ((200, 400), (10, 0), None),                  # no face: no crop
}


def make_layers_run(root, layers: dict[str, tuple[np.ndarray, tuple[int, int], list[int] | None]]) -> RunStore:
    """A run whose segment, cluster and tier stages are committed: the layers (item id -> (RGBA layer,
    its top-left corner in the frame, face box in frame pixels or None)) are one character's."""
    store = RunStore(root, "crops")
    folder = store.root / "segment" / "character"
    folder.mkdir(parents=True)
    segment, cluster = [], []
    for item, (layer, (ox, oy), face_box) in layers.items():
        path = folder / f"{item.split(':')[1]}.png"
        Image.fromarray(layer, "RGBA").save(path)
        rel = path.relative_to(store.root).as_posix()
        h, w = layer.shape[:2]
        bbox = [ox + MARGIN, oy + MARGIN, ox + w - MARGIN, oy + h - MARGIN]
        segment.append({"item_id": item, "bbox": bbox, "faces": int(face_box is not None), "face_box": face_box,
                        "path": rel, "background_path": None})
        cluster.append({"item_id": item, "source_id": item.rsplit(":", 1)[0], "cluster_id": 0, "path": rel})
    tiers = [{"cluster_id": 0, "tier": "A", "kind": "character", "recommended": True, "size": len(layers), "purity": 1.0}]
    for stage, rows in (("segment", segment), ("cluster", cluster), ("tier", tiers)):
        store.begin_stage(stage, {})
        store.commit_stage(stage, pa.Table.from_pylist(rows), fingerprint(stage, 0, {}, {}))
    return store


@pytest.fixture
def run(tmp_path) -> RunStore:
    """The three LAYERS as one character."""
    return make_layers_run(tmp_path / "runs", {
        item: (_figure(size, face or (0, 0, 0, 0)), (ox, oy),
               [face[0] + ox, face[1] + oy, face[2] + ox, face[3] + oy] if face else None)
        for item, (size, (ox, oy), face) in LAYERS.items()})


def _select(store: RunStore, params: SelectParams) -> StageResult:
    """The select stage alone, on the committed segment, cluster and tier stages (no cluster report:
    the tier rows here are only what select reads)."""
    inputs = {stage: on_disk(store, stage) for stage in ("segment", "cluster", "tier")}
    return run_stage(SELECT, store, run_params(select=params), inputs)


def _selected(store: RunStore) -> dict[str, dict]:
    return {r["item_id"]: r for r in store.read_manifest("select").to_pylist()}


def test_crop_boxes_are_centred_on_the_face_and_clipped_to_the_layer():
    boxes = crop_boxes([162, 82, 222, 142], (92, 42), (200, 400))  # face (70, 40)-(130, 100) in the layer
    side = round(HEAD_SCALE * 60)
    assert boxes["head"] == (100 - side // 2, 70 - side // 2, 100 + side // 2, 70 + side // 2)
    x0, y0, x1, y1 = boxes["upper_body"]
    assert (x0, y0, x1) == (0, 0, 200) and 40 + 3 * 60 <= y1 <= 40 + 4 * 60  # hair to ~3.5 face heights, clipped
    near_edge = crop_boxes([0, 0, 40, 40], (0, 0), (300, 300))["head"]  # a face at the frame corner: clipped
    assert near_edge == (0, 0, 60, 60)  # the 80-px square around it, cut at the corner


def test_select_adds_head_and_upper_body_crops_of_layers_with_a_face(run):
    result = _select(run, SelectParams(min_images=1))
    rows = _selected(run)
    layer = "ep01:0000010:01"
    assert sorted(rows) == sorted([*LAYERS, f"{layer}#head", f"{layer}#upper_body"])
    assert {r["crop"] for i, r in rows.items() if "#" not in i} == {"full"}
    for kind in ("head", "upper_body"):
        row = rows[f"{layer}#{kind}"]
        assert row["crop"] == kind and row["source_id"] == layer and row["character"] == rows[layer]["character"]
        assert row["path"].startswith("select/crops/") and (run.root / row["path"]).is_file()
    head = np.asarray(Image.open(run.root / rows[f"{layer}#head"]["path"]))
    assert head.shape[:2] == (120, 120)  # 2 face sides, at frame resolution
    ys, xs = np.nonzero((head[..., :3] == FACE).all(axis=2))
    assert abs(xs.mean() - 59.5) < 1 and abs(ys.mean() - 59.5) < 1  # the face is in the middle
    upper = np.asarray(Image.open(run.root / rows[f"{layer}#upper_body"]["path"]))
    ys, xs = np.nonzero((upper[..., :3] == FACE).all(axis=2))
    assert upper.shape[1] == 200 and upper.shape[0] < 400 and ys.min() == 40  # whole width, cut below the chest
    assert abs(xs.mean() - upper.shape[1] / 2) < 1
    crops = result.summary["crops"]
    assert crops["head"] == crops["upper_body"] == 1 and crops["too_small"] == 2  # the small figure's two
    characters = pq.read_table(run.root / "select" / "characters.parquet").to_pylist()
    assert sum(c["n_images"] for c in characters) == len(rows)  # training images: layers and their crops
    assert sum(c["n_layers"] for c in characters) == len(LAYERS)


def test_the_episode_pipeline_hands_select_the_segment_layers():
    """Crops need the segment rows (face boxes): the pipeline binds select's optional `segment` role."""
    from tasks.pipelines import PIPELINES

    select = next(row for row in PIPELINES["episode"] if getattr(row, "name", "") == "select")
    results = {name: StageResult(stage=name, fingerprint=name) for name in ("segment", "cluster", "tier")}
    assert set(select.inputs(results)) == {"segment", "cluster", "tier"}


def test_the_resolution_floor_and_the_crops_parameter(run):
    _select(run, SelectParams(min_images=1, crop_min_side=16))
    assert {i for i in _selected(run) if "#" in i} == {f"{i}#{k}" for i in ("ep01:0000010:01", "ep01:0000020:01")
                                                       for k in ("head", "upper_body")}
    _select(run, SelectParams(min_images=1, crops=["full"]))
    rows = _selected(run)
    assert sorted(rows) == sorted(LAYERS) and not (run.root / "select" / "crops").exists()
    _select(run, SelectParams(min_images=1, crops=["head"]))
    assert sorted(_selected(run)) == ["ep01:0000010:01#head"]
    (character,) = pq.read_table(run.root / "select" / "characters.parquet").to_pylist()
    assert (character["n_images"], character["n_layers"]) == (1, len(LAYERS))
    with pytest.raises(ValidationError, match="crops"):
        SelectParams(crops=[])
    with pytest.raises(ValidationError, match="crops"):
        SelectParams(crops=["full", "face"])


def test_crop_captions_say_their_framing():
    assert frame_caption("hero, anime character, cropped, plain background", "hero", "head") == \
        "hero, portrait, anime character, plain background"
    assert frame_caption("hero, anime character, portrait, red colours", "hero", "upper_body") == \
        "hero, upper body, anime character, red colours"
    assert frame_caption("hero, anime character, full body", "hero", "full") == "hero, anime character, full body"


def test_crops_reach_the_kohya_package_with_their_captions(run):
    params = run_params(select=SelectParams(min_images=1), package=PackageParams(validation_split=0.0),
                        augment=AugmentParams(min_original=40, max_original=40))  # no new images: originals only
    _select(run, params.select)
    run_plain(run, "augment", after="select", params=params)
    augmented = {r["item_id"]: r for r in run.read_manifest("augment").to_pylist()}
    assert augmented["ep01:0000010:01#head"]["group_id"] == "ep01:0000010:01"  # split with its layer
    run_plain(run, "caption", after="augment", params=params)
    captions = {r["item_id"]: r for r in run.read_manifest("caption").to_pylist()}
    assert captions["ep01:0000010:01#head"]["crop"] == "head"
    run_plain(run, "package", after="caption", params=params)
    package = {r["item_id"]: r for r in run.read_manifest("package").to_pylist()}
    for kind, word in (("head", "portrait"), ("upper_body", "upper body")):
        row = package[f"ep01:0000010:01#{kind}"]
        assert row["kept"] and row["crop"] == kind and row["split"] == "train"
        assert re.fullmatch(r"package/\d+_char_000/ep01_0000010_01_" + kind + r"\.png", row["path"])
        text = (run.root / row["caption_path"]).read_text().strip()
        assert text.startswith(f"char000, {word}, ") and (run.root / row["path"]).is_file()
        assert Image.open(run.root / row["path"]).mode == "RGBA"
    assert package["ep01:0000010:01"]["crop"] == "full"
    assert "portrait" not in package["ep01:0000010:01"]["caption"].split(", ")[1]


def test_an_anime_sprite_gets_crops_centred_on_the_face_the_detector_found(tmp_path):
    """Real anime art (tests/anime_art.py): the face the segment stage's detector finds is the middle
    of the head crop, and the upper-body crop holds it and ends above the sprite's lower edge."""
    from models.faces import face_detector
    from tasks.segment import face_fields
    from tests import anime_art

    rgba = np.asarray(Image.open(anime_art.ensure_art() / "sylvie blue normal.png").convert("RGBA"))
    ys, xs = np.nonzero(rgba[..., 3] > 8)
    layer = np.pad(rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1], ((MARGIN, MARGIN), (MARGIN, MARGIN), (0, 0)))
    origin = (300, 40)
    face = face_fields(face_detector("animeface", pad=0.25), layer, origin, 0.7)
    assert face["faces"] == 1
    store = make_layers_run(tmp_path / "runs", {"ep01:0000001:01": (layer, origin, face["face_box"])})
    _select(store, SelectParams(min_images=1))
    rows = _selected(store)
    fx0, fy0, fx1, fy1 = (v - o for v, o in zip(face["face_box"], origin * 2))
    head = np.asarray(Image.open(store.root / rows["ep01:0000001:01#head"]["path"]))
    x0, y0, x1, y1 = crop_boxes(face["face_box"], origin, layer.shape[1::-1])["head"]
    side = HEAD_SCALE * max(fx1 - fx0, fy1 - fy0)
    assert head.shape[:2] == (y1 - y0, x1 - x0) and min(head.shape[:2]) >= 0.95 * side  # at most cut a little by the layer
    assert x0 < fx0 < fx1 < x1 and y0 < fy0 < fy1 < y1
    assert abs((x0 + x1) / 2 - (fx0 + fx1) / 2) < 0.03 * side and abs((y0 + y1) / 2 - (fy0 + fy1) / 2) < 0.03 * side
    upper = np.asarray(Image.open(store.root / rows["ep01:0000001:01#upper_body"]["path"]))
    assert fy1 < upper.shape[0] < layer.shape[0] * 0.8


def test_the_select_stage_leaves_out_a_layer_cut_from_a_glued_one_while_min_images_allows(run):
    """The stage hands select the segment rows' clean figures (here `split_from`); select.prefer_clean."""
    segment = run.read_manifest("segment")
    cut = [1 if i == "ep01:0000030:01" else None for i in segment.column("item_id").to_pylist()]
    run.begin_stage("segment", {})
    run.commit_stage("segment", segment.append_column("split_from", pa.array(cut, pa.int32())), fingerprint("segment", 1, {}, {}))
    result = _select(run, SelectParams(min_images=2, crops=["full"]))
    assert sorted(_selected(run)) == ["ep01:0000010:01", "ep01:0000020:01"] and result.summary["left_out_unclean"] == 1
    _select(run, SelectParams(min_images=3, crops=["full"]))
    assert sorted(_selected(run)) == sorted(LAYERS)  # never below min_images
