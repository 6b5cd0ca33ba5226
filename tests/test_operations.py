"""Fast checks of the operating pieces: deployments file, webhook, reprocess, review, task runner.

The end-to-end versions against a real Prefect server are in test_deployments.py / test_browser.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from tasks.run.store import RunStore
from tests.live_prefect import CONFIG, WebhookReceiver


# ---- deployments ---------------------------------------------------------------------------

def test_deployments_file_builds_every_deployment_with_typed_form_and_cron():
    from deployments.serve import build_deployments, read_config

    configured = {d["name"]: d for d in read_config(CONFIG)}
    deployments = {d.name: d for d in build_deployments(CONFIG)}
    assert set(deployments) == set(configured) >= {"episode-to-lora", "reprocess", "train"}
    assert deployments["episode-to-lora"].entrypoint == "flows.episode_to_lora.episode_to_lora"

    form = deployments["episode-to-lora"]._parameter_openapi_schema
    assert {"inputs", "name", "params", "until", "webhook_url", "task_runner", "review_clusters"} <= set(form.properties)
    assert "frames" in form.definitions["RunParams"]["properties"]  # the nested per-stage form
    assert form.properties["until"]["enum"][0] == "frames"           # a dropdown of stages
    assert form.properties["task_runner"]["enum"] == ["threads", "dask"]

    for source in ("renders", "photos"):  # one flow for both image sources; each deployment sets its source
        deployment = deployments[f"{source}-to-lora"]
        assert deployment.entrypoint == "flows.source_to_lora.source_to_lora" and deployment.parameters["source"] == source
        source_form = deployment._parameter_openapi_schema
        assert source_form.properties["source"]["enum"] == ["renders", "photos"]
        assert {"renders", "photos", "augment", "train"} <= set(source_form.definitions["SourceParams"]["properties"])

    [schedule] = deployments["reprocess"].schedules
    assert schedule.schedule.cron == configured["reprocess"]["schedules"][0]["cron"]
    assert deployments["episode-to-lora"].schedules == []


def test_deployment_demo_params_are_the_demo_config():
    """prefect.yaml carries the demo parameters inline (`prefect deploy` reads no run config file);
    they must stay what data/demo.yaml says."""
    from deployments.serve import PROJECT, build_deployments
    from flows.params import RunParams, load_params

    [deployment] = [d for d in build_deployments(CONFIG) if d.name == "episode-to-lora"]
    assert RunParams.model_validate(deployment.parameters["params"]) == load_params(PROJECT / "data" / "demo.yaml")
    assert deployment.work_pool_name is None  # served: the pool named in the file is for `prefect deploy`


# ---- the run form --------------------------------------------------------------------------

def _form() -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.episode_to_lora import episode_to_lora

    return parameter_schema(episode_to_lora.fn).model_dump()


def test_run_form_offers_known_models_with_a_custom_escape():
    from flows.form import MODEL_CHOICES
    from flows.params import RunParams

    definitions = _form()["definitions"]
    for (stage, field), known in MODEL_CHOICES.items():
        definition = definitions[type(getattr(RunParams(), stage)).__name__]["properties"][field]
        dropdown, custom = definition["anyOf"]
        assert dropdown["enum"] == known and custom["title"] == "custom" and "enum" not in custom, (stage, field)
    assert RunParams.model_validate({"segment": {"model": "custom:/models/anime.onnx"}}).segment.model.startswith("custom:")


def test_run_form_has_no_none_toggles_and_says_what_empty_means():
    import json

    form = _form()
    shown = {name: d for name, d in form["definitions"].items() if name != "SettingsOverrides"}  # per_character: JSON
    assert '{"type": "null"}' not in json.dumps(shown)
    rank = form["definitions"]["TrainParams"]["properties"]["rank"]
    assert rank["type"] == "integer" and "fast 32, final 64, demo 4" in rank["description"]
    assert "null" not in json.dumps(form["properties"]["params"]["default"])
    assert [i["title"] for i in form["definitions"]["EmbedParams"]["properties"]["mean"]["prefixItems"]] == ["R", "G", "B"]


def form_submission(schema: dict, parameters: dict) -> dict:
    """What Prefect's Custom run form submits when nobody touches it (its schema form, v2): a field's
    value from the deployment's parameters, else the schema's default; an object of fields is filled
    field by field; an on/off field with neither is sent as `false`; any other field is left out."""
    definitions = schema.get("definitions", {})

    def resolve(field: dict) -> dict:
        ref = field.get("$ref") or next((b["$ref"] for b in field.get("allOf", []) if "$ref" in b), None)
        return {**definitions[ref.rsplit("/", 1)[-1]], **{k: v for k, v in field.items() if k != "$ref"}} if ref else field

    def fill(field: dict, given: dict) -> dict:
        values = {}
        for name, child in resolve(field).get("properties", {}).items():
            child = resolve(child)
            value = given.get(name, child.get("default"))
            if "properties" in child:
                values[name] = fill(child, value or {})
            elif value is not None or "default" in child:
                values[name] = value
            elif child.get("type") == "boolean":
                values[name] = False  # Prefect's toggle starts off
        return values

    return fill(schema, parameters)


def test_a_custom_run_from_the_untouched_form_equals_the_cli_run():
    """Submitting a deployment's Custom run form unchanged (episode-to-lora, reprocess) gives the flow the
    parameters of the same run from the CLI (`run --config data/demo.yaml`), whatever profile is picked:
    no on/off training field is sent as `false` when the profile (or the package's TOML) decides it."""
    import importlib

    from deployments.serve import PROJECT, build_deployments
    from flows.params import load_params
    from models.lora_settings import TrainSettings, resolve_settings

    switches = ("zero_terminal_snr", "train_text_encoder", "shuffle_caption", "gradient_checkpointing", "cache_latents")
    package_toml = {"shuffle_caption": True, "keep_tokens": 1}  # what the package stage writes
    deployments = [d for d in build_deployments(CONFIG) if d.name in ("episode-to-lora", "reprocess")]
    for deployment, profile in [(d, p) for d in deployments for p in ("fast", "final", "demo")]:
        schema = deployment._parameter_openapi_schema.model_dump()
        parameters = yaml.safe_load(yaml.safe_dump(deployment.parameters))
        parameters["params"]["train"]["profile"] = profile  # the one field a person changes
        submitted = form_submission(schema, parameters)
        module, _, name = deployment.entrypoint.rpartition(".")  # flows.reprocess.reprocess
        form = getattr(importlib.import_module(module), name).validate_parameters(submitted)["params"]
        cli = load_params(PROJECT / "data" / "demo.yaml", {"train.profile": profile})
        assert form == cli, (deployment.name, profile)
        fields = set(TrainSettings.model_fields)
        settings = [resolve_settings(profile, package_toml, p.train.model_dump(include=fields)) for p in (form, cli)]
        assert settings[0] == settings[1], (deployment.name, profile)
        assert {k: getattr(settings[0], k) for k in switches}["shuffle_caption"] is True
        assert settings[0].gradient_checkpointing is (profile != "demo") and settings[0].cache_latents
        assert not any(k in submitted["params"]["train"] for k in switches), submitted["params"]["train"]


def test_no_on_off_field_of_any_form_is_left_to_prefects_false():
    """Every on/off field of every deployment's form has a default (or is a true/false dropdown
    that starts empty): an untouched form never sends a `false` nobody chose."""
    from deployments.serve import build_deployments

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "boolean" and "default" not in node and ".anyOf[" not in path:
                yield path
            for key, value in node.items():
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}[{i}]")

    for deployment in build_deployments(CONFIG):
        schema = deployment._parameter_openapi_schema.model_dump()
        assert list(walk(schema, deployment.name)) == []


def test_optional_texts_of_the_forms_are_text_boxes_without_a_none_switch():
    """webhook_url and dask_address: an empty text box means not given (null from the API too)."""
    from deployments.serve import build_deployments
    from flows.episode_to_lora import episode_to_lora

    for deployment in build_deployments(CONFIG):
        properties = deployment._parameter_openapi_schema.model_dump()["properties"]
        for name in ("webhook_url", "dask_address"):
            if name in properties:
                assert {k: properties[name].get(k) for k in ("type", "default")} == {"type": "string", "default": ""}
    given = episode_to_lora.validate_parameters({"inputs": ["a.mp4"], "name": "a", "webhook_url": None})
    assert given["webhook_url"] == "" and given["dask_address"] == ""


def test_run_form_descriptions_keep_their_angle_brackets():
    """Prefect renders descriptions as markdown: `<id>` is escaped so that it shows, not vanishes as a tag."""
    import re

    text = json.dumps(_form()["definitions"])
    assert re.findall(r"(?<!\\\\)<", text) == [] and "blip2:\\\\<Hugging Face id or local folder\\\\>" in text


def test_run_params_without_none_round_trip():
    from flows.params import RunParams

    params = RunParams.model_validate({"train": {"rank": 8}, "select": {"tiers": ["A"]}})
    dumped = params.model_dump(mode="json")
    assert "max_steps" not in dumped["train"] and dumped["train"]["rank"] == 8
    assert RunParams.model_validate(dumped) == params


# ---- links on the run page -----------------------------------------------------------------

def test_run_outputs_lists_reports_then_loras(tmp_path):
    from tasks.run.links import artifact_key, run_outputs

    store = RunStore(tmp_path, "links")
    for relative in ("report/cluster_report.html", "evaluate/report.md", "train/shards/Hero/Hero.safetensors",
                     "evaluate/shards/Hero/Hero.safetensors", "train/shards/Hero/checkpoints/x.safetensors"):
        (store.root / relative).parent.mkdir(parents=True, exist_ok=True)
        (store.root / relative).write_bytes(b"x")
    outputs = run_outputs(store)
    assert [(key, path.relative_to(store.root).as_posix()) for key, path, _ in outputs] == [
        ("cluster-report", "report/cluster_report.html"), ("evaluation-report", "evaluate/report.md"),
        ("lora-train-Hero", "train/shards/Hero/Hero.safetensors"),
        ("lora-evaluate-Hero", "evaluate/shards/Hero/Hero.safetensors")]
    assert artifact_key("lora-train-Hero_Boy") == "lora-train-hero-boy"


def test_deployments_file_errors_name_the_entry(tmp_path):
    from deployments.serve import DeploymentConfigError, build_deployments, read_config

    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump({"deployments": [{"name": "x"}]}))
    with pytest.raises(DeploymentConfigError, match=r"deployments\[0\]\.entrypoint is missing"):
        read_config(bad)
    bad.write_text(yaml.safe_dump({"deployments": [{"name": "x", "entrypoint": "flows/reprocess.py:nope"}]}))
    with pytest.raises(DeploymentConfigError, match="has no flow 'nope'"):
        build_deployments(bad)
    with pytest.raises(DeploymentConfigError, match="not found"):
        read_config(tmp_path / "missing.yaml")


def test_ui_refuses_a_busy_port_and_reports_a_server_that_died():
    import socket

    from deployments.serve import start_server, wait_healthy

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match=f"port {busy.getsockname()[1]} .* in use"):
            start_server(busy.getsockname()[1])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        wait_healthy("http://127.0.0.1:9/api", dead, timeout=5)


# ---- webhook -------------------------------------------------------------------------------

def _store_with_frames(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "runs", "hook_run")
    store.begin_stage("frames", {})
    table = pa.table({"item_id": ["a", "b", "c"], "kept": [True, True, False],
                      "drop_reason": [None, None, "quarantine: ep.mp4: unreadable"]})
    store.commit_stage("frames", table, "fp", summary={"kept": 2, "quarantined": 1})
    return store


def test_webhook_payload_reaches_a_receiver(tmp_path):
    from flows.notify import post_json, run_payload

    store = _store_with_frames(tmp_path)
    payload = run_payload(store, "failed", error="segment: boom", flow_run_id="123")
    with WebhookReceiver() as receiver:
        assert post_json(receiver.url, payload) == 204
        [got] = receiver.payloads
    assert got == json.loads(json.dumps(payload))
    assert got["run"] == "hook_run" and got["status"] == "failed" and got["error"] == "segment: boom"
    assert got["stages"] == {"frames": {"state": "done", "rows": 3, "kept": 2, "quarantined": 1}}
    assert got["loras"] == []


def test_webhook_rejects_a_url_that_is_not_http():
    from flows.notify import post_json

    with pytest.raises(ValueError, match="webhook_url must start with http"):
        post_json("ftp://example.org/hook", {})


# ---- reprocess -----------------------------------------------------------------------------

def test_episodes_stay_pending_until_a_run_that_took_them_in_succeeds(tmp_path):
    from flows.reprocess import mark_processed, pending_episodes

    watch = tmp_path / "incoming"
    (watch / "season").mkdir(parents=True)
    done, fresh = watch / "ep01.mp4", watch / "season" / "ep02.mkv"
    for video in (done, fresh, watch / "notes.txt"):
        video.write_bytes(b"x")
    store = RunStore(tmp_path / "runs", "show")
    with store.writing_shard("frames", "ep02", "fp") as shard:  # frames saved, but its run failed later
        (shard / "report.json").write_text(json.dumps({"video": str(fresh)}))
    assert pending_episodes(store, watch) == [done.resolve(), fresh.resolve()]
    store.root.mkdir(parents=True, exist_ok=True)
    mark_processed(store, [done])
    assert pending_episodes(store, watch) == [fresh.resolve()]
    with pytest.raises(NotADirectoryError, match="watch_folder"):
        pending_episodes(store, tmp_path / "nowhere")


def test_a_pending_episode_removed_from_the_watch_folder_leaves_the_run(tmp_path):
    from flows.reprocess import run_inputs

    watch, other = tmp_path / "incoming", tmp_path / "sample"
    watch.mkdir()
    kept, dropped, new = str(watch / "ep01.mp4"), str(watch / "ep02.mp4"), watch / "ep03.mp4"
    previous = [str(other / "ep00.mp4"), kept, dropped]  # ep00 outside the watch folder; ep01 processed, then tidied away
    assert run_inputs(previous, [new], watch, {kept}) == [str(other / "ep00.mp4"), kept, str(new)]


def test_task_runner_option_names_the_bad_value():
    from flows.scale import check_runner

    check_runner("dask")
    with pytest.raises(ValueError, match="task_runner must be one of threads, dask, got 'gpu'"):
        check_runner("gpu")


# ---- review --------------------------------------------------------------------------------

def _tiers() -> pa.Table:
    return pa.table({"cluster_id": pa.array([0, 1, 2], pa.int32()), "size": [40, 25, 3],
                     "tier": ["B", "B", "D"], "recommended": [True, True, False]})


def test_review_form_is_prefilled_with_what_select_would_do(tmp_path):
    from flows.review import review_choices
    from tasks.select import SelectParams, load_overrides

    base = tmp_path / "overrides.yaml"
    base.write_text(yaml.safe_dump({"clusters": {0: {"name": "Hero"}, 1: {"merge_into": 0}, 2: {"include": True}}}))
    choices = review_choices(_tiers(), SelectParams(min_images=20), load_overrides(base))
    assert [(c.cluster_id, c.selected, c.name, c.trigger) for c in choices] == [
        (0, True, "Hero", ""), (2, True, "char_002", "")]  # 1 follows 0; empty trigger: from the name


def test_review_answers_become_select_overrides(tmp_path):
    from flows.review import ClusterChoice, overrides_from, write_overrides
    from tasks.select import Overrides, SelectParams, load_overrides, select_characters

    answers = [ClusterChoice(cluster_id=0, selected=True, name="Hero Boy", trigger="heroboy"),
               ClusterChoice(cluster_id=1, selected=False), ClusterChoice(cluster_id=2, selected=True)]
    path = write_overrides(RunStore(tmp_path, "r"), overrides_from(answers, Overrides()))
    layers = pa.table({"item_id": [f"l{i}" for i in range(6)], "cluster_id": pa.array([0, 0, 1, 1, 2, 2], pa.int32()),
                       "path": [f"p{i}" for i in range(6)]})
    tiers = _tiers().append_column("kind", pa.array(["unknown"] * 3))
    _, characters, _ = select_characters(layers, tiers, SelectParams(min_images=1), load_overrides(path))
    assert [(c["character"], c["trigger"], c["cluster_ids"]) for c in characters.to_pylist()] == [
        ("Hero_Boy", "heroboy", [0]), ("char_002", "char002", [2])]


def test_review_rejects_a_trigger_with_commas():
    from pydantic import ValidationError

    from flows.review import ClusterChoice

    with pytest.raises(ValidationError, match="trigger"):
        ClusterChoice(cluster_id=0, selected=True, trigger="hero, boy")


def test_review_form_lists_least_typical_layers_and_excludes_them_with_one_tick(tmp_path):
    from flows.review import overrides_from, review_choices, write_overrides
    from tasks.select import Overrides, SelectParams, load_overrides

    tiers = _tiers().append_column("kind", pa.array(["character", "scenery", "character"]))
    tiers = tiers.append_column("atypical_ids", pa.array([["l3", "l1"], [], []], pa.list_(pa.string())))
    tiers = tiers.append_column("atypical_paths", pa.array([["p3", "p1"], [], []], pa.list_(pa.string())))
    choices = review_choices(tiers, SelectParams(min_images=20), Overrides())
    assert [(c.cluster_id, c.kind, c.selected) for c in choices] == [(0, "character", True), (1, "scenery", False),
                                                                    (2, "character", False)]
    assert [(l.item_id, l.path, l.exclude) for l in choices[0].least_typical] == [("l3", "p3", False), ("l1", "p1", False)]
    choices[0].least_typical[0].exclude = True  # one tick
    path = write_overrides(RunStore(tmp_path, "r"), overrides_from(choices, Overrides()))
    overrides = load_overrides(path)
    assert overrides.layers["l3"].exclude and "l1" not in overrides.layers


def test_a_failed_reprocess_stays_red_until_its_episode_succeeds_or_is_dropped(prefect_api, tmp_path):
    """The next scheduled run does not hide a failed one: the episode is taken again and the run is red
    again; dropping it (removing it from the watch folder) turns the next run green, and an episode whose
    run succeeds is not taken again."""
    import shutil

    from deployments.serve import PROJECT
    from flows.params import load_params
    from flows.reprocess import reprocess
    from tests.live_prefect import SAMPLE

    watch, runs = tmp_path / "incoming", tmp_path / "runs"
    watch.mkdir()
    shutil.copy(SAMPLE / "episode01.mp4", watch)
    blocker = RunStore(runs, "nightly").stage_dir("frames") / "episodes.parquet"  # frames fails as it merges
    blocker.mkdir(parents=True)
    args = dict(watch_folder=str(watch), name="nightly", runs_dir=str(runs), until="frames",
                params=load_params(PROJECT / "data" / "demo.yaml"))
    for _ in range(2):
        state = reprocess(**args, return_state=True)
        assert state.is_failed() and "episode01.mp4 still pending for run nightly" in state.message, state.message

    (watch / "episode01.mp4").unlink()  # dropped by the user
    assert reprocess(**args) == {"new_episodes": [], "stages": {}}
    shutil.copy(SAMPLE / "episode02.mp4", watch)
    blocker.rmdir()
    assert reprocess(**args)["new_episodes"] == [str((watch / "episode02.mp4").resolve())]
    assert RunStore(runs, "nightly").read_run_record()["inputs"] == [str(watch / "episode02.mp4")]
    assert reprocess(**args)["new_episodes"] == []
