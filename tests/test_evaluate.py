"""Closed-loop evaluation: scoring, the best checkpoint becomes the final LoRA, the flow's train and
evaluate stages (through Prefect, cached on a second run), the registry gets the choice."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.lora_fixtures import make_character


def _unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_scores_reward_identity_and_punish_same_image_for_every_prompt():
    from tasks.evaluate import identity_scores, pick_best, prompt_variety, score_rows

    reference = _unit([[1, 0, 0], [0.9, 0.1, 0]])
    assert identity_scores(_unit([[1, 0, 0], [0, 1, 0]]), reference)[0] > 0.99
    assert identity_scores(_unit([[1, 0, 0], [0, 1, 0]]), reference)[1] < 0.2
    same = _unit([[1, 0.2, 0]] * 3)
    varied = _unit([[1, 0.3, 0], [1, 0, 0.3], [1, -0.3, 0]])
    assert prompt_variety(same) == pytest.approx(0.0, abs=1e-6) and prompt_variety(varied) > 0.05
    records = score_rows({("early", 1.0): varied, ("late", 1.0): same, ("early", 0.5): varied, ("late", 0.5): same},
                         reference, variety_weight=0.5)
    best, means = pick_best(records)
    assert best == "early" and means["early"] > means["late"]  # the overfit checkpoint loses


def test_image_change_is_the_mean_pixel_difference():
    from PIL import Image

    from tasks.evaluate import image_change

    black, white = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")
    half = Image.new("RGB", (8, 8), "black")
    half.paste(white.crop((0, 0, 4, 8)))
    assert image_change(black, black) == 0.0 and image_change(black, white) == 1.0
    assert image_change(black, half) == 0.5


def test_evaluate_params_are_checked():
    from tasks.evaluate import EvaluateParams

    with pytest.raises(ValueError, match="strengths"):
        EvaluateParams(strengths=[])
    assert EvaluateParams().strengths == [0.5, 0.8, 1.0, 1.2]


def test_train_and_evaluate_stages_through_the_flow(tmp_path, prefect_api):
    from prefect import flow

    from flows.params import RunParams
    from tasks.pipelines import PIPELINES
    from tasks.run.runner import run_pipeline
    from tasks.run.stage import RunRef, StageResult
    from tasks.run.versions import read_versions

    run = RunRef(runs_dir=str(tmp_path), name="lora")
    store = run.store()
    make_character(store.root / "package", "blob", "zqx", n_train=4)
    make_character(store.root / "package", "mint", "mnt", n_train=4, colour=(40, 200, 120), seed=3)
    package = StageResult(stage="package", fingerprint="p", manifest_digest="d")
    params = RunParams.model_validate({
        "train": {"profile": "demo", "base": "tiny", "max_steps": 6, "save_every_steps": 3, "unet_lr": 3e-3},
        "evaluate": {"steps": 2, "prompts": ["{trigger}", "{trigger}, sitting"]},
    })

    @flow(name="lora-stages")
    def lora_stages(until: str):
        results = run_pipeline(run, params, PIPELINES["episode"], until, after="validate", results={"package": package})
        return {name: result for name, result in results.items() if name != "package"}

    first = lora_stages("evaluate")
    assert first["train"].recomputed and first["evaluate"].recomputed
    train_rows = {r["character"]: r for r in store.read_manifest("train").to_pylist()}
    assert set(train_rows) == {"blob", "mint"} and all(r["steps"] == 6 for r in train_rows.values())
    assert all((store.root / r["lora_path"]).is_file() for r in train_rows.values())

    rows = {r["character"]: r for r in store.read_manifest("evaluate").to_pylist()}
    for character, row in rows.items():
        scores = pq.read_table(store.root / row["scores_path"]).to_pylist()
        assert len(scores) == 2 * 4  # checkpoints x strengths
        assert {s["strength"] for s in scores} == {0.5, 0.8, 1.0, 1.2}
        best = max({s["checkpoint"]: s["checkpoint_score"] for s in scores}.items(), key=lambda kv: kv[1])[0]
        assert row["best_step"] == int(best.split("-")[1])
        chosen = dict(json.loads(train_rows[character]["checkpoints"]))[row["best_step"]]
        assert (store.root / row["final_lora"]).read_bytes() == (store.root / chosen).read_bytes()
        from PIL import Image

        sheet = Image.open(store.root / row["contact_sheet"])
        assert sheet.size[1] > 8 * 100 and sheet.size[0] > 2 * 100  # 8 rows, 2 prompt columns
        assert 0.0 <= row["background_bleed"] <= 1.0  # the chosen LoRA's change of a prompt without the trigger
    report = (store.root / "evaluate" / "report.md").read_text()
    assert "## blob (`zqx`)" in report and "✅" in report and "background bleed of step-" in report

    versions = {r["character"]: r for r in read_versions(tmp_path).to_pylist()}
    assert versions["mint"]["status"] == "completed" and versions["mint"]["eval_score"] == pytest.approx(rows["mint"]["score"])
    assert versions["mint"]["final_lora"] == str(store.root / rows["mint"]["final_lora"])

    again = lora_stages("evaluate")  # a second run recomputes nothing
    assert not again["train"].recomputed and not again["evaluate"].recomputed
    assert len(read_versions(tmp_path)) == 2
