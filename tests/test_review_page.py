"""The review page (flows/review.py, tasks/templates/review.html.j2): the cluster report made interactive,
served with the run folder's files by the local server, resumes the paused flow run through Prefect's API
with the same answers as the fallback Resume form (which holds only the editable fields)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.run.store import RunStore
from tests.conftest import ARTIFACTS, ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT = ARTIFACTS / "review_page.png"


def _tiers() -> pa.Table:
    return pa.table({"cluster_id": pa.array([0, 1, 2], pa.int32()), "size": [40, 25, 3], "tier": ["B", "B", "D"],
                     "recommended": [True, True, False], "kind": ["character", "character", "scenery"],
                     "atypical_ids": pa.array([["l3", "l1"], ["l7"], []], pa.list_(pa.string())),
                     "atypical_paths": pa.array([["p3", "p1"], ["p7"], []], pa.list_(pa.string()))})


# ---- the form and the answers ------------------------------------------------------------------

def test_the_fallback_form_holds_only_the_editable_fields():
    from flows.review import ClusterReview, answers_of, review_choices
    from tasks.select import Overrides, SelectParams

    schema = ClusterReview.model_json_schema()
    answer = schema["$defs"]["ClusterAnswer"]["properties"]
    assert set(answer) == {"cluster_id", "selected", "name", "trigger", "exclude"}
    assert not any("for information" in json.dumps(p) for p in answer.values())
    answers = answers_of(review_choices(_tiers(), SelectParams(min_images=20), Overrides()))
    assert [(a.cluster_id, a.selected, a.exclude) for a in answers] == [(0, True, []), (1, True, []), (2, False, [])]


def test_answers_rename_and_exclude_layers_like_the_form(tmp_path):
    from flows.review import ClusterAnswer, apply_answers, overrides_from, review_choices, write_overrides
    from tasks.select import LayerOverride, Overrides, SelectParams, load_overrides

    base = Overrides(layers={"l1": LayerOverride(exclude=True)})
    choices = review_choices(_tiers(), SelectParams(min_images=20), base)
    assert [layer.exclude for layer in choices[0].least_typical] == [False, True]  # the base file's exclusion shown
    answers = [ClusterAnswer(cluster_id=0, selected=True, name="Hero Boy", trigger="heroboy", exclude=["l3", "lx"]),
               ClusterAnswer(cluster_id=1, selected=False)]
    path = write_overrides(RunStore(tmp_path, "r"), overrides_from(apply_answers(choices, answers), base))
    overrides = load_overrides(path)
    assert overrides.layers["l3"].exclude and overrides.layers["lx"].exclude and "l1" not in overrides.layers
    assert (overrides.clusters[0].name, overrides.clusters[0].trigger, overrides.clusters[0].include) == (
        "Hero Boy", "heroboy", True)
    assert overrides.clusters[1].exclude and 2 not in overrides.clusters  # unanswered clusters: as select decides
    with pytest.raises(ValueError, match="cluster 9: not a cluster under review"):
        apply_answers(choices, [ClusterAnswer(cluster_id=9, selected=True)])


def test_review_page_markup_escapes_and_carries_the_choices():
    from tasks.report import render_html

    png = b"\x89PNG"
    rows = [dict(cluster_id=i, tier="B", size=10, kind=kind, recommended=True, size_tier="B", quality_issues=[],
                 mean_sharpness=1.0, mean_alpha_coverage=0.5, duplicate_ratio=0.1, mean_layer_area=0.2, selected=False,
                 character=None, trigger=None, atypical_ids=[f"l{i}a", f"l{i}b"]) for i, kind in enumerate(["character", "scenery"])]
    summary = {"layers": 20, "clusters": 2, "noise_layers": 0, "noise_fraction": 0.0, "by_tier": dict.fromkeys("SABCD", 0),
               "by_tier_kind": {t: {"character": 0} for t in "SABCD"}, "layers_by_tier": dict.fromkeys("SABCD", 0),
               "recommended": 2, "recommended_tiers": ["B"], "selected_characters": 0}
    report = {"run": "r<1>", "generated_at": "now", "embedder": None, "summary": summary, "clusters": rows,
              "characters": [], "warnings": []}
    choice = {"selected": True, "name": "<b>Hero</b>", "trigger": "", "exclude": ["l0b"]}
    page = render_html(report, png, {0: png, 1: png}, {"l0a": png, "l0b": png}, {"flow_run_id": "f1", "choices": {0: choice}})
    assert page.count("class='include'") == 1 and page.count("<button type='button' class='layer") == 2
    assert "class='layer excluded' data-layer='l0b'" in page and "<b>Hero</b>" not in page
    data = json.loads(re.search(r"id='review-data'>(.*?)</script>", page).group(1))
    assert data == {"api": "/api", "clusters": [0], "flow_run_id": "f1"}
    assert not re.search(r"(src|href)=['\"](?!data:)", page)


# ---- a real server, a real paused run, Chromium ------------------------------------------------

@pytest.fixture
def review_api(tmp_path):
    """The server `episode2lora ui` starts (deployments/serve.py: Prefect's API and UI, the run folders'
    files, CSRF on); yields its URL."""
    from deployments.api_server import free_port, stop, wait_healthy
    from deployments.serve import start_server

    port, log = free_port(), tmp_path / "server.log"
    process = start_server(port, tmp_path / "prefect-home", log)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/api", process, timeout=180)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{log.read_text(errors='replace')[-3000:]}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        _drain_prefect_workers()
        stop(process)


def _drain_prefect_workers() -> None:
    """Send the in-process flow's last logs and events while the server still runs (else Prefect retries
    against a stopped server at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30, at_exit=False)


def _paused_run(url: str, runs: Path, episode: Path) -> tuple[dict, threading.Thread]:
    """A flow run (in a thread) that runs embed..tier on true layers, pauses for the review, then selects."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.params import RunParams
    from flows.review import pause_for_review
    from tasks.pipelines import PIPELINES
    from tasks.run.runner import run_pipeline
    from tasks.run.stage import RunRef, StageResult
    from tests.truth_layers import commit_truth_segment

    store = RunStore(runs, "review")
    params = RunParams.model_validate({"select": {"min_images": 3, "tiers": ["S", "A", "B", "C", "D"]}})
    store.record_run({"inputs": [str(episode)], "params": params.model_dump(mode="json"), "until": "select"})
    commit_truth_segment(store, [episode], stride=3)
    segment = StageResult(stage="segment", fingerprint=store.marker("segment")["fingerprint"],
                          manifest_digest=store.manifest_digest("segment"))
    run, steps, out = RunRef(runs_dir=str(runs), name="review"), PIPELINES["episode"], {}

    @flow(name="review-page-test")
    def reviewed() -> list[str]:
        results = run_pipeline(run, params, steps, "tier", after="segment", results={"segment": segment})
        chosen = params.model_copy(update={"select": pause_for_review(run, results["tier"], params.select, timeout=600)})
        return list(run_pipeline(run, chosen, steps, "select", after="tier", results=results))

    def target() -> None:
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            out["state"] = reviewed(return_state=True)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return out, thread


def _api(url: str, path: str) -> object:
    with urllib.request.urlopen(f"{url}/api{path}", timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, path: str, body: dict) -> object:
    request = urllib.request.Request(f"{url}/api{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **_csrf(url)})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_paused(url: str, thread: threading.Thread, timeout: float = 600) -> dict:
    """The test flow's run once it is paused (its state read through the API)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in _post(url, "/flow_runs/filter", {}) if r["state"] and r["state"]["type"] == "PAUSED"]
        if runs:
            return runs[0]
        assert thread.is_alive(), "the test flow ended before it paused"
        time.sleep(1)
    raise AssertionError(f"no flow run paused within {timeout} s")


def _csrf(url: str) -> dict[str, str]:
    token = _api(url, "/csrf-token?client=review-test")["token"]
    return {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "review-test"}


@pytest.mark.e2e
def test_the_review_page_resumes_the_paused_run_with_an_exclusion_and_a_rename(review_api, tmp_path, episode):
    import pyarrow.parquet as pq
    from playwright.sync_api import expect, sync_playwright

    runs = tmp_path / "runs"
    out, thread = _paused_run(review_api, runs, episode)
    paused = _wait_paused(review_api, thread)
    keys = paused["state"]["state_details"]["run_input_keyset"]
    description = _api(review_api, f"/flow_runs/{paused['id']}/input/{keys['description']}")
    link = re.search(r"\]\((http://[^)]+)\)", description).group(1)  # the pause's description links the page
    assert link.startswith(review_api) and link.endswith("/review/review.html"), link
    artifacts = _post(review_api, "/artifacts/filter", {"artifacts": {"key": {"any_": ["review-page"]}}})
    assert [a["flow_run_id"] for a in artifacts] == [paused["id"]] and link in artifacts[0]["data"]

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ui = browser.new_page(viewport={"width": 1280, "height": 1400})
            ui.set_default_timeout(30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            form, page = _fallback_form(ui, review_api, paused["id"])  # the Resume dialog links the review page
            assert page.url == link
            page.set_default_timeout(30_000)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.reload()
            card = page.locator(".card", has=page.locator("button.layer")).first
            cluster_id = int(card.get_attribute("id").removeprefix("cluster-"))
            layer = card.locator("button.layer").first
            excluded = layer.get_attribute("data-layer")
            card.locator("input.include").check()
            card.locator("input.name").fill("Hero Boy")
            card.locator("input.trigger").fill("heroboy")
            layer.click()  # a click on the thumbnail excludes the layer
            expect(layer).to_have_attribute("aria-pressed", "true")
            page.screenshot(path=str(SCREENSHOT))
            page.locator("#resume").click()
            expect(page.locator("#review-status")).to_have_text(re.compile("^Resumed"), timeout=60_000)
        finally:
            browser.close()
    thread.join(600)
    assert not thread.is_alive(), "the flow run did not finish after the review"
    assert out["state"].is_completed(), out["state"]
    assert problems == []

    store = RunStore(runs, "review")
    characters = pq.read_table(store.stage_dir("select") / "characters.parquet").to_pylist()
    hero = [c for c in characters if c["character"] == "Hero_Boy"]
    assert hero and hero[0]["trigger"] == "heroboy" and cluster_id in hero[0]["cluster_ids"], characters
    assert excluded not in store.read_manifest("select").column("item_id").to_pylist()
    assert (store.root / "review" / "review.html").is_file() and SCREENSHOT.stat().st_size > 10_000
    clusters = store.read_manifest("tier").num_rows
    assert not form["for_information"] and form["text_boxes"] <= 3 * clusters, form  # cluster id, name, trigger


MEASURE_DIALOG = """d => { const form = d.querySelector('.p-modal__body') || d;
  return {height: Math.round(form.scrollHeight), switches: d.querySelectorAll('[role=switch]').length,
          text_boxes: d.querySelectorAll('input:not([type=checkbox]), textarea').length,
          for_information: d.innerText.includes('for information')}; }"""


def _fallback_form(page, url: str, flow_run_id: str) -> tuple[dict, object]:
    """Open the paused run's Resume dialog in the Prefect UI; returns its measures and the review page
    its link opens (a new tab)."""
    from playwright.sync_api import expect

    page.goto(f"{url}/runs/flow-run/{flow_run_id}")
    page.get_by_role("button", name="Resume", exact=True).first.click()
    dialog = page.get_by_role("dialog").first
    link = dialog.get_by_role("link", name="open the review page", exact=True).first  # in the form (the description is squeezed)
    expect(link).to_be_visible()
    page.wait_for_load_state("networkidle")
    form = dialog.evaluate(MEASURE_DIALOG)
    print(f"resume form: {form}")
    page.screenshot(path=str(ARTIFACTS / "review_resume_form.png"))
    link.scroll_into_view_if_needed()
    with page.context.expect_page() as opened:
        link.click()
    review = opened.value
    review.wait_for_load_state()
    return form, review
