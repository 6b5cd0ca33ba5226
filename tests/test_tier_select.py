"""Tier rules, kind, selection and every operation of the overrides file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from tasks.select import CHARACTER_SCHEMA, SCHEMA, OverridesError, SelectParams, load_overrides, select_characters
from tasks.run.store import RunStore, safe_name
from tasks.tier import (SCHEMA as TIER_SCHEMA, TierParams, assign_tier, classify_kinds, duplicate_ratio,
                        quality_issues, size_tier, tier_clusters)
from tests.stages import run_plain

GOOD = {"mean_sharpness": 500.0, "mean_alpha_coverage": 0.6, "duplicate_ratio": 0.2}


# ---- tiers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, tier", [(500, "S"), (100, "S"), (99, "A"), (50, "A"), (49, "B"), (20, "B"),
                                        (19, "C"), (15, "C"), (14, "D"), (1, "D")])
def test_size_tiers_follow_the_guide(size, tier):
    assert size_tier(size, TierParams()) == tier


def test_tier_thresholds_are_parameters_and_checked():
    params = TierParams(min_size_s=10, min_size_a=8, min_size_b=5, min_size_c=3)
    assert [size_tier(n, params) for n in (10, 9, 5, 3, 2)] == ["S", "A", "B", "C", "D"]
    with pytest.raises(ValidationError, match="tier sizes must not increase from S to C"):
        TierParams(min_size_a=200)
    with pytest.raises(ValidationError, match="kind_prompts"):
        TierParams(kind_prompts={"human": ["a person"]})


def test_poor_quality_moves_a_cluster_down_one_tier():
    params = TierParams()
    assert assign_tier(120, GOOD, params) == "S"
    blurry = {**GOOD, "mean_sharpness": 3.0}
    assert quality_issues(blurry, params) == ["blurry (mean sharpness 3.0 < 15)"]
    assert assign_tier(120, blurry, params) == "A"
    thin_and_repetitive = {**GOOD, "mean_alpha_coverage": 0.05, "duplicate_ratio": 0.95}
    assert len(quality_issues(thin_and_repetitive, params)) == 2
    assert assign_tier(60, thin_and_repetitive, params) == "B"  # one tier, however many issues
    assert assign_tier(5, blurry, params) == "D"  # D stays D
    assert assign_tier(120, blurry, TierParams(min_sharpness=0)) == "S"


def test_duplicate_ratio_counts_near_identical_hashes():
    assert duplicate_ratio(["00000000000000ff", "00000000000000fe", "ffffffff00000000", "00000000000000f0"], 4) == 0.5
    assert duplicate_ratio(["00000000000000ff", "0000000000000000"], 4) == 0.0  # 8 bits apart
    assert duplicate_ratio(["00000000000000ff"], 4) == 0.0
    assert duplicate_ratio(["00000000000000ff", "00000000000000fe"], 0) == 0.0


class _TwoWordText:
    """A text embedder in a 3-D space: 'person' prompts point along x, everything else along y."""

    name = "two-word"

    def embed_text(self, prompts):
        return np.array([[1.0, 0, 0] if "person" in p else [0, 1.0, 0] for p in prompts], np.float32)


def test_kind_comes_from_the_nearest_prompt_set_or_unknown():
    params = TierParams(kind_prompts={"human": ["a person"], "creature": ["a monster"]}, kind_margin=0.1)
    centroids = np.array([[0.9, 0.1, 0.4], [0.1, 0.95, 0.3], [0.5, 0.52, 0.7]], np.float32)
    assert classify_kinds(centroids, _TwoWordText(), params) == ["human", "creature", "unknown"]
    assert classify_kinds(centroids, None, params) == ["unknown"] * 3


def test_kind_with_a_tiny_clip_embedder_end_to_end(tmp_path, episode):
    """Layers embedded by a (tiny, random) CLIP: the tier stage finds its text tower and decides kinds."""
    from models.tiny_embedders import build_tiny_clip
    from tasks.embed import EmbedParams
    from tasks.tier import text_embedder_for
    from tests.truth_layers import commit_truth_segment

    store = RunStore(tmp_path / "runs", "clip")
    segment, identities = commit_truth_segment(store, [episode], stride=8)
    run_plain(store, "embed", after="segment", embed=EmbedParams(embedder=f"clip:{build_tiny_clip(tmp_path / 'clip')}",
                                                                 device="cpu"))
    embeds = store.read_manifest("embed")
    names = sorted(set(identities.values()))
    paths = dict(zip(segment.column("item_id").to_pylist(), segment.column("path").to_pylist()))
    clusters = pa.table({"item_id": list(identities), "cluster_id": [names.index(v) for v in identities.values()],
                         "probability": [1.0] * len(identities), "path": [paths[i] for i in identities]})
    text = text_embedder_for(embeds, None)
    assert text is not None and text.name.startswith("clip:")
    table, summary, _ = tier_clusters(clusters, embeds, segment, TierParams(kind_margin=0.0), text)
    assert set(table.column("sub_kind").to_pylist()) <= {"human", "creature"} and table.num_rows == len(names)
    assert summary["kind_from"] == text.name
    assert text_embedder_for(embeds.set_column(2, "embedder", pa.array(["colour-shape"] * embeds.num_rows)), None) is None


def _cluster_tables(sizes: dict[int, int], noise: int = 3) -> tuple[pa.Table, pa.Table, pa.Table]:
    """cluster, embed and segment manifests for clusters of the given sizes (+ noise layers)."""
    rows, embeds, layers = [], [], []
    rng = np.random.default_rng(0)
    for cid, size in [*sizes.items(), (-1, noise)]:
        centre = rng.normal(size=4)  # a cluster is compact: its members around one centre
        for j in range(size):
            item = f"ep:{cid:+d}:{j:03d}"
            rows.append({"item_id": item, "source_id": "ep:f", "cluster_id": cid, "probability": 1.0 - j / 1000,
                         "umap_x": 0.0, "umap_y": 0.0, "path": f"segment/{item}.png"})
            v = centre / np.linalg.norm(centre) + rng.normal(scale=0.05, size=4)
            embeds.append({"item_id": item, "embedding": (v / np.linalg.norm(v)).tolist(), "sharpness": 100.0,
                           "phash": f"{rng.integers(0, 2**63):016x}", "kept": True})
            layers.append({"item_id": item, "alpha_coverage": 0.5, "area_frac": 0.1})
    embed_schema = pa.schema([("item_id", pa.string()), ("embedding", pa.list_(pa.float32(), 4)),
                              ("sharpness", pa.float32()), ("phash", pa.string()), ("kept", pa.bool_())])
    return pa.Table.from_pylist(rows), pa.Table.from_pylist(embeds, schema=embed_schema), pa.Table.from_pylist(layers)


def test_tier_table_has_one_row_per_cluster_with_samples():
    clusters, embeds, layers = _cluster_tables({0: 120, 1: 60, 2: 25, 3: 16, 4: 4})
    params = TierParams(samples=5, outlier_mads=100, split_silhouette=1.0)  # no trimming here: see the hygiene tests
    table, summary, members = tier_clusters(clusters, embeds, layers, params)
    assert table.schema == TIER_SCHEMA
    rows = table.to_pylist()
    assert [r["cluster_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["tier"] for r in rows] == ["S", "A", "B", "C", "D"]
    assert [r["recommended"] for r in rows] == [True, True, True, False, False]
    assert all(r["kind"] == "character" and r["sub_kind"] == "unknown" for r in rows)  # no scores: characters
    assert all(r["purity"] == 1.0 and r["trimmed"] == 0 for r in rows) and members.num_rows == 225
    assert len(rows[0]["sample_paths"]) == 5 and len(rows[4]["sample_paths"]) == 4
    assert rows[0]["sample_paths"][0] == "segment/ep:+0:000.png"  # most probable member first
    assert summary["by_tier"] == {"S": 1, "A": 1, "B": 1, "C": 1, "D": 1} and summary["recommended"] == 3


# ---- selection and overrides -----------------------------------------------------------------------

@pytest.fixture
def tables():
    clusters, embeds, layers = _cluster_tables({0: 120, 1: 60, 2: 25, 3: 16, 4: 4})
    tiers, _, _ = tier_clusters(clusters, embeds, layers, TierParams())
    return clusters, tiers


def _overrides(tmp_path: Path, text: str):
    path = tmp_path / "overrides.yaml"
    path.write_text(text)
    return load_overrides(path)


def test_batch_selection_by_recommendation_tiers_and_min_images(tables):
    clusters, tiers = tables
    rows, characters, summary = select_characters(clusters, tiers, SelectParams())
    assert rows.schema == SCHEMA and characters.schema == CHARACTER_SCHEMA
    assert characters.column("character").to_pylist() == ["char_000", "char_001", "char_002"]
    assert characters.column("trigger").to_pylist() == ["char000", "char001", "char002"]
    assert rows.num_rows == 120 + 60 + 25 and set(rows.column("source_id").to_pylist()) == set(rows.column("item_id").to_pylist())
    _, characters, _ = select_characters(clusters, tiers, SelectParams(tiers=["S", "A"], min_images=20))
    assert characters.column("character").to_pylist() == ["char_000", "char_001"]
    _, characters, _ = select_characters(clusters, tiers, SelectParams(tiers=["S", "A", "B", "C"], min_images=30))
    assert characters.column("n_images").to_pylist() == [120, 60]


def test_would_select_is_the_rule_select_applies(tables, tmp_path):
    from tasks.select import would_select

    clusters, _ = tables
    _, embeds, layers = _cluster_tables({0: 120, 1: 60, 2: 25, 3: 16, 4: 4})
    tiers, _, members = tier_clusters(clusters, embeds, layers, TierParams())
    overrides = _overrides(tmp_path, "clusters:\n  4: {include: true}\n  0: {exclude: true}\n")
    for params in (SelectParams(), SelectParams(tiers=["S", "A", "B", "C"], min_images=30),
                   SelectParams(tiers=list("SABCD"), min_images=1)):
        for given in (None, overrides):
            _, characters, _ = select_characters(clusters, tiers, params, given, members)
            chosen = {c for ids in characters.column("cluster_ids").to_pylist() for c in ids}
            entries = given.clusters if given else {}
            assert chosen == {r["cluster_id"] for r in tiers.to_pylist()
                              if would_select(r, entries.get(r["cluster_id"]), params)}
    row = tiers.to_pylist()[4]
    assert would_select(row, overrides.clusters[4], SelectParams()) and not would_select(row, None, SelectParams())
    assert not would_select(row, overrides.clusters[4], SelectParams(), usable=0)  # nothing to train


def test_overrides_name_trigger_and_kind(tables, tmp_path):
    clusters, tiers = tables
    overrides = _overrides(tmp_path, "clusters:\n  1: {name: 'Hero Boy', kind: human}\n  0: {trigger: zomb1e}\n")
    rows, characters, _ = select_characters(clusters, tiers, SelectParams(), overrides)
    got = {c["character"]: c for c in characters.to_pylist()}
    assert got["Hero_Boy"]["trigger"] == "heroboy" and got["Hero_Boy"]["kind"] == "human"
    assert got["char_000"]["trigger"] == "zomb1e" and got["char_000"]["kind"] == "unknown"
    assert set(rows.filter(pc.equal(rows.column("character"), "Hero_Boy")).column("cluster_id").to_pylist()) == {1}


def test_overrides_merge_exclude_and_include(tables, tmp_path):
    clusters, tiers = tables
    overrides = _overrides(tmp_path, "clusters:\n  3: {merge_into: 2}\n  4: {include: true, name: Rare}\n"
                                     "  0: {exclude: true}\n  2: {name: Twins}\n")
    rows, characters, summary = select_characters(clusters, tiers, SelectParams(), overrides)
    got = {c["character"]: c for c in characters.to_pylist()}
    assert set(got) == {"char_001", "Twins", "Rare"}
    assert got["Twins"]["cluster_ids"] == [2, 3] and got["Twins"]["n_images"] == 25 + 16
    assert got["Rare"]["n_images"] == 4  # include: true overrides tier and min_images
    assert summary["excluded_clusters"] == 1 and "char_000" not in got


def test_overrides_move_and_exclude_single_layers(tables, tmp_path):
    clusters, tiers = tables
    overrides = _overrides(tmp_path, "layers:\n  'ep:-1:000': {move_to: 1}\n  'ep:+0:005': {move_to: 1}\n"
                                     "  'ep:+0:006': {exclude: true}\n  'ep:+9:000': {exclude: true}\n")
    rows, characters, summary = select_characters(clusters, tiers, SelectParams(), overrides)
    by_item = {r["item_id"]: r for r in rows.to_pylist()}
    assert by_item["ep:-1:000"]["character"] == "char_001" and by_item["ep:-1:000"]["cluster_id"] == 1  # noise rescued
    assert by_item["ep:+0:005"]["character"] == "char_001"
    assert "ep:+0:006" not in by_item
    got = {c["character"]: c["n_images"] for c in characters.to_pylist()}
    assert got == {"char_000": 118, "char_001": 62, "char_002": 25}
    assert summary["warnings"] == ["layer ep:+9:000 in the overrides does not exist in this run; ignored"]


def test_overrides_referring_to_missing_clusters_warn(tables, tmp_path):
    clusters, tiers = tables
    overrides = _overrides(tmp_path, "clusters:\n  42: {name: Ghost}\n  1: {merge_into: 77}\n")
    _, characters, summary = select_characters(clusters, tiers, SelectParams(), overrides)
    assert len(characters) == 3
    assert summary["warnings"] == ["cluster 1: merge_into 77 does not exist in this run; not merged",
                                   "cluster 42 in the overrides does not exist in this run; ignored"]


@pytest.mark.parametrize("text, message", [
    ("clusters:\n  1: {merge_into: 2}\n  2: {merge_into: 1}\n", "merge_into forms a cycle: 1 -> 2 -> 1"),
    ("clusters:\n  1: {exclude: true, include: true}\n", "exclude and include cannot both be true"),
    ("clusters:\n  1: {merge_into: 2, name: X}\n", "a merged cluster takes the name"),
    ("clusters:\n  1: {trigger: 'a, b'}\n", "trigger must be a non-empty word without commas"),
    ("clusters:\n  1: {colour: red}\n", "clusters.1.colour: Extra inputs are not permitted"),
    ("layers:\n  x: {move_to: 1, exclude: true}\n", "give exactly one of move_to"),
    ("clusters: [1, 2]\n", "clusters: Input should be a valid dictionary"),
    ("- just a list\n", "must hold a mapping"),
    ("clusters: {1: {name: [unclosed\n", "is not valid YAML"),
])
def test_malformed_overrides_fail_naming_the_entry(tmp_path, text, message):
    with pytest.raises(OverridesError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _overrides(tmp_path, text)


def test_two_characters_with_one_folder_name_are_refused(tables, tmp_path):
    clusters, tiers = tables
    overrides = _overrides(tmp_path, "clusters:\n  0: {name: 'Hero!'}\n  1: {name: 'Hero?'}\n")
    with pytest.raises(OverridesError, match="clusters 0 and 1 would both be the character folder 'Hero'"):
        select_characters(clusters, tiers, SelectParams(), overrides)


@pytest.mark.parametrize("name, folder", [("../x", "x"), ("My Hero", "My_Hero"), ("Jürgen Ölz", "Jurgen_Olz"),
                                          ("/etc/passwd", "etc_passwd"), ("..", None), ("妖怪ウォッチ", None),
                                          ("a/../../b", "a_.._.._b"), ("  ", None), ("con.txt\n", "con.txt")])
def test_hostile_names_become_safe_folder_names(tables, tmp_path, name, folder):
    clusters, tiers = tables
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump({"clusters": {0: {"name": name}}}, allow_unicode=True))
    if not name.strip():
        with pytest.raises(OverridesError, match="name must not be empty"):
            load_overrides(path)
        return
    _, characters, _ = select_characters(clusters, tiers, SelectParams(), load_overrides(path))
    character = characters.column("character").to_pylist()[0]
    assert character == (folder or safe_name(name))
    assert character and "/" not in character and "\\" not in character and character not in (".", "..")
    assert character.isascii() and " " not in character
    root = tmp_path / "package"
    assert (root / character).resolve().parent == root.resolve()
    trigger = characters.column("trigger").to_pylist()[0]
    assert trigger and trigger.isascii() and "," not in trigger and " " not in trigger


def test_select_params_check_the_overrides_file_up_front(tmp_path):
    with pytest.raises(ValidationError, match="overrides file not found"):
        SelectParams(overrides=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters:\n  1: {exclude: yes, include: yes}\n")
    with pytest.raises(ValidationError, match="overrides"):
        SelectParams(overrides=str(bad))
    with pytest.raises(ValidationError, match="tiers"):
        SelectParams(tiers=["S", "E"])


def test_select_stage_rereads_an_edited_overrides_file(tmp_path):
    from tasks.run.store import fingerprint

    store = RunStore(tmp_path / "runs", "sel")
    clusters, embeds, layers = _cluster_tables({0: 30, 1: 25})
    tiers, _, _ = tier_clusters(clusters, embeds, layers, TierParams())
    (store.root / "segment").mkdir(parents=True)
    for rel in clusters.column("path").to_pylist():  # a finished stage's files must exist
        (store.root / rel).touch()
    for stage, table in (("cluster", clusters), ("tier", tiers)):
        store.begin_stage(stage, {})
        store.commit_stage(stage, table, fingerprint(stage, 0, {}, {}))
    overrides = tmp_path / "names.yaml"
    overrides.write_text("clusters:\n  0: {name: Alpha}\n")
    params = SelectParams(overrides=str(overrides))
    first = run_plain(store, "select", after="tier", select=params)
    assert first.summary["names"] == {"Alpha": "alpha", "char_001": "char001"}
    assert not run_plain(store, "select", after="tier", select=params).recomputed
    overrides.write_text("clusters:\n  0: {name: Beta, trigger: b3ta}\n")
    second = run_plain(store, "select", after="tier", select=params)
    assert second.recomputed and second.summary["names"] == {"Beta": "b3ta", "char_001": "char001"}
    characters = pq.read_table(store.stage_dir("select") / "characters.parquet")
    assert characters.column("character").to_pylist() == ["Beta", "char_001"]


# ---- hygiene: outliers, two groups, kinds ------------------------------------------------------------

def test_outliers_and_a_second_group_are_trimmed_and_kind_follows_character_scores():
    from tasks.tier import MEMBER_SCHEMA

    clusters, embeds, layers = _cluster_tables({0: 30, 1: 20, 2: 20})
    vectors = np.array(embeds.column("embedding").to_pylist(), np.float32)
    ids = clusters.column("item_id").to_pylist()
    far = np.array([-1.0, 1.0, -1.0, 1.0]) / 2
    vectors[ids.index("ep:+0:000")] = far  # one stray layer in cluster 0
    for j in range(6):  # a second group of 6 in cluster 1, far from its 14 others
        vectors[ids.index(f"ep:+1:{j:03d}")] = -vectors[ids.index("ep:+1:010")] + np.random.default_rng(j).normal(scale=0.03, size=4)
    embeds = embeds.set_column(1, "embedding", pa.array(vectors.tolist(), embeds.schema.field("embedding").type))
    score = {i: (0.1 if i.startswith("ep:+2:") else 0.9) for i in ids}  # cluster 2 is scenery
    score["ep:+0:001"] = 0.2  # one scenery part inside a character cluster
    layers = layers.append_column("character_score", pa.array([score[i] for i in layers.column("item_id").to_pylist()],
                                                               pa.float32()))
    table, summary, members = tier_clusters(clusters, embeds, layers, TierParams(min_size_b=10, min_size_c=5))
    assert members.schema == MEMBER_SCHEMA
    rows = {r["cluster_id"]: r for r in table.to_pylist()}
    verdict = {r["item_id"]: r for r in members.to_pylist()}
    assert verdict["ep:+0:000"]["outlier"] and not verdict["ep:+0:000"]["used"]
    assert not verdict["ep:+0:001"]["used"]  # not character material
    assert rows[0]["used"] == 30 - rows[0]["trimmed"] - (not verdict["ep:+0:001"]["outlier"])
    assert 1 <= rows[0]["trimmed"] <= 3  # the stray, and at most a couple of the noise's tails
    assert all(verdict[f"ep:+1:{j:03d}"]["outlier"] for j in range(6)) and rows[1]["used"] <= 14
    assert [rows[c]["kind"] for c in (0, 1, 2)] == ["character", "character", "scenery"]
    assert rows[2]["used"] == 0 and not rows[2]["recommended"] and rows[0]["recommended"]
    assert rows[0]["purity"] == 1.0 and rows[0]["evidence"] == pytest.approx(rows[0]["used"] / 30)  # trimmed and not material: 0
    assert rows[0]["atypical_ids"][0] != "ep:+0:000"  # trimmed layers are not offered for review
    assert summary["by_kind"] == {"character": 2, "scenery": 1, "mixed": 0}


def test_purity_falls_with_the_scenery_a_cluster_holds_used_or_not():
    """Issue 22: the used layers of a cluster that is partly scenery score as high as a clean cluster's; the
    estimate follows the cluster's evidence over all members (0 at purity_floor, 1 at character_share)."""
    from tasks.tier import character_evidence, estimate_purity

    clusters, embeds, layers = _cluster_tables({0: 20, 1: 20, 2: 20})
    ids = layers.column("item_id").to_pylist()
    scenery = {0: 0, 1: 7, 2: 12}  # members of each cluster that are not character material
    score = [0.1 if int(i.split(":")[2]) < scenery.get(int(i.split(":")[1]), 0) else 1.0 for i in ids]
    layers = layers.append_column("character_score", pa.array(score, pa.float32()))
    params = TierParams(outlier_mads=100, split_silhouette=1.0)
    rows = {r["cluster_id"]: r for r in tier_clusters(clusters, embeds, layers, params)[0].to_pylist()}
    assert [rows[c]["evidence"] for c in (0, 1, 2)] == pytest.approx([1.0, 0.65, 0.4])
    assert rows[0]["purity"] == 1.0 and rows[1]["purity"] == pytest.approx(0.5) and rows[2]["purity"] == 0.0
    assert rows[1]["kind"] == "mixed" and rows[1]["used"] == 13  # its used layers all score 1.0: the old estimate
    assert character_evidence([1.0, 1.0, 0.9, 0.2], params, [True, False, True, True], [False, False, True, False]) == 0.375
    assert estimate_purity(0.6, params) == 0.0 and estimate_purity(0.7, params) == 1.0
    with pytest.raises(ValueError, match="purity_floor must be < character_share"):
        TierParams(purity_floor=0.8)


def test_an_atypical_layer_that_moves_like_a_character_is_kept_unless_it_is_a_cut():
    """The same character in another pose lies 5-10 robust deviations out in a tight cluster: its
    motion keeps it; a static layer or a cut from a glued one at the same distance is trimmed."""
    clusters, embeds, layers = _cluster_tables({0: 12}, noise=0)
    vectors = np.array(embeds.column("embedding").to_pylist(), np.float32)
    dist = 1.0 - vectors @ vectors.T
    medoid = int(np.argmax((1.0 - dist).sum(1)))
    spread = 1.4826 * float(np.median(np.abs(dist[medoid] - np.median(dist[medoid]))))
    target = float(np.median(dist[medoid])) + 9 * spread  # beyond outlier_mads, within moving_outlier_mads
    ids = clusters.column("item_id").to_pylist()
    away = next(j for j in range(12) if j != medoid)
    base, other = vectors[medoid], np.array([1.0, -1.0, 1.0, -1.0], np.float32)
    other = other - (other @ base) * base
    other /= np.linalg.norm(other)
    angle = np.arccos(1.0 - target)
    vectors[away] = np.cos(angle) * base + np.sin(angle) * other
    embeds = embeds.set_column(1, "embedding", pa.array(vectors.tolist(), embeds.schema.field("embedding").type))

    def verdict(score: float, cut: bool) -> dict:
        scores = [score if i == ids[away] else 0.9 for i in ids]
        split = [1 if (cut and i == ids[away]) else None for i in ids]
        table = layers.append_column("character_score", pa.array(scores, pa.float32()))
        table = table.append_column("split_from", pa.array(split, pa.int32()))
        _, _, members = tier_clusters(clusters, embeds, table, TierParams())
        return {r["item_id"]: r for r in members.to_pylist()}[ids[away]]

    moving = verdict(0.9, cut=False)
    params = TierParams()
    assert params.outlier_mads < moving["typicality"] < params.moving_outlier_mads
    assert not moving["outlier"] and moving["used"]
    assert verdict(0.6, cut=False)["outlier"]   # no strong motion: trimmed as before
    assert verdict(0.9, cut=True)["outlier"]    # a cut that does not look like its cluster: trimmed


def test_scenery_is_never_selected_and_unused_layers_stay_out(tables, tmp_path):
    clusters, _ = tables
    from tasks.select import NothingSelected, nothing_selected_message

    _, embeds, layers = _cluster_tables({0: 120, 1: 60, 2: 25, 3: 16, 4: 4})
    scores = [0.0 if i.startswith("ep:+1:") else 1.0 for i in layers.column("item_id").to_pylist()]
    layers = layers.append_column("character_score", pa.array(scores, pa.float32()))
    tiers, _, members = tier_clusters(clusters, embeds, layers, TierParams())
    kinds = dict(zip(tiers.column("cluster_id").to_pylist(), tiers.column("kind").to_pylist()))
    assert kinds[1] == "scenery"
    rows, characters, _ = select_characters(clusters, tiers, SelectParams(tiers=list("SABCD"), min_images=1),
                                            None, members)
    assert 1 not in characters.column("cluster_ids").combine_chunks().flatten().to_pylist()
    used = {r["item_id"] for r in members.to_pylist() if r["used"]}
    assert set(rows.column("item_id").to_pylist()) <= used
    with pytest.raises(ValidationError, match="scenery is never a character"):
        SelectParams(kinds=["scenery"])
    # nothing selected: the message names the largest clusters and the --set that takes them
    _, none, _ = select_characters(clusters, tiers, SelectParams(min_images=500), None, members)
    assert none.num_rows == 0
    message = nothing_selected_message(tiers, SelectParams(min_images=500))
    assert "cluster 0:" in message and "tier S, kind character" in message
    assert "cluster 1:" in message and "kind scenery" in message
    assert "--set select.tiers=[S,B,C,D] --set select.min_images=" in message
    assert issubclass(NothingSelected, RuntimeError)


def test_select_stage_stops_with_the_largest_clusters_when_nothing_is_selected(tmp_path):
    from tasks.select import NothingSelected
    from tasks.run.store import fingerprint

    store = RunStore(tmp_path / "runs", "none")
    clusters, embeds, layers = _cluster_tables({0: 12, 1: 9})
    tiers, _, _ = tier_clusters(clusters, embeds, layers, TierParams())
    (store.root / "segment").mkdir(parents=True)
    for rel in clusters.column("path").to_pylist():
        (store.root / rel).touch()
    for stage, table in (("cluster", clusters), ("tier", tiers)):
        store.begin_stage(stage, {})
        store.commit_stage(stage, table, fingerprint(stage, 0, {}, {}))
    with pytest.raises(NothingSelected) as caught:
        run_plain(store, "select", after="tier")  # default: recommended tiers (S, A, B), 20 images: none qualifies
    message = str(caught.value)
    assert message.startswith("select: no character selected")
    used = dict(zip(tiers.column("cluster_id").to_pylist(), tiers.column("used").to_pylist()))
    assert f"cluster 0: {used[0]} usable layers of 12, tier D, kind character" in message
    assert f"cluster 1: {used[1]} usable layers of 9, tier D, kind character" in message
    assert message.endswith(f"--set select.tiers=[D] --set select.min_images={min(used.values())}")
    assert not store.is_done("select")
    taken = run_plain(store, "select", after="tier",  # what the message says
                      select=SelectParams(tiers=["D"], min_images=min(used.values())))
    assert taken.summary["characters"] == 2


# ---- clean layers preferred --------------------------------------------------------------------------

def test_prefer_clean_leaves_out_the_likely_unclean_layers_but_never_below_min_images():
    from tasks.select import prefer_clean, unclean_signs

    layers = [{"item_id": f"l{j}"} for j in range(10)]
    segment = {f"l{j}": {"split_from": None, "cut_edges": "", "area_frac": 0.05} for j in range(10)}
    segment["l1"]["split_from"] = 1                                  # cut from a glued layer
    segment["l2"].update(split_from=2, area_frac=0.03)               # cut, and it lost part of the figure: two signs
    segment["l4"].update(cut_edges="bottom", area_frac=0.03)         # framed at the waist: no sign
    segment["l5"]["area_frac"] = 0.09                                # much larger: scenery glued on
    typicality = {f"l{j}": 0.0 for j in range(10)} | {"l3": 3.0}     # unlike its cluster
    assert unclean_signs(segment["l2"], 0.0, 0.05) == ["cut from a glued layer", "only 0.60 of the character's median size"]
    assert unclean_signs(segment["l4"], 0.0, 0.05) == [] and unclean_signs(segment["l5"], 0.0, 0.05) == \
        ["1.80 times the character's median size"]
    kept, dropped = prefer_clean(layers, segment, typicality, keep=8)
    assert dropped == ["l2", "l3"] and [r["item_id"] for r in kept] == ["l0", "l1", *(f"l{j}" for j in range(4, 10))]
    assert prefer_clean(layers, segment, typicality, keep=9)[1] == ["l2"]      # most signs first, then the least typical
    assert prefer_clean(layers, segment, typicality, keep=5)[1] == ["l1", "l2", "l3", "l5"]  # only layers with a sign
    assert prefer_clean(layers, segment, typicality, keep=10)[1] == []         # never below min_images
    assert prefer_clean(layers, segment, typicality, keep=5, pinned={"l2"})[1] == ["l1", "l3", "l5"]  # an override's move stays


def test_select_prefers_clean_layers_down_to_min_images(tables):
    clusters, tiers = tables
    segment = {r["item_id"]: {"split_from": 1 if r["item_id"].endswith(("1", "3")) else None, "cut_edges": "",
                              "area_frac": 0.1} for r in clusters.to_pylist()}
    params = SelectParams(tiers=list("SABCD"), min_images=20)
    rows, characters, summary = select_characters(clusters, tiers, params, None, None, segment)
    n = dict(zip(characters.column("character").to_pylist(), characters.column("n_images").to_pylist()))
    assert n == {"char_000": 96, "char_001": 48, "char_002": 20}  # 24, 12 and 5 cut layers left out: 20 kept
    taken = rows.column("item_id").to_pylist()
    assert not any(i.endswith(("1", "3")) for i in taken if i.startswith(("ep:+0:", "ep:+1:")))
    assert summary["left_out_unclean"] == 24 + 12 + 5
    rows, characters, _ = select_characters(clusters, tiers, params.model_copy(update={"prefer_clean": False}),
                                            None, None, segment)
    assert characters.column("n_images").to_pylist() == [120, 60, 25]


def test_a_layer_much_narrower_than_its_character_is_likely_unclean_and_left_out_first():
    """A window or a sign glued above a still figure makes its layer taller than the figure usually is."""
    from tasks.select import prefer_clean, unclean_signs

    layers = [{"item_id": f"l{j}"} for j in range(6)]
    segment = {f"l{j}": {"split_from": None, "area_frac": 0.05, "bbox": [0, 100, 50, 200]} for j in range(6)}
    segment["l2"]["bbox"] = [0, 40, 50, 200]    # 50 x 160: a sign above the head
    segment["l4"]["bbox"] = [0, 130, 50, 200]   # 50 x 70: cut by the frame, or crouching: wider is no sign
    assert unclean_signs(segment["l2"], 0.0, 0.05, 0.5) == ["0.62 of the character's median width / height"]
    assert unclean_signs(segment["l4"], 0.0, 0.05, 0.5) == []
    assert prefer_clean(layers, segment, {}, keep=4)[1] == ["l2"]
    assert prefer_clean(layers, segment, {}, keep=6)[1] == []  # never below min_images


def test_the_select_stage_leaves_out_a_layer_taller_than_its_character_usually_is(tmp_path):
    """The stage hands select the segment rows' boxes: a figure with a window glued above it is left out."""
    from tests.test_crops import _figure, _select, _selected, make_layers_run

    sizes = {"ep01:0000010:01": (200, 300), "ep01:0000020:01": (200, 310), "ep01:0000030:01": (200, 290),
             "ep01:0000040:01": (200, 480)}  # the last: 0.42 wide per height, the character's median 0.69
    store = make_layers_run(tmp_path / "runs", {item: (_figure(size, (0, 0, 0, 0)), (10, 10), None)
                                                for item, size in sizes.items()})
    result = _select(store, SelectParams(min_images=3, crops=["full"]))
    assert sorted(_selected(store)) == sorted(sizes)[:3] and result.summary["left_out_unclean"] == 1


def _figure_layer(extra: tuple[int, int, int] | None = None, share: float = 0.3) -> np.ndarray:
    """A 40x20 RGBA figure (red body, blue hair) on a transparent border; `extra`: a block of that colour
    glued beside it, `share` of the opaque pixels."""
    layer = np.zeros((60, 60, 4), np.uint8)
    layer[10:50, 20:40] = (200, 40, 40, 255)
    layer[10:18, 20:40] = (40, 40, 200, 255)
    if extra is not None:
        width = round(800 * share / (1 - share) / 40)
        layer[10:50, 40:40 + width] = (*extra, 255)
    return layer


def test_a_layer_in_colours_its_character_lacks_in_other_shots_is_foreign():
    from tasks.palette import colour_shares, foreign_shares

    colours = {f"l{j}": colour_shares(_figure_layer()) for j in range(6)}
    colours["l4"] = colour_shares(_figure_layer((40, 160, 40)))   # a tree glued beside the figure
    colours["l5"] = colour_shares(_figure_layer((40, 160, 40)))   # the same shot: the same tree
    shots = {f"l{j}": j for j in range(5)} | {"l5": 4}
    foreign = foreign_shares(colours, shots)
    assert foreign["l4"] == foreign["l5"] == pytest.approx(0.3, abs=0.02)  # its own shot does not vouch for the tree
    assert all(foreign[f"l{j}"] == 0.0 for j in range(4))
    colours["l3"] = colours["l2"] = colour_shares(_figure_layer((40, 160, 40)))  # now in half of the other shots
    assert foreign_shares(colours, shots)["l4"] == 0.0
    assert foreign_shares({"l0": colours["l0"]}, {"l0": 0}) == {}  # nothing to compare with


def test_prefer_clean_leaves_out_the_layers_in_foreign_colours():
    from tasks.palette import colour_shares
    from tasks.select import prefer_clean, unclean_signs

    layers = [{"item_id": f"l{j}"} for j in range(10)]
    segment = {f"l{j}": {"split_from": None, "area_frac": 0.05, "episode": "ep", "shot_id": j} for j in range(10)}
    colours = {f"l{j}": colour_shares(_figure_layer()) for j in range(10)}
    colours["l3"] = colour_shares(_figure_layer((40, 160, 40), 0.3))
    colours["l7"] = colour_shares(_figure_layer((90, 90, 90), 0.15))
    colours["l8"] = colour_shares(_figure_layer((90, 90, 90), 0.03))   # a few pixels: shading, a soft edge
    assert unclean_signs(segment["l3"], 0.0, 0.05, None, 0.3, 0.0) == ["30% of it in colours its character lacks (usually 0%)"]
    assert unclean_signs(segment["l8"], 0.0, 0.05, None, 0.03, 0.0) == []
    assert prefer_clean(layers, segment, {}, keep=9, colours=colours)[1] == ["l3"]
    assert prefer_clean(layers, segment, {}, keep=5, colours=colours)[1] == ["l3", "l7"]  # only the signed ones
    assert prefer_clean(layers, segment, {}, keep=5)[1] == []  # colours not looked at
    same_shot = {k: {**v, "shot_id": 0} for k, v in segment.items()}  # one shot: nothing to compare with
    assert prefer_clean(layers, same_shot, {}, keep=5, colours=colours)[1] == []


def test_the_select_stage_leaves_out_a_layer_with_scenery_colours_its_character_lacks(tmp_path):
    """The stage reads the layers' images: a figure with a green tree glued beside it is left out."""
    from tests.test_crops import _figure, _select, _selected, make_layers_run

    layers = {f"ep01:00000{j}0:01": _figure((200, 300), (0, 0, 0, 0)) for j in range(1, 5)}
    layers["ep01:0000040:01"][20:120, 100:190] = (40, 160, 40, 255)  # a third of it: a tree's crown
    store = make_layers_run(tmp_path / "runs", {item: (layer, (10, 10), None) for item, layer in layers.items()})
    result = _select(store, SelectParams(min_images=3, crops=["full"]))
    assert sorted(_selected(store)) == sorted(layers)[:3] and result.summary["left_out_unclean"] == 1


def test_a_clusters_second_group_is_kept_when_it_shows_the_same_face():
    import json

    from tasks.tier import TierParams, _outliers

    rng = np.random.default_rng(1)
    a, b = np.eye(2, 32, dtype=np.float32)
    x = np.vstack([a + rng.normal(0, 0.05, (8, 32)), a + 0.6 * b + rng.normal(0, 0.05, (5, 32))]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # two groups: 8 members (one shot's frames) and 5 (other framings)
    face = lambda hair: json.dumps({"hair": hair, "eyes": [60, 90, 200], "skin": [250, 230, 220]})  # noqa: E731
    params, scores, cut = TierParams(), [0.9] * 13, np.zeros(13, bool)
    plain = _outliers(x, scores, cut, params)[2]
    assert plain[8:].all() and not plain[:8].any()  # without faces the smaller group is trimmed
    one_face = _outliers(x, scores, cut, params, [face([40, 40, 60])] * 13)[2]
    assert not one_face.any()  # the same hair and eyes in both groups: one character, nothing trimmed
    two_faces = _outliers(x, scores, cut, params, [face([40, 40, 60])] * 8 + [face([230, 200, 90])] * 5)[2]
    assert two_faces[8:].all()  # a blonde second group is another character: trimmed as before
