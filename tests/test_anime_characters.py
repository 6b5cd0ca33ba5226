"""Characters that stand still are characters: on anime footage (Live2D figures that mostly stand and
talk, tests/anime_footage.py), a layer that holds a face is character material whatever its motion
or its edges, and a figure that never moves in any of its shots is selected."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from benchmarks.dataset_quality import run_to_select
from flows.params import load_params
from models.weights import ensure_u2netp
from tasks.run.store import RunStore
from tests.anime_footage import STILL, default_shots, render_episode
from tests.conftest import ROOT
from tests.segment_scores import box_iou
from tests.truth_layers import identities_of_layers

SIZE = (640, 360)


@pytest.fixture(scope="module")
def anime_run(tmp_path_factory):
    """A 16-shot anime episode (640x360) through select, with the demo's parameters (small clusters)."""
    ensure_u2netp()
    root = tmp_path_factory.mktemp("anime-run")
    video = root / "anime41.mp4"
    truth = render_episode(video, shots=default_shots(31, n_shots=16), size=SIZE, fps=10)
    params = load_params(ROOT / "data" / "demo.yaml", {"select.min_images": 4})
    store = RunStore(root / "runs", "a")
    run_to_select(store, [video], params)
    return store, video, truth


def _truth_instance(truth: dict, row: dict) -> dict | None:
    instances = truth["frames"][row["frame_index"]]["instances"]
    best = max(instances, key=lambda t: box_iou(row["bbox"], t["bbox"]), default=None)
    return best if best and box_iou(row["bbox"], best["bbox"]) >= 0.5 else None


def test_a_character_that_never_moves_is_selected(anime_run):
    store, video, truth = anime_run
    (still,) = STILL
    actions = {inst["action"] for f in truth["frames"] for inst in f["instances"] if inst["identity"] == still}
    assert actions == {"still"}  # the footage is as claimed: only blinks and mouth flaps
    matched = identities_of_layers(store.read_manifest("segment"), [video])
    selected = [r for r in store.read_manifest("select").to_pylist() if r.get("crop", "full") == "full"]
    by_character: dict[str, Counter] = {}
    for row in selected:
        by_character.setdefault(row["character"], Counter())[matched.get(row["item_id"])] += 1
    majorities = {c.most_common(1)[0][0]: c.most_common(1)[0][1] / sum(c.values()) for c in by_character.values()}
    assert still in majorities, by_character
    assert majorities[still] >= 0.9
    # precision on this one episode (the 0.95 goal is measured on two by benchmarks/dataset_quality.py)
    assert sum(matched.get(r["item_id"]) is not None for r in selected) / len(selected) >= 0.9


def test_a_bust_close_up_touching_the_top_edge_is_character_material(anime_run):
    store, video, truth = anime_run
    busts = []
    for row in store.read_manifest("segment").to_pylist():
        inst = _truth_instance(truth, row) if row["path"] else None
        if inst and inst["framing"] == "bust" and row["bbox"][1] <= 1 and inst["face"]:
            busts.append(row)
    assert busts, "the footage has bust close-ups at the top edge"
    material = [r for r in busts if r["character_score"] >= 0.5 and "holds a face" in r["character_reasons"]]
    assert len(material) >= 0.8 * len(busts), [(r["character_score"], r["character_reasons"]) for r in busts]
    assert all("touches the top edge" in r["character_reasons"] for r in material)  # the edge is seen, and outweighed
    colours = json.loads(material[0]["face_colours"])
    assert set(colours) == {"hair", "eyes", "skin"}


def test_clusters_report_faces_and_motion(anime_run):
    store, _, _ = anime_run
    tiers = store.read_manifest("tier").to_pylist()
    characters = [t for t in tiers if t["kind"] == "character"]
    assert characters and all(t["faces"] >= 1 for t in characters)
    assert any(t["faces"] > t["moving"] for t in characters)  # held up by faces, not by motion
    from tasks.report import write_report

    html = write_report(store)[0].read_text(encoding="utf-8")
    first = characters[0]
    assert (f"{first['faces']} of {first['size']} hold a face, {first['moving']} move, "
            f"{first['cut_by_frame']} cut by the frame") in html
