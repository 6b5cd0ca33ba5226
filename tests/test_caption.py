"""Stage `caption` and the captioners: caption rules, the template captioner's facts, a tiny BLIP2
loaded through from_pretrained(local dir), clear errors, and resume after a kill."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from models.captioners import Blip2Captioner, CaptionerMissing, TemplateCaptioner, captioner, colour_name, framing
from tasks.caption import CaptionParams, finish_caption
from tasks.composite import RenderSpec, render
from tests.conftest import ROOT
from tests.dataset_fixtures import make_run
from tests.stages import run_plain


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    from models.tiny import build_tiny_blip2

    return build_tiny_blip2(tmp_path_factory.mktemp("models") / "tiny-blip2")


@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory):
    """hero (human, 5 -> 35 images), blob (creature, 5 -> 35)."""
    store = make_run(tmp_path_factory.mktemp("cap"), {"hero": ("human", 5), "blob": ("creature", 5)})
    run_plain(store, "augment", after="select")
    return store


# ---- caption rules ---------------------------------------------------------------------------------

def test_trigger_first_and_only_once():
    assert finish_caption("a boy standing in a park", "hero_tok") == "hero_tok, a boy standing in a park"
    assert finish_caption("Hero_tok waving, hero_tok smiling", "hero_tok") == "hero_tok, waving, smiling"
    assert finish_caption("", "hero_tok") == "hero_tok"


def test_repeated_words_and_phrases_are_removed():
    assert finish_caption("a cat cat cat with a hat", "t") == "t, a cat with a hat"
    assert finish_caption("standing, standing, red jacket, standing", "t") == "t, standing, red jacket"
    assert finish_caption("a girl in a park, a girl running in the park", "t") == "t, a girl in a park, a running"


def test_configured_words_dropped_prompt_echo_removed_and_trimmed():
    prompt = "Question: Describe the pose of this anime character. Answer:"
    raw = f"{prompt} a girl with green eyes and freckles sitting on a bench"
    out = finish_caption(raw, "sage", prompt=prompt, drop_words=["green eyes", "freckles"])
    assert out == "sage, a girl with and sitting on a bench"
    assert "Question" not in finish_caption("Question: what? Answer: a dog", "t")
    long = " ".join(f"w{i}" for i in range(100))
    assert len(finish_caption(long, "t", max_words=10).split()) == 11


# ---- template captioner -------------------------------------------------------------------------

def _square_layer(colour, height=80, width=40, cut=False):
    layer = np.zeros((height + 8, width + 8, 4), np.uint8)
    layer[4:4 + height, 4:4 + width, :3] = colour
    layer[4:4 + height, 4:4 + width, 3] = 255
    return layer[:4 + height // 2] if cut else layer


def test_colour_names():
    assert [colour_name(c) for c in [(220, 30, 30), (30, 60, 220), (40, 200, 60), (250, 250, 250), (10, 10, 10),
                                     (128, 128, 128), (240, 220, 40), (110, 60, 20)]] == \
        ["red", "blue", "green", "white", "black", "grey", "yellow", "brown"]


def test_template_captioner_measures_colour_framing_and_setting():
    spec = RenderSpec(resolution=128)
    scene = (np.indices((90, 160)).sum(0)[..., None] * np.array([1, 2, 3]) % 255).astype(np.uint8)
    images = [render(_square_layer((220, 30, 30)), None, spec), render(_square_layer((30, 60, 220), cut=True), None, spec),
              render(_square_layer((40, 200, 60)), scene, spec)]
    cap = TemplateCaptioner()
    prompts = [cap.default_prompts["human"], cap.default_prompts["creature"], cap.default_prompts["unknown"]]
    texts = cap.caption([Image.fromarray(i, "RGBA") for i in images], prompts)
    assert texts[0] == "anime character, standing, full body, plain background, bright lighting, red colours"
    assert texts[1].startswith("creature, ") and "upper body" in texts[1] and "blue colours" in texts[1]
    assert texts[2].startswith("character, ") and "scene background" in texts[2] and "green" in texts[2]


def test_framing_follows_where_the_figure_was_cut():
    """A figure cut by its frame keeps that edge on the canvas, and the caption says so: never "full body"."""
    spec = RenderSpec(resolution=128)
    whole = _square_layer((220, 30, 30))
    cases = {"full body": whole, "upper body": whole[:48], "cropped": whole[:, 20:],  # cut on the left side
             "portrait": whole[10:80]}  # cut at the top and the bottom
    cap = TemplateCaptioner()
    for expected, layer in cases.items():
        (text,) = cap.caption([Image.fromarray(render(layer, None, spec), "RGBA")], [cap.default_prompts["human"]])
        assert expected in text.split(", "), (expected, text)
        assert ("full body" in text) == (expected == "full body")
        assert ("standing" in text) == (expected == "full body")  # no pose claimed for a part of a figure
    assert framing(top=True, bottom=False, side=False, height_share=0.5) == "cropped"


def test_caption_stage_with_the_template_captioner(augmented_run):
    store = augmented_run
    result = run_plain(store, "caption", after="augment", caption=CaptionParams(shard_size=16))
    rows = store.read_manifest("caption").to_pylist()
    augment = {r["item_id"]: r for r in store.read_manifest("augment").to_pylist()}
    assert len(rows) == 70 and result.summary["kept"] == 70 and result.summary["shards"] == 6
    for row in rows:
        assert row["caption"].startswith(row["trigger"] + ", ")
        assert row["captioner"] == "template" and row["path"] == augment[row["item_id"]]["path"]
        assert row["source_id"] == row["item_id"]
        subject = "creature" if row["kind"] == "creature" else "anime character"
        assert row["caption"].split(", ")[1] == subject
        assert ("scene background" in row["caption"]) == (row["background_path"] is not None)


# ---- BLIP2 ---------------------------------------------------------------------------------------

def test_tiny_blip2_loads_from_its_folder_and_captions_in_batches(tiny_blip2):
    cap = captioner(f"blip2:{tiny_blip2}", max_new_tokens=8, batch_size=2)
    assert isinstance(cap, Blip2Captioner) and cap.processor.num_query_tokens == cap.model.config.num_query_tokens == 4
    assert cap.name == f"blip2:{tiny_blip2}"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 48, 4), dtype=np.uint8), "RGBA") for _ in range(3)]
    prompt = cap.default_prompts["human"]
    batched = cap.caption(images, [prompt] * 3)
    one_by_one = [cap.caption([im], [prompt])[0] for im in images]
    assert len(batched) == 3 and all(isinstance(t, str) and t for t in batched)
    assert batched == one_by_one
    assert "Question" not in batched[0]  # the prompt is not echoed


def test_caption_stage_with_tiny_blip2(tmp_path, tiny_blip2):
    store = make_run(tmp_path, {"blob": ("creature", 3)}, backgrounds=1)
    run_plain(store, "augment", after="select")
    params = CaptionParams(captioner=f"blip2:{tiny_blip2}", max_new_tokens=6, batch_size=2,
                           prompts={"creature": "Question: what is this creature doing? Answer:"})
    run_plain(store, "caption", after="augment", caption=params)
    rows = store.read_manifest("caption").to_pylist()
    assert len(rows) == 3 and all(r["captioner"] == f"blip2:{tiny_blip2}" for r in rows)
    assert all(r["prompt"] == "Question: what is this creature doing? Answer:" for r in rows)
    assert all(r["caption"].startswith("blob_tok") and r["raw_caption"] for r in rows)


def test_missing_model_gives_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(CaptionerMissing, match="folder .*no-such-model' does not exist"):
        captioner(f"blip2:{tmp_path / 'no-such-model'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptionerMissing, match="offline.*huggingface-cli download nobody/no-such-blip2"):
        captioner("blip2:nobody/no-such-blip2")


def test_unknown_captioner_and_bad_parameters_are_named():
    with pytest.raises(KeyError, match="known captioners: template, blip2"):
        captioner("llava:x")
    with pytest.raises(ValidationError, match="captioner"):
        CaptionParams(captioner="llava:x")
    with pytest.raises(ValidationError, match="prompts"):
        CaptionParams(prompts={"robot": "Question: ?"})
    with pytest.raises(ValidationError, match="batch_size"):
        CaptionParams(batch_size=0)
    # captions_from is the pipeline's given_captions input now: ignored as old configs wrote it, refused otherwise
    assert CaptionParams.model_validate({"captions_from": "ingest"}) == CaptionParams()
    with pytest.raises(ValidationError, match="given_captions input"):
        CaptionParams.model_validate({"captions_from": "frames"})


# ---- resume -------------------------------------------------------------------------------------

def test_killed_run_resumes_without_recaptioning_finished_shards(tmp_path, tiny_blip2):
    store = make_run(tmp_path, {"hero": ("human", 5)})
    run_plain(store, "augment", after="select")
    params = CaptionParams(captioner=f"blip2:{tiny_blip2}", max_new_tokens=12, batch_size=2, shard_size=4)
    script = textwrap.dedent(f"""
        from tasks.run.store import RunStore
        from tasks.caption import CaptionParams
        from tests.stages import run_plain
        run_plain(RunStore({str(store.root.parent)!r}, {store.name!r}), "caption", after="augment",
                  caption=CaptionParams.model_validate_json({params.model_dump_json()!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "EPISODE2LORA_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT)
    shards = store.stage_dir("caption") / "shards"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not any(shards.glob("[!.]*/_DONE.json")) and proc.poll() is None:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    done = {p.parent.name: p.parent.joinpath("rows.parquet").stat().st_mtime_ns for p in shards.glob("[!.]*/_DONE.json")}
    assert 1 <= len(done) < 9, "the kill should land after the first shard and before the last"
    assert not store.is_done("caption")
    result = run_plain(store, "caption", after="augment", caption=params)
    after = {p.parent.name: p.parent.joinpath("rows.parquet").stat().st_mtime_ns for p in shards.glob("[!.]*/_DONE.json")}
    assert len(after) == 9 and result.summary["kept"] == 35
    assert all(after[key] == stamp for key, stamp in done.items())  # finished shards were not captioned again
    assert not list(shards.glob(".*"))  # the killed writer's temporary folder was swept
    rows = store.read_manifest("caption").to_pylist()
    assert len({r["item_id"] for r in rows}) == 35 and all(r["caption"].startswith(r["trigger"]) for r in rows)
