"""The bad-input corpus: every hostile or clumsy input is either quarantined with its reason while the
rest completes, or refused up front with a one-line message naming it; never a traceback, never a
changed existing run. The test writes the corpus with its outcomes to test-artifacts/bad_inputs.md."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tasks.run.store import RunStore
from tests.bad_inputs import (read_only, small_disk, write_audio_only, write_corrupt_png, write_cover_first,
                              write_png_bomb, write_video)
from tests.conftest import ARTIFACTS, ROOT, run_cli

SAMPLE = ROOT / "data" / "sample"
CORPUS: list[tuple[str, str, str]] = []
"""(case, outcome, message) of every case run, written to test-artifacts/bad_inputs.md."""


@pytest.fixture(scope="module", autouse=True)
def corpus_table():
    yield
    ARTIFACTS.mkdir(exist_ok=True)
    lines = ["# Bad-input corpus (tests/test_bad_inputs.py)", "", f"{len(CORPUS)} cases.", "",
             "| case | outcome | message |", "|---|---|---|"]
    lines += [f"| {c} | {o} | {m.replace('|', '/')[:220]} |" for c, o, m in CORPUS]
    (ARTIFACTS / "bad_inputs.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` with its mtime and content digest."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A runs folder holding an existing run `ref` (frames of episode01, default parameters)."""
    from flows.params import RunParams

    folder = tmp_path_factory.mktemp("runs")
    store = RunStore(folder, "ref")
    store.record_run({"inputs": [str(SAMPLE / "episode01.mp4")], "params": RunParams().model_dump(mode="json"),
                      "until": "frames"})
    (store.root / "frames").mkdir()
    (store.root / "frames" / "manifest.parquet").write_bytes(b"stands for finished work")
    for name, text in BROKEN_RECORDS.items():  # runs whose run.json was damaged or edited by hand
        (folder / name).mkdir()
        (folder / name / "run.json").write_text(text)
    return folder


BROKEN_RECORDS = {"broken-json": '{"inputs": ["a.mp4"], "par', "broken-list": "[]"}
RUN_NAMES = sorted(["ref", *BROKEN_RECORDS])


def _configs(folder: Path) -> dict[str, Path]:
    texts = {"malformed": "frames: [mode: scene\n", "list": "- frames\n- segment\n", "stage": "framez:\n  mode: scene\n",
             "scalar_stage": "frames: 5\n"}
    paths = {}
    for key, text in texts.items():
        paths[key] = folder / f"{key}.yaml"
        paths[key].write_text(text)
    return paths


EP1, EP2 = str(SAMPLE / "episode01.mp4"), str(SAMPLE / "episode02.mp4")
REFUSALS = [  # (case, arguments, what the one-line message must name)
    ("run name with a space", ["run", EP1, "--name", "a b"], "'a b'"),
    ("run name with a colon", ["run", EP1, "--name", "a:b"], "'a:b'"),
    ("run name ../escape", ["run", EP1, "--name", "../escape"], "'../escape'"),
    ("empty run name", ["run", EP1, "--name", ""], "''"),
    ("run name of 81 characters", ["run", EP1, "--name", "a" * 81], "a" * 81),
    ("glob matching nothing (the only input)", ["run", "{tmp}/nothing/*.mp4", "--name", "g"], "nothing/*.mp4"),
    ("misspelt file on an existing run", ["run", "typo.mp4", "--name", "ref"], "typo.mp4"),
    ("malformed YAML config", ["run", EP1, "--name", "c", "--config", "{malformed}"], "not valid YAML"),
    ("config that is a list", ["run", EP1, "--name", "c", "--config", "{list}"], "mapping"),
    ("config with a number for a stage, and --set of a field inside it",
     ["run", EP1, "--name", "c", "--config", "{scalar_stage}", "--set", "frames.mode=scene"], "frames.mode"),
    ("config file missing", ["run", EP1, "--name", "c", "--config", "{tmp}/none.yaml"], "none.yaml"),
    ("unknown stage in the config", ["run", EP1, "--name", "c", "--config", "{stage}"], "framez"),
    ("unknown field", ["run", EP1, "--name", "c", "--set", "frames.colour=blue"], "frames.colour"),
    ("wrong type", ["run", EP1, "--name", "c", "--set", "frames.max_per_shot=many"], "frames.max_per_shot"),
    ("negative number", ["run", EP1, "--name", "c", "--set", "cluster.min_cluster_size=-3"], "cluster.min_cluster_size"),
    ("zero where >= 1 is needed", ["run", EP1, "--name", "c", "--set", "frames.interval_s=0"], "frames.interval_s"),
    ("override without '='", ["run", EP1, "--name", "c", "--set", "frames.mode"], "frames.mode"),
    ("override with an unknown value", ["run", EP1, "--name", "c", "--set", "frames.mode=sometimes"], "frames.mode"),
    ("override of a stage that does not exist", ["run", EP1, "--name", "c", "--set", "framez.mode=scene"], "framez"),
    ("unknown --until stage", ["run", EP1, "--name", "c", "--until", "framez"], "framez"),
    ("changed parameters on an existing run", ["run", EP1, "--name", "ref", "--set", "frames.mode=interval"],
     "params.frames.mode"),
    ("changed inputs on an existing run", ["run", EP2, "--name", "ref"], "inputs"),
    ("resume of a run that does not exist", ["resume", "nosuch"], "nosuch"),
    ("resume with a name outside the alphabet", ["resume", "../ref"], "'../ref'"),
    ("photos folder that does not exist", ["photos", "{tmp}/nophotos", "--name", "p", "--trigger", "ohwx"], "nophotos"),
    ("renders folder that does not exist", ["renders", "{tmp}/norenders", "--name", "r"], "norenders"),
    ("--runs-dir that is a file", ["run", EP1, "--name", "c", "--runs-dir", "{tmp}/afile"], "afile"),
    ("--set value that is not valid YAML", ["run", EP1, "--name", "c", "--set", "frames.mode=[x"], "frames.mode"),
    ("--set of a stage and of a field inside it", ["run", EP1, "--name", "c", "--set", "frames=5", "--set",
                                                   "frames.mode=scene"], "frames.mode"),
    ("input file name longer than the system allows", ["run", "{tmp}/" + "a" * 300 + ".mp4", "--name", "c"],
     "longer than the system allows"),
    ("input path longer than the system allows", ["run", "{tmp}/" + ("d" * 200 + "/") * 25 + "x.mp4", "--name", "c"],
     "longer than the system allows"),
    ("--runs-dir longer than the system allows", ["run", EP1, "--name", "c", "--runs-dir", "{tmp}/" + "r" * 300],
     "--runs-dir"),
    ("a FIFO named pipe.mp4 as the only input", ["run", "{tmp}/pipe.mp4", "--name", "c"], "pipe.mp4"),
    ("input named by bytes that are not UTF-8", ["run", os.fsdecode(b"{tmp}/latin1_\xe9.mp4"), "--name", "c"],
     "UTF-8"),
    ("segment.detector file missing", ["run", EP1, "--name", "c", "--set", "segment.detector={tmp}/nope.onnx"],
     "nope.onnx"),
    ("resume of a run whose run.json is not JSON", ["resume", "broken-json"], "run.json"),
    ("resume of a run whose run.json is a list", ["resume", "broken-list"], "run.json"),
    ("run on a run whose run.json is broken", ["run", EP1, "--name", "broken-json"], "run.json"),
]


@pytest.mark.parametrize("case, args, named", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_commands_are_refused_up_front_with_one_line(case, args, named, runs, tmp_path):
    from episode2lora.cli import app

    (tmp_path / "afile").write_text("not a folder")
    os.mkfifo(tmp_path / "pipe.mp4")  # opening it would block
    paths = {"tmp": str(tmp_path), **{k: str(v) for k, v in _configs(tmp_path).items()}}
    args = [a.format(**paths) for a in args]
    if "--runs-dir" not in args:
        args += ["--runs-dir", str(runs)]
    before = snapshot(runs)
    result = CliRunner().invoke(app, args)
    message = result.output.strip()
    CORPUS.append((case, f"refused (exit {result.exit_code})", " ".join(line.strip() for line in message.splitlines())))
    assert result.exit_code == 2, message
    assert "Traceback" not in message and (result.exception is None or isinstance(result.exception, SystemExit))
    lines = [line for line in message.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and named in message, message
    assert len([line for line in lines if not line.startswith("  ")]) == 1, message  # one message (details indented)
    assert snapshot(runs) == before  # the existing runs are untouched, no other run appears
    assert sorted(p.name for p in runs.iterdir()) == RUN_NAMES


def test_a_read_only_runs_folder_is_refused_up_front(tmp_path):
    from episode2lora.cli import app

    folder = tmp_path / "locked"
    with read_only(folder):
        result = CliRunner().invoke(app, ["run", EP1, "--name", "ro", "--runs-dir", str(folder / "runs")])
        assert not (folder / "runs").exists()
    CORPUS.append(("read-only runs folder", f"refused (exit {result.exit_code})", result.output.strip()))
    assert result.exit_code == 2 and "read-only" in result.output and str(folder) in result.output


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    """One folder of broken episodes beside one good clip (each is a case of the corpus)."""
    folder = tmp_path_factory.mktemp("bad-episodes")
    good = write_video(folder / "good.mp4", 160, 96, 16)
    data = good.read_bytes()
    (folder / "zero_byte.mp4").write_bytes(b"")
    (folder / "truncated_10pct.mp4").write_bytes(data[: len(data) // 10])
    (folder / "truncated_50pct.mp4").write_bytes(data[: len(data) // 2])
    (folder / "text_renamed.mp4").write_text("this is a text file, not a video\n" * 40)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(folder / "picture.png")
    shutil.move(folder / "picture.png", folder / "image_renamed.mkv")
    write_audio_only(folder / "audio_only.mkv")
    write_video(folder / "one_by_one.mkv", 1, 1, 8, codec="ffv1", pix_fmt="yuv444p")
    write_video(folder / "four_frames.mp4", 160, 96, 4, picture=lambda i: np.roll(
        np.kron(np.random.default_rng(7).integers(40, 255, (12, 20, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)),
        i * 8, axis=1))
    write_video(folder / "all_black.mp4", 160, 96, 16, picture=lambda i: np.zeros((96, 160, 3), np.uint8))
    write_video(folder / "tall_90x1600.mp4", 90, 1600, 8)
    for name in ("épisode ünïcode.mp4", "it's \"quoted\".mp4", "with spaces.mp4"):
        write_video(folder / name, 160, 96, 8, picture=lambda i, s=len(name): np.kron(
            np.random.default_rng(s * 100 + i).integers(40, 255, (12, 20, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)))
    (folder / "loop.mp4").symlink_to(folder / "loop.mp4")
    (folder / "dangling.mp4").symlink_to(folder / "gone.mp4")
    (folder / "x.mp4").mkdir()
    os.mkfifo(folder / "fifo.mp4")  # opening it would block until a writer comes
    (folder / "devzero.mp4").symlink_to("/dev/zero")
    shutil.copy(good, os.path.join(os.fsencode(folder), b"latin1_\xe9pisode.mp4"))  # a name that is not UTF-8
    write_cover_first(folder / "cover_first.mkv")
    write_video(folder / "phone_rotated.mp4", 160, 96, 16, rotation=90, picture=lambda i: np.kron(
        np.random.default_rng(300 + i).integers(40, 255, (12, 20, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)))
    return folder


EPISODE_CASES = [  # (case, episode id, outcome: 'quarantined' + reason words, or how the episode was read)
    ("zero-byte file", "zero_byte", "quarantined", "empty file"),
    ("truncated at 10 %", "truncated_10pct", "quarantined", ""),
    ("truncated at 50 %", "truncated_50pct", "quarantined", ""),
    ("text renamed .mp4", "text_renamed", "quarantined", ""),
    ("image renamed .mkv (FFmpeg reads a PNG as one frame)", "image_renamed", "read", ""),
    ("audio-only file", "audio_only", "quarantined", "no video stream"),
    ("symlink loop", "loop", "quarantined", "link"),
    ("dangling link", "dangling", "quarantined", "dangling"),
    ("a directory named x.mp4 (given by name)", "x", "quarantined", "a folder"),
    ("missing file (given by name, with others)", "missing", "quarantined", "no such file"),
    ("1x1 video", "one_by_one", "read", ""),
    ("4-frame video", "four_frames", "read", ""),
    ("all-black video", "all_black", "read", ""),
    ("90x1600 video", "tall_90x1600", "read", ""),
    ("unicode file name", "episode_unicode", "read", ""),
    ("quotes in the file name", "it_s_quoted", "read", ""),
    ("spaces in the file name", "with_spaces", "read", ""),
    ("a FIFO named fifo.mp4 (in the folder and given by name)", "fifo", "quarantined", "named pipe"),
    ("/dev/zero linked as devzero.mp4", "devzero", "quarantined", "character device"),
    ("file name that is not valid UTF-8", "latin1_pisode", "quarantined", "not valid UTF-8"),
    ("first video stream a 64x40 cover, then the episode", "cover_first", "read", ""),
    ("phone clip rotated 90 degrees (display matrix)", "phone_rotated", "read", ""),
]


def test_a_folder_of_broken_episodes_quarantines_each_and_the_rest_completes(tmp_path, bad_folder, cli_env):
    inputs = [str(bad_folder), str(bad_folder / "x.mp4"), str(bad_folder / "fifo.mp4"), str(bad_folder / "*.webm"),
              str(tmp_path / "missing.mp4"),
              os.path.relpath(bad_folder / "good.mp4", ROOT),  # the same file again, spelt another way
              str(bad_folder / ".." / bad_folder.name / "good.mp4")]
    out = run_cli(["run", *inputs, "--name", "corpus", "--until", "frames", "--runs-dir", str(tmp_path)], cli_env,
                  timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    episodes = {r["episode"]: r for r in pq.read_table(tmp_path / "corpus" / "frames" / "episodes.parquet").to_pylist()}
    assert episodes["good"]["status"] == "ok" and episodes["good"]["kept"] > 0
    assert sum(Path(r["video"]).name == "good.mp4" for r in episodes.values()) == 1  # decoded once
    CORPUS.append(("duplicate inputs (three spellings of one file)", "decoded once", "episode 'good' appears once"))
    [glob] = [r for r in episodes.values() if r["video"].endswith("*.webm")]
    assert glob["status"] == "quarantined" and "glob" in glob["reason"]
    CORPUS.append(("glob matching nothing (with other inputs)", "quarantined", glob["reason"]))
    wrong = []
    for case, episode, outcome, words in EPISODE_CASES:
        row = episodes[episode]
        if outcome == "quarantined":
            wrong += [] if row["status"] == "quarantined" and words in row["reason"] else [(case, row)]
            CORPUS.append((case, "quarantined", row["reason"]))
        else:
            wrong += [] if row["status"] in ("ok", "damaged") else [(case, row)]
            CORPUS.append((case, f"read ({row['status']}), {row['kept']} of {row['sampled']} frames kept", ""))
    assert not wrong, wrong
    assert episodes["all_black"]["kept"] == 0
    frames = pq.read_table(tmp_path / "corpus" / "frames" / "manifest.parquet").to_pylist()
    sizes = {(r["episode"], r["width"], r["height"]) for r in frames if r["kept"]}
    assert {s[1:] for s in sizes if s[0] == "cover_first"} == {(160, 96)}  # the episode, not its cover
    assert {s[1:] for s in sizes if s[0] == "phone_rotated"} == {(96, 160)}  # upright
    summary = RunStore(tmp_path, "corpus").marker("frames")["summary"]
    assert summary["quarantined"] == sum(e["status"] == "quarantined" for e in episodes.values())
    assert "matches no video file" in out.stderr  # the quarantined names are said up front too


def _bad_images(folder: Path, good: Path) -> dict[str, str]:
    write_corrupt_png(folder / "corrupt.png", good)
    (folder / "random_bytes.png").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    write_png_bomb(folder / "bomb_20000x20000.png")
    return {"corrupt PNG": "corrupt", "random-bytes PNG": "random_bytes", "20000x20000 decompression bomb": "bomb_20000x20000"}


@pytest.mark.parametrize("source", ["photos", "renders"])
def test_broken_images_are_quarantined_in_photos_and_renders(source, tmp_path, cli_env):
    from tests.source_fixtures import write_photos, write_sequence

    folder = tmp_path / source
    if source == "photos":
        good = write_photos(folder, 10)[0]
        (folder / "corrupt.txt").write_text("ohwx, a person")
        args = ["photos", str(folder), "--name", "ph", "--trigger", "ohwx", "--set", "ingest.min_images=3"]
        images = folder
    else:
        images = folder / "phase_1_essential"
        good = write_sequence(images, "KYANA_WATCH_ORBIT", 8)[0]
        args = ["renders", str(folder), "--name", "re", "--resolution", "64x64"]
    cases = _bad_images(images, good)
    out = run_cli([*args, "--until", "ingest", "--runs-dir", str(tmp_path / "runs")], cli_env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    store = RunStore(tmp_path / "runs", "ph" if source == "photos" else "re")
    rows = store.read_manifest("ingest").to_pylist()
    for case, stem in cases.items():
        [row] = [r for r in rows if stem in (r.get("source_file") or r.get("item_id") or r.get("image") or "")]
        reason = row["drop_reason"] or ""
        assert reason.startswith("quarantine: "), (case, row)
        CORPUS.append((f"{case} in {source}", "quarantined", reason))
    assert any(r["kept"] for r in rows)


def test_a_full_disk_stops_the_run_naming_the_cause(tmp_path, cli_env):
    folder = tmp_path / "small"
    with small_disk(folder) as kind:
        env = dict(cli_env)
        args = ["run", EP1, "--name", "full", "--until", "frames", "--runs-dir", str(folder)]
        if kind == "rlimit":  # no mount: each file the run writes may hold at most 32 KiB
            import resource

            out = run_cli(args, env, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10)))
        else:
            out = run_cli(args, env, timeout=600)
    message = out.stderr.strip()
    CORPUS.append((f"full disk ({kind})", f"stopped (exit {out.returncode})", " ".join(message.splitlines()[-2:])))
    assert out.returncode == 1 and "Traceback" not in message
    assert ("disk holding" in message and "is full" in message) if kind == "tmpfs" else "could not write" in message
    assert "resume full" in message


# ---- run records, locks, damaged manifests ------------------------------------------------------

def test_a_run_being_written_is_refused_before_anything_starts(tmp_path):
    from episode2lora.cli import app
    from flows.params import RunParams

    store = RunStore(tmp_path, "busy")
    store.record_run({"inputs": [EP1], "params": RunParams().model_dump(mode="json"), "until": "frames"})
    with store.lock():  # stands for a first `resume` still running
        before = snapshot(tmp_path)
        result = CliRunner().invoke(app, ["resume", "busy", "--runs-dir", str(tmp_path)])
        assert snapshot(tmp_path) == before
    message = result.output.strip()
    CORPUS.append(("second resume while the first runs", f"refused (exit {result.exit_code})", message))
    assert result.exit_code == 2 and "being written by pid" in message and "Traceback" not in message
    assert len(message.splitlines()) == 1


def test_a_broken_marker_is_named_by_status_and_its_stage_counts_as_not_done(tmp_path):
    from episode2lora.cli import app

    store = RunStore(tmp_path, "marked")
    store.write_run_record({"inputs": [EP1], "params": {}, "until": "frames"})
    (store.root / "frames").mkdir()
    (store.root / "frames" / "manifest.parquet").write_bytes(b"stands for finished work")
    (store.root / "frames" / "_DONE.json").write_text("[1]")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["status", "marked", "--runs-dir", str(tmp_path)])
    [line] = [line.strip() for line in result.output.splitlines() if line.strip().startswith("broken")]
    CORPUS.append(("_DONE.json holding [1]", f"named by status (exit {result.exit_code})", line))
    assert result.exit_code == 0 and result.exception is None and "frames/_DONE.json" in line
    assert not store.is_done("frames") and snapshot(tmp_path) == before


def test_bit_rot_in_a_manifest_part_is_found_on_first_read_and_by_status_verify(tmp_path):
    import pyarrow as pa

    from episode2lora.cli import app
    from tasks.run.store import ManifestDamagedError

    store = RunStore(tmp_path, "rot")
    store.write_run_record({"inputs": [], "params": {}, "until": "embed"})
    store.begin_stage("embed", {})
    store.commit_parts("embed", {"ep": pa.table({"item_id": [f"ep:{i:04d}" for i in range(200)],
                                                 "path": [f"segment/x/{i}.png" for i in range(200)]})}, "fp")
    part = store.manifest_path("embed") / "ep.parquet"
    st, data = part.stat(), bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit; size and mtime restored
    part.write_bytes(bytes(data))
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.is_done("embed")  # the cheap done check trusts an unchanged size and mtime
    with pytest.raises(ManifestDamagedError, match="ep.parquet"):
        store.read_manifest("embed")
    result = CliRunner().invoke(app, ["status", "rot", "--verify", "--runs-dir", str(tmp_path)])
    [line] = [line.strip() for line in result.output.splitlines() if line.strip().startswith("damaged")]
    CORPUS.append(("bit rot in a manifest part (size and mtime restored)", f"status --verify (exit {result.exit_code})",
                   line))
    assert result.exit_code == 1 and "embed/manifest.parquet/ep.parquet" in line
    assert "clean rot --stage embed" in result.output and "Traceback" not in result.output


# ---- episodes that change, collide or fill the disk -----------------------------------------------

def test_an_episode_still_growing_is_marked_changed_while_read(tmp_path):
    from tasks.frames import FRAMES, frames_for_episode
    from tasks.run.spec import SOURCES, sources_result
    from tasks.run.stage import start_sharded
    from tests.stages import run_params

    video = write_video(tmp_path / "growing.mp4", 160, 96, 16)
    store = RunStore(tmp_path / "runs", "grow")
    params, inputs = run_params(), {SOURCES: sources_result([str(video)])}
    plan = FRAMES.planned(store, params, inputs)
    start_sharded(store, "frames", plan)
    with open(video, "ab") as fh:  # a download still in progress
        fh.write(b"\0" * 4096)
    report = frames_for_episode(store, plan.shards[0], params, plan).summary
    CORPUS.append(("episode file still growing during the run", report["status"], report["reason"]))
    assert report["status"] == "damaged" and report["reason"].startswith("changed while read")
    assert FRAMES.planned(store, params, inputs).shards[0].fingerprint != plan.shards[0].fingerprint


def test_an_added_episode_with_the_same_file_name_leaves_existing_ids_alone(tmp_path):
    from tasks.frames import FRAMES, frames_for_episode
    from tasks.run.spec import SOURCES, sources_result
    from tasks.run.stage import start_sharded
    from tests.stages import run_params, run_plain

    params = run_params()
    existing = write_video((tmp_path / "z").mkdir() or tmp_path / "z" / "ep.mp4", 160, 96, 16)
    added = write_video((tmp_path / "a").mkdir() or tmp_path / "a" / "ep.mp4", 160, 96, 8)  # sorts first
    store = RunStore(tmp_path / "runs", "show")
    run_plain(store, "frames", sources=[str(existing)], params=params)
    plan = FRAMES.planned(store, params, {SOURCES: sources_result([str(existing), str(added)])})
    start_sharded(store, "frames", plan)
    ids = {shard.key: Path(shard.payload["video"]).parent.name for shard in plan.shards}
    recomputed = {shard.key: frames_for_episode(store, shard, params, plan).recomputed for shard in plan.shards}
    CORPUS.append(("added episode whose file stem equals an existing one's", "existing id kept",
                   f"ids {ids}, recomputed {recomputed}"))
    assert ids == {"ep": "z", "ep-2": "a"} and recomputed == {"ep": False, "ep-2": True}


def test_a_failed_whole_run_stage_leaves_no_temporaries(tmp_path):
    import errno

    from pydantic import BaseModel

    from tasks.run.spec import GlobalStage, run_stage

    class Toy(BaseModel):
        size: int = 1

    class ToyRun(BaseModel):
        package: Toy = Toy()

    def build(folder: Path):  # as package writes .train-<character> before the disk fills
        (folder / ".train-kyana").mkdir()
        (folder / ".train-kyana" / "0001.png").write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    toy = GlobalStage(name="package", version=1, params=Toy, build=lambda store, params, inputs, folder: build(folder))
    store = RunStore(tmp_path, "full")
    with pytest.raises(OSError, match="No space left"):
        run_stage(toy, store, ToyRun(), {})
    left = sorted(p.name for p in store.stage_dir("package").iterdir())
    CORPUS.append(("disk full while package writes .train-<character>", "stopped, temporaries removed",
                   f"left in package/: {left}"))
    assert not [name for name in left if name.startswith(".")]


# ---- webhooks and archived runs ---------------------------------------------------------------------

def test_a_webhook_redirect_to_another_host_is_not_followed():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from flows.notify import post_json

    reached: list[str] = []

    class Other(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            reached.append(self.path)
            self.send_response(204)
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args) -> None:
            pass

    class Redirect(Other):
        def do_POST(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{other.server_address[1]}/stolen")
            self.end_headers()

    other, allowed = ThreadingHTTPServer(("127.0.0.1", 0), Other), ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (other, allowed):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Exception, match="redirect to another host not followed") as caught:
            post_json(f"http://127.0.0.1:{allowed.server_address[1]}/hook?token=s3cret", {"run": "x"})
    finally:
        for server in (other, allowed):
            server.shutdown()
            server.server_close()
    CORPUS.append(("webhook answered by a 302 to another host", "not followed", str(caught.value)))
    assert reached == []


def test_webhook_urls_are_logged_without_their_secrets(caplog):
    from types import SimpleNamespace

    from flows.notify import notify, redact
    from tests.live_prefect import WebhookReceiver

    with WebhookReceiver() as receiver:
        url = f"{receiver.url}?token=s3cret&channel=ops"
        run = SimpleNamespace(parameters={"webhook_url": url}, id="1")
        with caplog.at_level("INFO", logger="episode2lora.notify"):
            notify(run, SimpleNamespace(message=None), "completed", lambda *args: {"run": "x"})
    logged = " ".join(record.getMessage() for record in caplog.records)
    CORPUS.append(("webhook URL with a token in its query", "logged redacted", logged))
    assert receiver.payloads == [{"run": "x"}] and "s3cret" not in logged and "token=***" in logged
    assert redact("https://u:pw@hooks.slack.com/services/T0/B0/abcdefghijklmnopqrstuvwx") == \
        "https://***@hooks.slack.com/services/T0/B0/***"


def test_a_run_restored_from_a_tar_archive_keeps_its_embed_fingerprints(tmp_path):
    import json
    import tarfile

    from tasks.embed import _layer_identity

    run = tmp_path / "run"
    layers = run / "segment" / "shards" / "ep" / "layers"
    layers.mkdir(parents=True)
    rows = []
    for i in range(3):
        (layers / f"{i}.png").write_bytes(bytes([i]) * (100 + i))
        os.utime(layers / f"{i}.png", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789 + i))
        rows.append({"item_id": f"ep:{i}", "path": f"segment/shards/ep/layers/{i}.png"})
    (layers.parent / "_DONE.json").write_text(json.dumps({"fingerprint": "segment-shard-fp", "files": 4}))
    with tarfile.open(tmp_path / "run.tar", "w", format=tarfile.GNU_FORMAT) as tar:  # whole-second mtimes
        tar.add(run, arcname="run")
    with tarfile.open(tmp_path / "run.tar") as tar:
        tar.extractall(tmp_path / "restored", filter="tar")
    restored = tmp_path / "restored" / "run"
    assert (restored / rows[0]["path"]).stat().st_mtime_ns != (run / rows[0]["path"]).stat().st_mtime_ns
    same = _layer_identity(restored, rows) == _layer_identity(run, rows)
    CORPUS.append(("run restored from a tar archive (mtimes rounded to seconds)", "embed fingerprint kept" if same
                   else "embed fingerprint changed", ""))
    assert same
    (restored / "segment" / "shards" / "ep" / "_DONE.json").write_text(json.dumps({"fingerprint": "re-segmented"}))
    assert _layer_identity(restored, rows) != _layer_identity(run, rows)


def test_a_relative_detector_is_stored_absolute_and_ctrl_c_ends_in_one_line(tmp_path, monkeypatch, capsys):
    import typer

    from episode2lora.common import run_and_report
    from episode2lora.run_commands import absolute_paths
    from flows.params import RunParams

    (tmp_path / "det.onnx").write_bytes(b"stands for a detector")
    monkeypatch.chdir(tmp_path)
    params = absolute_paths(RunParams.model_validate({"segment": {"detector": "det.onnx"}}))
    CORPUS.append(("segment.detector given as a relative path", "stored absolute", params.segment.detector))
    assert params.segment.detector == str(tmp_path / "det.onnx")

    def interrupted() -> dict:
        raise KeyboardInterrupt

    from tasks.run.progress import STOP

    try:
        with pytest.raises(typer.Exit) as stopped:
            run_and_report(RunStore(tmp_path, "ctrl-c"), tmp_path, interrupted)
        assert STOP.is_set()  # work still running in other threads stops at its next step
    finally:
        STOP.clear()  # this process goes on (the CLI's exits)
    message = capsys.readouterr().err.strip()
    CORPUS.append(("KeyboardInterrupt while the flow runs (CLI process)", f"stopped (exit {stopped.value.exit_code})", message))
    assert stopped.value.exit_code == 130 and "resume ctrl-c" in message and len(message.splitlines()) == 1


def _drain(fd: int, into: bytearray) -> None:
    """Read a pty until its other side is closed (a full pty would block the process writing to it)."""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        into.extend(chunk)


def test_ctrl_c_in_a_terminal_stops_in_seconds_and_resume_completes(tmp_path, cli_env):
    import fcntl
    import subprocess
    import sys
    import termios
    import threading
    import time

    episodes = tmp_path / "long"
    for seed in range(2):
        write_video(episodes.mkdir(exist_ok=True) or episodes / f"ep{seed}.mp4", 320, 192, 240, fps=24,
                    picture=lambda i, s=seed: np.kron(np.random.default_rng(1000 * s + i).integers(
                        40, 255, (24, 40, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)))
    args = ["run", str(episodes), "--name", "cc", "--until", "segment", "--set", "frames.mode=interval",
            "--set", "frames.interval_s=0.4", "--set", "segment.shard_size=4"]
    own_server = {k: v for k, v in cli_env.items() if k != "PREFECT_API_URL"}  # the run starts its own API server
    own_server["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    # In a pseudo-terminal, as a person runs it: the CLI leads its own session with the pty as its
    # controlling terminal, and Ctrl-C is the byte the terminal turns into SIGINT for its whole
    # foreground process group (the CLI, its API server, anything else it started).
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "episode2lora", *args, "--runs-dir", str(tmp_path / "runs")],
                            env={**own_server, "TERM": "xterm", "COLUMNS": "400"}, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    screen = bytearray()
    reader = threading.Thread(target=_drain, args=(master, screen), daemon=True)
    reader.start()
    shards, deadline = tmp_path / "runs" / "cc" / "segment" / "shards", time.monotonic() + 300
    while time.monotonic() < deadline and not (shards.is_dir() and any(shards.iterdir())) and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    os.write(master, b"\x03")  # Ctrl-C
    sent = time.monotonic()
    proc.wait(timeout=120)
    took = time.monotonic() - sent
    reader.join(timeout=10)
    os.close(master)
    message = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace")).replace("\r", "\n")
    lines = [line.replace("^C", "").strip() for line in message.splitlines()]  # the terminal echoes ^C
    errors = [line for line in lines if line.startswith("error:")]
    CORPUS.append(("Ctrl-C in a terminal during segment",
                   f"stopped in {took:.0f} s (exit {proc.returncode})", " ".join(errors)))
    assert proc.returncode == 130 and took < 60, (took, message[-3000:])
    assert len(errors) == 1 and errors[0].startswith("error: run 'cc' interrupted") and "resume cc" in errors[0], \
        message[-3000:]
    assert not any(words in message for words in ("Connection refused", "Error logging to API", "Traceback",
                                                  "Crash detected")), message[-3000:]
    resumed = run_cli(["resume", "cc", "--runs-dir", str(tmp_path / "runs")], cli_env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    clean = run_cli([*args, "--runs-dir", str(tmp_path / "clean")], cli_env, timeout=600)
    assert clean.returncode == 0, clean.stderr
    interrupted, uninterrupted = RunStore(tmp_path / "runs", "cc"), RunStore(tmp_path / "clean", "cc")
    for stage in ("frames", "segment"):
        assert interrupted.read_manifest(stage).equals(uninterrupted.read_manifest(stage)), stage
