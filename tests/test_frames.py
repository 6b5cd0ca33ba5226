"""Frames stage: sampling modes, cut detection, drops with reasons, bad input, resume, cache."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.decode import at_width, luma
from tasks.frames import FramesParams, extract_frames
from tasks.run.store import RunStore
from tasks.sources.episodes import discover_videos
from tests.conftest import ROOT, run_cli
from tests.footage import ShotSpec, render_episode
from tests.stages import run_plain


def truth_of(video: Path) -> dict:
    return json.loads(video.with_suffix(".truth.json").read_text())


def cut_scores(found: list[int], truth: dict) -> tuple[float, float]:
    """Precision and recall of detected shot starts (the first frame is not a cut)."""
    true_cuts = set(truth["shot_starts"]) - {0}
    found_cuts = set(found) - {0}
    hits = len(true_cuts & found_cuts)
    return hits / max(1, len(found_cuts)), hits / max(1, len(true_cuts))


def decoded_frames(video: Path) -> list[np.ndarray]:
    with av.open(str(video)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_scene_mode_finds_cuts_drops_intro_and_recap(tmp_path, episode):
    truth = truth_of(episode)
    table, report = extract_frames(episode, "ep", FramesParams(), tmp_path, "frames/shards/ep")
    rows = table.to_pylist()
    precision, recall = cut_scores(report["shot_starts"], truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, report["shot_starts"], truth["shot_starts"])

    intro = truth["shots"][0]
    assert intro["kind"] == "intro"
    intro_rows = [r for r in rows if r["frame_index"] < intro["end"]]
    assert intro_rows and all(r["drop_reason"] == "black" for r in intro_rows)

    recap = next(s for s in truth["shots"] if s["kind"] == "recap")
    recap_rows = [r for r in rows if recap["start"] <= r["frame_index"] < recap["end"]]
    assert recap_rows and not any(r["kept"] for r in recap_rows)
    assert {"duplicate", "shot_limit"} >= {r["drop_reason"] for r in recap_rows}

    kept = [r for r in rows if r["kept"]]
    per_shot = {}
    for r in kept:
        per_shot[r["shot_id"]] = per_shot.get(r["shot_id"], 0) + 1
    assert kept and max(per_shot.values()) <= FramesParams().max_per_shot
    assert all(r["drop_reason"] for r in rows if not r["kept"])
    assert report["kept"] == len(kept) and report["bytes_written"] > 0

    # kept images are the decoded frames, losslessly, at the recorded index
    video_frames = decoded_frames(episode)
    for r in kept[:4]:
        saved = cv2.cvtColor(cv2.imread(str(tmp_path / Path(r["path"]).relative_to("frames/shards/ep"))), cv2.COLOR_BGR2RGB)
        assert np.array_equal(saved, video_frames[r["frame_index"]])


def test_interval_mode_samples_every_n_seconds(tmp_path, episode):
    truth = truth_of(episode)
    table, _ = extract_frames(episode, "ep", FramesParams(mode="interval", interval_s=2.0, dedup_distance=0), tmp_path, "p")
    times = table.column("timestamp").to_pylist()
    assert len(times) == int(truth["n_frames"] / truth["fps"] / 2.0 + 0.999)
    assert np.allclose(np.diff(times), 2.0, atol=1 / truth["fps"])


def test_unsampled_frames_are_not_decoded_and_the_samples_are_those_of_a_full_decode(tmp_path, episode):
    """Interval mode decodes fewer frames than the video holds, yet samples the first frame at or
    after every grid time, with its true index and its exact pixels; cuts are found as on every frame."""
    truth = truth_of(episode)
    with av.open(str(episode)) as c:
        full = [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    start = full[0][0]
    grid = np.arange(0, full[-1][0] - start + 1e-6, 1.0)
    expected = sorted({next(i for i, (t, _) in enumerate(full) if t - start + 1e-6 >= g) for g in grid})
    table, report = extract_frames(episode, "ep", FramesParams(mode="interval", interval_s=1.0), tmp_path, "p")
    assert report["frames_decoded"] < len(full) == truth["n_frames"]
    assert table.column("frame_index").to_pylist() == expected
    assert report["shot_starts"] == truth["shot_starts"]
    for row in table.to_pylist():
        assert row["timestamp"] == pytest.approx(full[row["frame_index"]][0] - start, abs=1e-3)
        if row["kept"]:
            saved = cv2.cvtColor(cv2.imread(str(tmp_path / Path(row["path"]).relative_to("p"))), cv2.COLOR_BGR2RGB)
            assert np.array_equal(saved, full[row["frame_index"]][1]), row["item_id"]
    assert sum(table.column("kept").to_pylist()) >= len(expected) // 2  # the comparison above ran on real frames


def test_keyframes_mode_samples_only_key_frames(tmp_path, episode):
    with av.open(str(episode)) as c:
        keys = {i for i, f in enumerate(c.decode(video=0)) if f.key_frame}
    table, _ = extract_frames(episode, "ep", FramesParams(mode="keyframes"), tmp_path, "p")
    assert set(table.column("frame_index").to_pylist()) == keys


def test_webp_frames_are_lossless(tmp_path, episode):
    table, _ = extract_frames(episode, "ep", FramesParams(image_format="webp"), tmp_path, "p")
    row = next(r for r in table.to_pylist() if r["kept"])
    assert row["path"].endswith(".webp")
    saved = cv2.cvtColor(cv2.imread(str(tmp_path / Path(row["path"]).relative_to("p"))), cv2.COLOR_BGR2RGB)
    assert np.array_equal(saved, decoded_frames(episode)[row["frame_index"]])


def test_png_frames_are_lossless_and_measured_on_their_luma(tmp_path, episode):
    """PNG with one row filter is still lossless; the luma-plane measures match grey from the RGB frame."""
    table, _ = extract_frames(episode, "ep", FramesParams(mode="interval"), tmp_path, "p")
    row = next(r for r in table.to_pylist() if r["kept"])
    saved = cv2.cvtColor(cv2.imread(str(tmp_path / Path(row["path"]).relative_to("p"))), cv2.COLOR_BGR2RGB)
    assert np.array_equal(saved, decoded_frames(episode)[row["frame_index"]])
    with av.open(str(episode)) as c:
        frame = next(f for i, f in enumerate(c.decode(video=0)) if i == row["frame_index"])
        grey = at_width(cv2.cvtColor(frame.to_ndarray(format="rgb24"), cv2.COLOR_RGB2GRAY))
        from_plane = luma(frame)
    assert frame.format.name == "yuv420p" and from_plane.shape == grey.shape
    assert np.abs(from_plane.astype(int) - grey.astype(int)).mean() < 2.0  # limited range scaled to 0-255
    assert row["brightness"] == pytest.approx(float(from_plane.mean()), abs=1e-3)


def test_repeated_opening_is_dropped_across_episodes(tmp_path):
    opening = ShotSpec(background_seed=77, characters=("robot",), seconds=2.0)
    for n, seed in ((1, 11), (2, 12)):
        shots = [opening, ShotSpec(seed, ("zombie", "male_person"), 2.0), ShotSpec(seed + 50, ("female_person",), 2.0, "pan")]
        render_episode(tmp_path / "in" / f"ep{n}.mp4", shots=shots, seed=11, repeat_shot=None)
    store = RunStore(tmp_path / "runs", "r")
    run_plain(store, "frames", sources=[str(tmp_path / "in")], frames=FramesParams())
    rows = store.read_manifest("frames").to_pylist()
    across = [r for r in rows if r["drop_reason"] == "duplicate_across_run"]
    assert across and all(r["episode"] == "ep2" and r["duplicate_of"].startswith("ep1:") for r in across)
    ep2_opening = [r for r in rows if r["episode"] == "ep2" and r["frame_index"] < 36]  # intro 12 + opening 24
    assert not any(r["kept"] for r in ep2_opening)
    assert any(r["kept"] for r in rows if r["episode"] == "ep2")


@pytest.fixture
def bad_inputs(tmp_path, episode) -> Path:
    """A folder with one good episode and every kind of bad input."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(episode, folder / "good.mp4")
    data = episode.read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "notavideo.mkv").write_text("these are not the frames you are looking for\n" * 50)
    (folder / "unreadable.mp4").symlink_to(folder / "gone.mp4")
    damaged = bytearray(data)
    rng = random.Random(0)
    for i in range(len(data) // 2, len(data) // 2 + 3000):
        damaged[i] = rng.randrange(256)
    (folder / "damaged.mp4").write_bytes(bytes(damaged))
    (folder / "notes.txt").write_text("not a video file name: skipped")
    return folder


def test_bad_inputs_are_quarantined_and_the_rest_goes_on(tmp_path, bad_inputs):
    store = RunStore(tmp_path / "runs", "bad")
    result = run_plain(store, "frames", sources=[str(bad_inputs)], frames=FramesParams())
    episodes = {r["episode"]: r for r in pq.read_table(store.stage_dir("frames") / "episodes.parquet").to_pylist()}
    assert set(episodes) == {"good", "empty", "truncated", "notavideo", "unreadable", "damaged"}
    assert episodes["good"]["status"] == "ok" and episodes["good"]["kept"] > 0
    assert episodes["empty"]["reason"] == "empty file (0 bytes)"
    for name in ("empty", "truncated", "notavideo", "unreadable"):
        assert episodes[name]["status"] == "quarantined", name
        assert episodes[name]["reason"], name
    assert episodes["damaged"]["status"] == "damaged" and episodes["damaged"]["decode_errors"] > 0
    assert episodes["damaged"]["kept"] > 0
    rows = store.read_manifest("frames").to_pylist()
    quarantine = {r["episode"]: r["drop_reason"] for r in rows if (r["drop_reason"] or "").startswith("quarantine: ")}
    assert set(quarantine) == {"empty", "truncated", "notavideo", "unreadable"}
    assert "truncated.mp4" in quarantine["truncated"]
    assert result.summary["quarantined"] == 4 and result.summary["damaged"] == 1
    assert len(store.quarantine_report()) == 4


def test_an_episode_that_keeps_nothing_does_not_break_the_cross_run_dedupe(tmp_path, episode):
    """An empty or quarantined episode whose name sorts first must not sink the run (issue 14)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_empty.mp4").write_bytes(b"")
    shutil.copy(episode, folder / "b_good.mp4")
    shutil.copy(episode, folder / "c_again.mp4")
    store = RunStore(tmp_path / "runs", "keeps-nothing")
    run_plain(store, "frames", sources=[str(folder)], frames=FramesParams())
    rows = store.read_manifest("frames").to_pylist()
    assert any(r["kept"] for r in rows if r["episode"] == "b_good")
    repeated = [r for r in rows if r["episode"] == "c_again" and r["drop_reason"] == "duplicate_across_run"]
    assert repeated and all(r["duplicate_of"].startswith("b_good") for r in repeated)


def test_inputs_that_match_nothing_fail_naming_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        discover_videos([str(tmp_path / "nothing-here" / "*.mp4")])


def test_second_run_recomputes_nothing(tmp_path, episode):
    store = RunStore(tmp_path, "again")
    first = run_plain(store, "frames", sources=[str(episode)], frames=FramesParams())
    marker = store.stage_dir("frames") / "_DONE.json"
    shard = store.shard_dir("frames", episode.stem) / "_DONE.json"
    stamps = (marker.stat().st_mtime_ns, shard.stat().st_mtime_ns)
    second = run_plain(store, "frames", sources=[str(episode)], frames=FramesParams())
    assert first.recomputed and not second.recomputed
    assert second.manifest_digest == first.manifest_digest
    assert (marker.stat().st_mtime_ns, shard.stat().st_mtime_ns) == stamps
    third = run_plain(store, "frames", sources=[str(episode)], frames=FramesParams(max_per_shot=1))  # a parameter change recomputes
    assert third.recomputed and third.fingerprint != first.fingerprint


@pytest.fixture(scope="module")
def long_episodes(tmp_path_factory) -> Path:
    """Three ~30 s episodes, long enough to kill the stage between two of them."""
    folder = tmp_path_factory.mktemp("long")
    for seed in (21, 22, 23):
        render_episode(folder / f"ep{seed}.mp4", seed=seed, size=(480, 270), fps=24)
    return folder


def test_killed_run_resumes_to_the_same_manifest(tmp_path, long_episodes, cli_env):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["run", str(long_episodes), "--name", "k", "--until", "frames",
            "--set", "frames.mode=interval", "--set", "frames.interval_s=0.25"]
    proc = subprocess.Popen([sys.executable, "-m", "episode2lora", *args, "--runs-dir", str(killed)],
                            env=cli_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = killed / "k" / "frames" / "shards"
    deadline = time.monotonic() + 240
    def committed() -> dict[str, int]:  # a temporary shard folder (".tmp-*") holds its marker before it is renamed
        return {p.parent.name: p.stat().st_mtime_ns for p in shards.glob("[!.]*/_DONE.json")}

    while time.monotonic() < deadline and not committed():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = committed()
    assert 1 <= len(done_before) < 3, "the kill should land between episodes"
    store = RunStore(killed, "k")
    assert not store.is_done("frames") and not store.manifest_path("frames").exists()
    assert store.stage_status("frames")["state"] == "partial"

    resumed = run_cli(["resume", "k", "--runs-dir", str(killed)], cli_env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for name, stamp in done_before.items():  # finished episodes were not redone
        assert (shards / name / "_DONE.json").stat().st_mtime_ns == stamp
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]

    full = run_cli([*args, "--runs-dir", str(clean)], cli_env, timeout=600)
    assert full.returncode == 0, full.stderr
    assert store.read_manifest("frames").equals(RunStore(clean, "k").read_manifest("frames"))


def test_flow_reuses_finished_work_and_redoes_deleted_output(tmp_path, episode, prefect_api):
    from flows.episode_to_lora import episode_to_lora
    from flows.params import RunParams

    kwargs = dict(inputs=[str(episode)], name="flow", runs_dir=str(tmp_path), params=RunParams(), until="frames")
    first = episode_to_lora(**kwargs)["frames"]
    store = RunStore(tmp_path, "flow")
    marker = store.stage_dir("frames") / "_DONE.json"
    stamp = marker.stat().st_mtime_ns
    second = episode_to_lora(**kwargs)["frames"]
    assert second.manifest_digest == first.manifest_digest and marker.stat().st_mtime_ns == stamp
    assert (tmp_path / "flow" / ".prefect-results").is_dir()

    shutil.rmtree(store.shard_dir("frames", episode.stem) / "images")  # a cache hit whose files are gone
    third = episode_to_lora(**kwargs)["frames"]
    assert store.is_done("frames") and marker.stat().st_mtime_ns != stamp
    assert third.manifest_digest == first.manifest_digest
    assert all((store.root / p).is_file() for p in store.read_manifest("frames").column("path").to_pylist() if p)


def test_cli_rejects_a_wrong_field_naming_it(tmp_path, cli_env):
    bad = run_cli(["run", "data/sample", "--name", "x", "--runs-dir", str(tmp_path), "--set", "frames.mode=sometimes"], cli_env)
    assert bad.returncode == 2 and "frames.mode" in bad.stderr
    config = tmp_path / "run.yaml"
    config.write_text("frames:\n  max_per_shot: 0\n  colour: blue\n")
    bad = run_cli(["run", "data/sample", "--name", "x", "--runs-dir", str(tmp_path), "--config", str(config)], cli_env)
    assert bad.returncode == 2 and "frames.max_per_shot" in bad.stderr and "frames.colour" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_cli_run_status_clean(tmp_path, episode, cli_env):
    out = run_cli(["run", str(episode), "--name", "c", "--until", "frames", "--runs-dir", str(tmp_path)], cli_env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path / "c") in out.stdout
    status = run_cli(["status", "c", "--runs-dir", str(tmp_path)], cli_env)
    assert "frames" in status.stdout and "done" in status.stdout
    cleaned = run_cli(["clean", "c", "--stage", "frames", "--runs-dir", str(tmp_path)], cli_env)
    assert cleaned.returncode == 0 and "frames" in cleaned.stdout
    assert not (tmp_path / "c" / "frames").exists()
    missing = run_cli(["status", "nope", "--runs-dir", str(tmp_path)], cli_env)
    assert missing.returncode == 2 and "nope" in missing.stderr
