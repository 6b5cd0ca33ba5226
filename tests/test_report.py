"""The cluster report (HTML + JSON), the `report` command, the identity stages as Prefect tasks, and
the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.run.stage import RunRef, StageResult
from tasks.run.store import RunStore
from tests.conftest import ARTIFACTS, ROOT
from tests.truth_layers import commit_truth_segment

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_api, episode, two_episodes):
    """True layers of three episodes through embed -> cluster -> tier -> select, as Prefect tasks in a flow."""
    from prefect import flow

    from flows.params import RunParams
    from tasks.pipelines import PIPELINES
    from tasks.run.runner import run_pipeline

    runs = tmp_path_factory.mktemp("runs")
    store = RunStore(runs, "report-run")
    commit_truth_segment(store, [episode, *two_episodes], stride=3)
    overrides = runs / "overrides.yaml"
    overrides.write_text("clusters:\n  0: {name: 'Lead <b>&</b> Co', trigger: leadco}\n")
    params = RunParams.model_validate({"select": {"min_images": 10, "overrides": str(overrides)}})

    @flow(name="identity-stages-test")
    def identity(run: RunRef, segment: StageResult) -> dict[str, StageResult]:
        results = run_pipeline(run, params, PIPELINES["episode"], "select", after="segment", results={"segment": segment})
        return {name: result for name, result in results.items() if name != "segment"}

    segment = StageResult(stage="segment", fingerprint=store.marker("segment")["fingerprint"],
                          manifest_digest=store.manifest_digest("segment"))
    run = RunRef(runs_dir=str(runs), name="report-run")
    results = identity(run, segment)
    again = identity(run, segment)
    return store, results, again


def test_identity_stages_run_as_prefect_tasks_and_cache(finished_run):
    store, results, again = finished_run
    assert list(results) == ["embed", "cluster", "tier", "select"]
    assert all(r.recomputed for r in results.values())
    assert not any(r.recomputed for r in again.values())  # second flow run: every stage from the marker
    for stage in results:
        assert store.is_done(stage, results[stage].fingerprint)
    assert (store.root / "report" / "cluster_report.html").is_file()  # written by the flow after the stages
    assert (store.stage_dir("tier") / "clusters.parquet").is_file()
    assert results["select"].summary["names"]["Lead_b_b_Co"] == "leadco"


def test_report_json_matches_the_manifests(finished_run):
    from tasks.report import write_report

    store, results, _ = finished_run
    html_path, json_path, report = write_report(store)
    data = json.loads(json_path.read_text())
    tiers = store.read_manifest("tier").to_pylist()
    assert data["summary"]["clusters"] == len(tiers) == len(data["clusters"])
    assert sum(data["summary"]["by_tier"].values()) == len(tiers)
    assert data["summary"]["layers"] == store.read_manifest("cluster").num_rows
    assert data["summary"]["selected_characters"] == len(data["characters"]) >= 1
    lead = next(c for c in data["clusters"] if c["cluster_id"] == 0)
    assert lead["character"] == "Lead_b_b_Co" and lead["trigger"] == "leadco" and lead["selected"]
    page = html_path.read_text()
    atypical = [i for t in tiers if t["kind"] != "scenery" for i in t["atypical_ids"]]
    assert atypical  # least typical layers first, one tick box each, for the overrides file
    assert page.count("data:image/png;base64,") == 1 + len(tiers) + len(atypical)  # map, sheets, least typical
    assert page.count("class='exclude'") == len(atypical) and "id='overrides'" in page
    assert all(f"data-layer='{i}'" in page for i in atypical)
    assert "<b>&</b>" not in page  # user text is escaped
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # self-contained: no external resources


def test_report_command_prints_tiers_and_kinds(finished_run):
    store, *_ = finished_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "episode2lora", "report", store.name, "--runs-dir", str(store.root.parent)],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tier" in done.stdout and all(k in done.stdout for k in ("character", "scenery", "mixed"))
    assert re.search(r"S\s*│\s*\d+", done.stdout) and "cluster_report.html" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "episode2lora", "report", "nope", "--runs-dir", str(store.root.parent)],
                             env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert missing.returncode != 0 and "no run named 'nope'" in missing.stderr


def test_report_needs_finished_stages(tmp_path):
    from tasks.report import write_report
    from tasks.run.store import StageNotDoneError

    with pytest.raises(StageNotDoneError, match="--until tier"):
        write_report(RunStore(tmp_path, "empty"))


def _ensure_chromium() -> str:
    if not Path(CHROMIUM).exists():  # the Makefile's `chromium` target installs it; this is the fallback
        subprocess.run(["sh", "-c", "apt-get update -qq && apt-get install -y -qq chromium"], check=True,
                       capture_output=True, timeout=1200)
    return CHROMIUM


@pytest.mark.e2e
def test_report_opens_in_headless_chromium_without_errors(finished_run):
    from playwright.sync_api import sync_playwright

    from tasks.report import write_report

    store, *_ = finished_run
    html_path, _, report = write_report(store)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "cluster_report.png"
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_ensure_chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(html_path.resolve().as_uri())
            page.wait_for_load_state("load")
            rows = page.locator("#tier-table tbody tr")
            assert rows.count() == 6  # S A B C D + noise
            assert rows.nth(0).locator("td").nth(0).inner_text().strip() == "S"
            assert page.locator("#cluster-map").is_visible()
            width = page.eval_on_selector("#cluster-map", "img => img.complete ? img.naturalWidth : 0")
            assert width == 880
            sheets = page.eval_on_selector_all(".card > img", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")
            assert sheets == report["summary"]["clusters"]
            page.screenshot(path=str(shot), full_page=False)
        finally:
            browser.close()
    assert problems == []
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_a_run_without_layers_goes_through_every_stage_and_stops_clearly_at_select(tmp_path):
    import pyarrow as pa

    from tasks.report import write_report
    from tasks.segment import SCHEMA as SEGMENT_SCHEMA
    from tasks.select import NothingSelected
    from tasks.run.store import fingerprint
    from tests.stages import run_plain

    store = RunStore(tmp_path, "empty")
    store.begin_stage("segment", {})
    store.commit_stage("segment", SEGMENT_SCHEMA.empty_table(), fingerprint("segment", 0, {}, {}))
    assert run_plain(store, "embed", after="segment").summary["kept"] == 0
    assert run_plain(store, "cluster", after="embed").summary["clusters"] == 0
    assert run_plain(store, "tier", after="cluster").summary["clusters"] == 0
    with pytest.raises(NothingSelected, match="no character selected, because clustering found no cluster"):
        run_plain(store, "select", after="tier")
    html_path, _, report = write_report(store)  # the report still shows what there is
    assert report["summary"]["layers"] == 0 and "tier-table" in html_path.read_text()
    assert isinstance(store.read_manifest("tier"), pa.Table) and not store.is_done("select")
