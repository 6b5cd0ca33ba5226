"""The bad-input corpus: every hostile or clumsy input is either quarantined with its reason while the
rest completes, or refused up front with a one-line message naming it; never a traceback, never a
changed existing run. The test writes the corpus with its outcomes to test-artifacts/bad_inputs.md."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tasks.run.store import RunStore
from tests.bad_inputs import (read_only, small_disk, write_audio_only, write_corrupt_png, write_png_bomb,
                              write_video)
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
    return folder


def _configs(folder: Path) -> dict[str, Path]:
    texts = {"malformed": "frames: [mode: scene\n", "list": "- frames\n- segment\n", "stage": "framez:\n  mode: scene\n"}
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
]


@pytest.mark.parametrize("case, args, named", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_commands_are_refused_up_front_with_one_line(case, args, named, runs, tmp_path):
    from episode2lora.cli import app

    (tmp_path / "afile").write_text("not a folder")
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
    assert snapshot(runs) == before  # the existing run `ref` is untouched, no other run appears
    assert sorted(p.name for p in runs.iterdir()) == ["ref"]


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
]


def test_a_folder_of_broken_episodes_quarantines_each_and_the_rest_completes(tmp_path, bad_folder, cli_env):
    inputs = [str(bad_folder), str(bad_folder / "x.mp4"), str(bad_folder / "*.webm"), str(tmp_path / "missing.mp4"),
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
