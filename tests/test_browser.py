"""A user starts a run from the Prefect UI in a real browser (headless Debian Chromium)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tasks.run.store import RunStore
from tests.live_prefect import E2E_INPUT, ROOT

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "test-artifacts" / "prefect_ui_run.png"


def _flow_runs_of(live, deployment: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with live.api(), get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)


def _wait_final(live, flow_run_id, timeout: float):
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with live.api(), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run still {run.state} after {timeout} s"
            time.sleep(1)


@contextmanager
def deployment_page(live, deployment: str, screenshot: Path) -> Iterator:
    """Headless Chromium on the page of `deployment` (from the deployments list, as a person gets there);
    a screenshot of where the page is goes to `screenshot` on the way out, whatever happened."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"Debian chromium is missing at {CHROMIUM} (make test installs it)"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        try:
            page.goto(f"{live.url}/deployments")
            page.get_by_role("link", name=deployment, exact=True).first.click()
            yield page
        finally:
            page.screenshot(path=str(screenshot))
            browser.close()


def test_quick_run_from_the_deployment_page_completes(prefect_ui):
    from playwright.sync_api import expect

    before = {r.id for r in _flow_runs_of(prefect_ui, "episode-to-lora")}
    with deployment_page(prefect_ui, "episode-to-lora", SCREENSHOT) as page:  # 1. the full-run deployment's page
        expect(page.get_by_role("button", name="Run", exact=True)).to_be_visible()
        # 2. Run -> Quick run (the deployment's default parameters: the shipped sample)
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Quick run", exact=True).click()
        dialog = page.get_by_role("dialog")  # the run form, filled with the deployment's defaults
        expect(dialog.get_by_text("Run Deployment")).to_be_visible()
        for attempt in range(3):  # a click while the form is still loading its schema can be lost
            dialog.get_by_role("button", name="Run", exact=True).click()
            try:
                expect(dialog).to_be_hidden(timeout=20_000)  # the form was submitted
                break
            except AssertionError:
                if attempt == 2:
                    raise
        # 3. the new run appears; follow it on its page until it completes
        deadline = time.monotonic() + 300  # a loaded machine: the run can take minutes to be created
        while not (new := [r for r in _flow_runs_of(prefect_ui, "episode-to-lora") if r.id not in before]):
            assert time.monotonic() < deadline, "Quick run created no flow run in 300 s"
            time.sleep(0.5)
        page.goto(f"{prefect_ui.url}/runs/flow-run/{new[0].id}")
        run = _wait_final(prefect_ui, new[0].id, timeout=600)
        page.reload()  # the page as a user opening the finished run sees it: state badge, run graph
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(2000)  # the run graph is drawn on a canvas: give it time before the screenshot
    assert SCREENSHOT.stat().st_size > 10_000

    assert run.state.is_completed(), run.state
    store = RunStore(prefect_ui.runs_dir, run.parameters["name"])
    record = store.read_run_record()
    assert record["inputs"] == [str(E2E_INPUT)]
    assert store.is_done(record["until"])


FORM_SHOTS = ROOT / "test-artifacts" / "prefect_custom_run_form"
MEASURE_FORM = """() => { const form = document.querySelector('form.flow-run-create-form-v2');
  const count = s => form.querySelectorAll(s).length;
  return {height: Math.round(form.getBoundingClientRect().height), properties: count('.schema-form-property'),
          controls: count('input, textarea, .p-select-button__control, .p-toggle, .p-button-group__button'),
          none_toggles: count('.schema-form-property-null'), dropdowns: count('.p-select-button__control')}; }"""


def _field(page, label: str):
    """The form property whose own label is `label` (Prefect adds ' (Optional)' to optional ones)."""
    import re

    own_label = page.locator(":scope > .p-label__header span.schema-form-property__label",
                             has_text=re.compile(rf"^{re.escape(label)}( \(Optional\))?$"))
    return page.locator("div.schema-form-property").filter(has=own_label).first


def _choose(page, field, option: str) -> None:
    """Open a Prefect dropdown (a click, else the arrow key) and pick `option`."""
    control = field.locator(".p-select-button__control")
    control.scroll_into_view_if_needed()
    control.click()
    choice = page.get_by_role("option", name=option, exact=True)
    if not choice.is_visible():
        control.focus()
        page.keyboard.press("ArrowDown")
    choice.click()


def _open_custom_run(page, first_field: str) -> dict:
    """Run -> Custom run on a deployment's page; once its form shows `first_field`, the form's measures."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    expect(_field(page, first_field)).to_be_visible()
    page.wait_for_load_state("networkidle")
    form = page.evaluate(MEASURE_FORM)
    print(f"custom run form: {form}")
    return form


def test_custom_run_form_is_filled_with_a_model_dropdown_and_the_run_completes(prefect_ui):
    """A person fills the Custom run form: a run name and the segmenter from the dropdown of known
    models; the flow run is named after the run folder and completes with the chosen model."""
    from playwright.sync_api import expect

    before = {r.id for r in _flow_runs_of(prefect_ui, "episode-to-lora")}
    with deployment_page(prefect_ui, "episode-to-lora", FORM_SHOTS / "3-run.png") as page:
        form = _open_custom_run(page, "name")
        page.screenshot(path=str(FORM_SHOTS / "1-form.png"))

        _field(page, "name").locator("textarea, input").first.fill("form-run")
        model = _field(page, "Model")  # segment.model, the first field of that name
        expect(model.get_by_role("button", name="known model")).to_be_visible()
        _choose(page, model, "isnet-anime")
        expect(model.locator(".p-select-button__value")).to_have_text("isnet-anime")
        page.screenshot(path=str(FORM_SHOTS / "2-model-chosen.png"))
        page.get_by_role("button", name="Submit", exact=True).click()

        deadline = time.monotonic() + 300  # a loaded machine: the form's submit can take minutes to land
        while not (new := [r for r in _flow_runs_of(prefect_ui, "episode-to-lora") if r.id not in before]):
            assert time.monotonic() < deadline, "the custom run form created no flow run in 300 s"
            time.sleep(0.5)
        run = _wait_final(prefect_ui, new[0].id, timeout=300)
        page.goto(f"{prefect_ui.url}/runs/flow-run/{run.id}")
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible()

    assert form["none_toggles"] <= 2 and form["dropdowns"] >= 10, form  # webhook_url, dask_address: None = off
    assert run.state.is_completed(), run.state
    assert run.name == "form-run" and run.parameters["params"]["segment"]["model"] == "isnet-anime"
    record = RunStore(prefect_ui.runs_dir, "form-run").read_run_record()
    assert record["params"]["segment"]["model"] == "isnet-anime" and record["until"] == "frames"


def test_the_source_run_form_shows_the_source_and_each_ingest_section_as_fields(prefect_ui):
    """The one flow of render folders and photo sets (deployment renders-to-lora): its Custom run form
    has the source as a dropdown set by the deployment, and both ingest sections as plain fields."""
    from playwright.sync_api import expect

    with deployment_page(prefect_ui, "renders-to-lora", FORM_SHOTS / "source-form.png") as page:
        form = _open_custom_run(page, "input_dir")
        expect(_field(page, "source").locator(".p-select-button__value")).to_have_text("renders")
        for label in ("Frames Per Sequence", "Stage1 Phases", "Min Images", "Intensity"):  # renders, photos, augment
            expect(_field(page, label).locator("input, textarea, .p-select-button__control").first).to_be_attached()
    assert form["none_toggles"] <= 2 and form["dropdowns"] >= 5, form  # trigger, webhook_url: None = not given
