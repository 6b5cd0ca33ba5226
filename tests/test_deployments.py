"""Operating the pipeline from Prefect, end to end against a real `prefect server start`.

The session fixture `prefect_ui` (tests/live_prefect.py) runs `episode2lora ui`: a real server
on a free loopback port plus the served deployments. Runs are triggered through the API as
the UI does, and their outputs, artifacts, retries, schedules and webhooks are checked.
"""

from __future__ import annotations

import inspect
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tasks.pipelines import STAGES
from tasks.run.store import MARKER, RunStore
from tests.live_prefect import CONFIG, E2E_INPUT, SAMPLE, WebhookReceiver, flow_run_logs, get_json

pytestmark = pytest.mark.e2e

PER_EPISODE = ("frames", "segment", "embed")


@pytest.fixture(scope="module")
def webhook():
    with WebhookReceiver() as receiver:
        yield receiver


def run_and_wait(live, deployment: str, parameters: dict, timeout: float = 300):
    """Trigger a deployment through the API and wait for the run's final state."""
    from prefect.deployments import run_deployment

    with live.api():
        return run_deployment(deployment, parameters=parameters, timeout=timeout, poll_interval=1)


def wait_until(live, flow_run_id, reached, timeout: float = 300):
    """Poll a flow run until `reached(state)`; returns the flow run."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with live.api(), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and reached(run.state):
                return run
            assert time.monotonic() < deadline, f"flow run still {run.state} after {timeout} s"
            time.sleep(1)


def markers(folder: Path) -> dict[str, int]:
    """Every stage and shard marker under `folder` with its modification time (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob(MARKER)
            if ".prefect-results" not in p.parts}


def default_until() -> str:
    """Where the flow stops by default: the whole pipeline (grows with it)."""
    from flows.episode_to_lora import episode_to_lora

    return inspect.signature(episode_to_lora.fn).parameters["until"].default


def stages_through(until: str) -> list[str]:
    """The stages an episode run goes through when it stops after `until`."""
    from typing import get_args

    from flows.params import Stage

    stages = list(get_args(Stage))
    return stages[: stages.index(until) + 1]


@pytest.fixture(scope="module")
def api_run(prefect_ui, webhook):
    """One full run of the sample episode, triggered through the API."""
    return run_and_wait(prefect_ui, "episode-to-lora/episode-to-lora",
                        {"name": "api", "until": default_until(), "webhook_url": webhook.url})


def test_full_run_through_the_api_has_outputs_artifacts_and_webhook(prefect_ui, api_run, webhook):
    assert api_run.state.is_completed(), api_run.state.message
    store = RunStore(prefect_ui.runs_dir, "api")
    record = store.read_run_record()
    assert record["inputs"] == [str(E2E_INPUT)] and record["until"] == default_until()
    ran = stages_through(record["until"])
    assert [s for s in ran if not store.is_done(s)] == []
    assert set(store.read_manifest("frames").column("episode").to_pylist()) == {E2E_INPUT.stem}

    artifacts = get_json(f"{prefect_ui.api_url}/artifacts/filter",
                         {"flow_runs": {"id": {"any_": [str(api_run.id)]}}, "limit": 200})
    assert {"markdown", "table", "progress"} <= {a["type"] for a in artifacts}
    for stage in ran:
        mine = [a for a in artifacts if (a["key"] or "").startswith(stage)]
        assert {"markdown", "table"} <= {a["type"] for a in mine}, f"stage {stage} published {[a['key'] for a in mine]}"
        assert any(str(store.stage_dir(stage)) in a["data"] for a in mine if a["type"] == "markdown"), "report path missing"
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert progress and all(float(a["data"]) == 100.0 for a in progress), [a["data"] for a in progress]

    from tasks.run.links import artifact_key

    links = {a["key"]: a for pattern in ("report", "lora-") for a in get_json(  # the files to open next
        f"{prefect_ui.api_url}/artifacts/filter", {"flow_runs": {"id": {"any_": [str(api_run.id)]}},
                                                   "artifacts": {"key": {"like_": pattern}}, "limit": 200})}
    report = store.root / "report" / "cluster_report.html"
    served = f"{prefect_ui.url}/episode2lora/files{report.resolve()}"  # served by the UI's server: it opens from the run page
    assert report.is_file() and links["cluster-report"]["data"] == f"[{report.resolve()}]({served})"
    with urllib.request.urlopen(served, timeout=30) as response:
        assert response.read() == report.read_bytes()
    loras = sorted(store.root.glob("*/shards/*/*.safetensors"))
    assert loras and {k for k in links if k.startswith("lora-")} == {artifact_key(f"lora-{p.parts[-4]}-{p.stem}") for p in loras}
    assert api_run.name == "api"  # the flow run is named as its run folder

    payload = webhook.wait_for(lambda p: p["flow_run_id"] == str(api_run.id))
    assert (payload["run"], payload["status"], payload["error"]) == ("api", "completed", None)
    assert set(payload["stages"]) == set(ran)
    assert {s: c["rows"] for s, c in payload["stages"].items()} == {s: store.stage_status(s)["rows"] for s in ran}
    assert all(Path(p).is_file() and p.endswith(".safetensors") for p in payload["loras"])
    assert bool(payload["loras"]) == ("train" in ran)


def test_served_run_logs_hold_the_stage_lines(prefect_ui, api_run):
    """INFO logs of a run served by `episode2lora ui` reach the UI's Logs tab: one line per stage."""
    store = RunStore(prefect_ui.runs_dir, "api")
    stages = stages_through(default_until())

    def missing(messages: list[str]) -> list[str]:
        return [s for s in stages if not any(f"{store.stage_dir(s)}" in m for m in messages)]

    messages = flow_run_logs(prefect_ui.api_url, str(api_run.id), lambda m: not missing(m))
    print(f"served run: {len(messages)} log lines in the UI")
    assert not missing(messages), f"no log line of stages {missing(messages)}"
    assert any("cluster report:" in m for m in messages)


def _block(store: RunStore, stage: str) -> Path:
    """Put a folder where `stage` writes its run-level output, so the stage fails after its inputs are done.

    Any later stage fails as it starts (it cannot clear its manifest); `frames`, the first
    stage, fails when it merges its episode shards (it cannot write its episodes table).
    """
    blocker = store.stage_dir(stage) / ("episodes.parquet" if stage == "frames" else "manifest.parquet")
    blocker.mkdir(parents=True)
    (blocker / "in-the-way").write_text("a folder where a file must go")
    return blocker


def test_failed_run_retried_like_the_ui_reruns_only_what_did_not_finish(prefect_ui, api_run, webhook):
    """The last stage of the finished run is removed and blocked: the next run fails there; after
    the cause is removed, Retry on the same flow run finishes it without touching finished work."""
    from prefect import get_client
    from prefect.states import State, StateType

    until = default_until()
    store = RunStore(prefect_ui.runs_dir, "api")
    inputs = store.read_run_record()["inputs"]
    store.clean(until, STAGES)
    blocker = _block(store, until)
    failed = run_and_wait(prefect_ui, "episode-to-lora/episode-to-lora",
                          {"name": "api", "inputs": inputs, "until": until, "webhook_url": webhook.url})
    assert failed.state.is_failed(), failed.state
    report = webhook.wait_for(lambda p: p["flow_run_id"] == str(failed.id) and p["status"] == "failed")
    assert blocker.name in report["error"]
    finished = markers(store.root)
    assert finished, "nothing finished before the failure"
    assert not store.is_done(until)

    shutil.rmtree(blocker)  # fix the cause, then Retry the same flow run (what the UI's Retry button sends)
    with prefect_ui.api(), get_client(sync_client=True) as client:
        response = client.set_flow_run_state(
            failed.id, State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"), force=False)
    assert response.status.value == "ACCEPT", response
    retried = wait_until(prefect_ui, failed.id, lambda state: state.is_final() and state.name != "AwaitingRetry")

    assert retried.state.is_completed(), retried.state.message
    assert retried.run_count == 2
    assert store.is_done(until)
    after = markers(store.root)
    assert {k: after.get(k) for k in finished} == finished, "finished stages or shards were written again"
    assert set(after) > set(finished)
    webhook.wait_for(lambda p: p["flow_run_id"] == str(failed.id) and p["status"] == "completed")


def test_review_pauses_after_tier_and_continues_with_the_answers(prefect_ui, api_run):
    """Rerun the finished run with the review on: the finished stages are reused, the run pauses
    after `tier` with the cluster form, and the answers given through the API decide `select`."""
    import pyarrow.parquet as pq
    from prefect.deployments import run_deployment

    store = RunStore(prefect_ui.runs_dir, "api")
    inputs = store.read_run_record()["inputs"]
    identity = {k: v for k, v in markers(store.root).items() if k.split("/")[0] in stages_through("tier")}
    with prefect_ui.api():
        started = run_deployment("episode-to-lora/episode-to-lora", timeout=0,
                                 parameters={"name": "api", "inputs": inputs, "until": "select", "review_clusters": True})
    paused = wait_until(prefect_ui, started.id, lambda state: state.is_paused() or state.is_final())
    assert paused.state.is_paused(), paused.state

    keys = paused.state.state_details.run_input_keyset
    form = get_json(f"{prefect_ui.api_url}/flow_runs/{paused.id}/input/{keys['schema']}")
    offered = form["properties"]["clusters"]["default"]
    clusters = sorted(store.read_manifest("tier").column("cluster_id").to_pylist())
    assert [c["cluster_id"] for c in offered] == clusters
    first = clusters[0]
    answers = [dict(c, selected=c["cluster_id"] == first) for c in offered]
    answers[0].update(name="Hero Boy", trigger="heroboy")
    get_json(f"{prefect_ui.api_url}/flow_runs/{paused.id}/resume", {"run_input": {"clusters": answers}})
    finished = wait_until(prefect_ui, paused.id, lambda state: state.is_final())

    assert finished.state.is_completed(), finished.state.message
    after = markers(store.root)
    assert {k: after.get(k) for k in identity} == identity, "stages before the review ran again"
    characters = pq.read_table(store.stage_dir("select") / "characters.parquet").to_pylist()
    assert [(c["character"], c["trigger"], c["cluster_ids"]) for c in characters] == [("Hero_Boy", "heroboy", [first])]


def test_reprocess_is_scheduled_by_config_and_processes_only_the_new_episode(prefect_ui, api_run):
    from prefect import get_client

    from tests.footage import default_shots, render_episode

    [configured] = [d for d in yaml.safe_load(CONFIG.read_text())["deployments"] if d["name"] == "reprocess"]
    with prefect_ui.api(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("reprocess/reprocess")
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == configured["schedules"][0]["cron"]
    assert schedule.schedule.timezone == configured["schedules"][0]["timezone"] and schedule.active

    store = RunStore(prefect_ui.runs_dir, "api")  # the reprocess deployment watches for run "api"
    old = {k: v for k, v in markers(store.root).items() if k.split("/")[0] in PER_EPISODE and "/shards/" in k}
    assert old
    render_episode(prefect_ui.watch_folder / "episode03.mp4", shots=default_shots(7)[:3], seed=7)
    flow_run = run_and_wait(prefect_ui, "reprocess/reprocess", {})

    assert flow_run.state.is_completed(), flow_run.state.message
    frames = store.read_manifest("frames")
    assert set(frames.column("episode").to_pylist()) == {E2E_INPUT.stem, "episode03"}
    after = markers(store.root)
    assert {k: after.get(k) for k in old} == old, "the old episode's per-episode shards were redone"
    new = [k for k in after if k.split("/")[0] in PER_EPISODE and "/shards/" in k and k not in old]
    assert new and all("episode03" in k for k in new), new
    assert store.read_run_record()["inputs"] == [str(E2E_INPUT), str(prefect_ui.watch_folder / "episode03.mp4")]


def test_dask_task_runner_spreads_episodes_over_two_workers(prefect_ui, tmp_path):
    import pyarrow.parquet as pq
    from distributed import Client, LocalCluster

    from flows.episode_to_lora import episode_to_lora
    from tasks.frames import FramesParams
    from tests.stages import run_plain

    inputs = [str(SAMPLE / "episode01.mp4"), str(SAMPLE / "episode02.mp4")]
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client, prefect_ui.api():
        results = episode_to_lora(inputs=inputs, name="dask", runs_dir=str(tmp_path), until="frames",
                                  task_runner="dask", dask_address=cluster.scheduler_address)
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert sorted(executed.values()) == [1, 1], executed  # one episode on each worker

    on_dask = RunStore(tmp_path, "dask")
    assert results["frames"].manifest_digest == on_dask.manifest_digest("frames")
    reference = run_plain(RunStore(tmp_path, "plain"), "frames", sources=inputs, frames=FramesParams())
    assert reference.summary == results["frames"].summary
    assert pq.read_table(on_dask.manifest_path("frames")).equals(pq.read_table(RunStore(tmp_path, "plain").manifest_path("frames")))



def test_train_deployment_trains_a_packaged_folder(prefect_ui, webhook, tmp_path):
    from tests.lora_fixtures import make_character

    package = tmp_path / "package"
    make_character(package, "blob", "zqx")
    flow_run = run_and_wait(prefect_ui, "train-package/train", {
        "package_dir": str(package), "params": {"profile": "demo", "base": "tiny", "max_steps": 3},
        "webhook_url": webhook.url})

    assert flow_run.state.is_completed(), flow_run.state.message
    lora = tmp_path / "package-lora" / "blob" / "blob.safetensors"
    assert lora.is_file()
    payload = webhook.wait_for(lambda p: p["flow_run_id"] == str(flow_run.id))
    assert (payload["status"], payload["loras"], payload["error"]) == ("completed", [str(lora)], None)


def test_a_failed_run_says_why_and_what_to_do_in_its_state_and_first_error_line(prefect_ui, api_run, tmp_path):
    """A run whose base model is a local folder that does not exist fails in `train`; the flow run's
    state message and its first ERROR log line are the one line saying so and what to pass instead
    (no hint about HF_HUB_OFFLINE: nothing was to be downloaded). Kept last: it changes run "api"."""
    store = RunStore(prefect_ui.runs_dir, "api")
    record = store.read_run_record()
    missing = tmp_path / "models" / "sd15"
    params = dict(record["params"], train=dict(record["params"]["train"], base=str(missing)))
    failed = run_and_wait(prefect_ui, "episode-to-lora/episode-to-lora", {
        "name": "api", "inputs": record["inputs"], "params": params, "until": "train", "new_attempt": True})
    assert failed.state.is_failed(), failed.state

    expected = f"base model '{missing}' does not exist"
    message = get_json(f"{prefect_ui.api_url}/flow_runs/{failed.id}")["state"]["message"]
    print(f"state message: {message}")
    assert message.startswith(expected) and "\n" not in message and "HF_HUB_OFFLINE" not in message, message
    assert "tiny" in message  # what to do
    errors = flow_run_logs(prefect_ui.api_url, str(failed.id), lambda m: any(line.startswith(expected) for line in m),
                           level=40)
    assert errors and errors[0].splitlines()[0].startswith(expected), errors[:1]
