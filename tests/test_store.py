"""Run store: fingerprints, atomic shards, stage markers, the run lock, names as paths."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from tasks.pipelines import STAGES
from tasks.run.store import RunLockedError, RunNameError, RunStore, StageNotDoneError, fingerprint, safe_name


def test_fingerprint_changes_only_with_params_inputs_or_version():
    base = fingerprint("frames", 1, {"mode": "scene", "k": 3}, {"ep1": "abc"})
    assert fingerprint("frames", 1, {"k": 3, "mode": "scene"}, {"ep1": "abc"}) == base  # order-free
    assert fingerprint("frames", 1, {"mode": "interval", "k": 3}, {"ep1": "abc"}) != base
    assert fingerprint("frames", 1, {"mode": "scene", "k": 3}, {"ep1": "abd"}) != base
    assert fingerprint("frames", 2, {"mode": "scene", "k": 3}, {"ep1": "abc"}) != base
    assert fingerprint("segment", 1, {"mode": "scene", "k": 3}, {"ep1": "abc"}) != base


def test_committed_stage_is_done_until_its_files_go(tmp_path):
    store = RunStore(tmp_path, "r")
    table = pa.table({"item_id": ["a", "b"]})
    store.begin_stage("frames", {"x": 1})
    assert not store.is_done("frames")
    (store.stage_dir("frames") / "extra.txt").write_text("x")
    store.commit_stage("frames", table, "fp1", outputs=["frames/extra.txt"])
    assert store.is_done("frames", "fp1") and not store.is_done("frames", "fp2")
    assert store.read_manifest("frames").equals(table)
    (store.stage_dir("frames") / "extra.txt").unlink()
    assert not store.is_done("frames", "fp1")
    with pytest.raises(StageNotDoneError, match="frames"):
        store.read_manifest("frames")


def test_tampered_manifest_is_not_trusted(tmp_path):
    store = RunStore(tmp_path, "r")
    store.begin_stage("frames", {})
    store.commit_stage("frames", pa.table({"item_id": ["a"]}), "fp")
    RunStore(tmp_path, "r").manifest_path("frames").write_bytes(b"not parquet")
    assert not store.is_done("frames", "fp")


def test_failed_shard_leaves_previous_shard_and_no_temporaries(tmp_path):
    store = RunStore(tmp_path, "r")
    with store.writing_shard("frames", "ep1", "fp1") as tmp:
        (tmp / "rows.parquet").write_bytes(b"one")
    assert store.shard_done("frames", "ep1", "fp1")
    (store.shard_dir("frames", "ep1") / "rows.parquet").unlink()
    assert not store.shard_done("frames", "ep1", "fp1")
    with store.writing_shard("frames", "ep1", "fp1") as tmp:
        (tmp / "rows.parquet").write_bytes(b"one")
    with pytest.raises(RuntimeError):
        with store.writing_shard("frames", "ep1", "fp2") as tmp:
            (tmp / "rows.parquet").write_bytes(b"two")
            raise RuntimeError("crash in the middle")
    assert store.shard_done("frames", "ep1", "fp1")
    assert not store.shard_done("frames", "ep1", "fp2")
    assert (store.shard_dir("frames", "ep1") / "rows.parquet").read_bytes() == b"one"
    assert [p.name for p in store.shard_dir("frames", "ep1").parent.iterdir()] == ["ep1"]


def test_clean_removes_stage_and_downstream(tmp_path):
    store = RunStore(tmp_path, "r")
    for stage in ("frames", "segment", "embed"):
        store.begin_stage(stage, {})
    assert store.clean("segment", STAGES) == ["segment", "embed"]
    assert store.stage_dir("frames").exists() and not store.stage_dir("segment").exists()
    with pytest.raises(KeyError, match="known stages"):
        store.clean("nonsense", STAGES)


def test_second_process_is_refused_with_a_clear_message(tmp_path):
    store = RunStore(tmp_path, "busy")
    script = textwrap.dedent(f"""
        from tasks.run.store import RunStore, RunLockedError
        try:
            with RunStore({str(tmp_path)!r}, "busy").lock():
                print("got the lock")
        except RunLockedError as exc:
            print("refused:", exc)
    """)
    with store.lock():
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        assert out.startswith("refused:") and "busy" in out and "pid" in out
        with pytest.raises(RunLockedError):  # also a second handle in the same process
            with RunStore(tmp_path, "busy").lock():
                pass
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "got the lock"


@pytest.mark.parametrize("hostile", ["../x", "../../etc/passwd", "a b/c", "ünïcödé 名前", "...", "", "CON"])
def test_hostile_text_becomes_a_safe_component_and_is_refused_as_a_run_name(tmp_path, hostile):
    name = safe_name(hostile)
    assert name and "/" not in name and "\\" not in name and name not in (".", "..")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()
    if hostile == "CON":  # inside the run-name alphabet: used as typed
        assert RunStore(tmp_path, hostile).root == tmp_path.resolve() / "CON"
    else:  # a run name is never rewritten: refused, saying the alphabet
        with pytest.raises(RunNameError, match="A-Z a-z 0-9"):
            RunStore(tmp_path, hostile)
