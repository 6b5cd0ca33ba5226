"""Run store: fingerprints, atomic shards, stage markers, the run lock, names as paths."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
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


def _parted(tmp_path, keys="ab"):
    """A run whose `embed` manifest is in parts, each pointing at one layer file in its own folder."""
    store = RunStore(tmp_path, "r")
    tables = {}
    for k in keys:
        (store.root / "layers" / k).mkdir(parents=True, exist_ok=True)
        (store.root / "layers" / k / "0.png").write_bytes(b"png")
        tables[k] = pa.table({"item_id": [f"{k}:0", f"{k}:1"], "path": [f"layers/{k}/0.png", None]})
    store.begin_stage("embed", {})
    return store, tables


def test_a_manifest_in_parts_reads_as_one_and_grows_by_writing_only_the_new_part(tmp_path):
    import os

    store, tables = _parted(tmp_path, "abc")
    count = lambda table: {"rows": table.num_rows}  # noqa: E731
    digest, summary = store.commit_parts("embed", {"a": tables["a"], "b": tables["b"]}, "fp1", count=count)
    assert summary == {"rows": 4} and store.is_done("embed", "fp1")
    assert store.read_manifest("embed").column("item_id").to_pylist() == ["a:0", "a:1", "b:0", "b:1"]
    folder = store.manifest_path("embed")
    stamps = {p.name: os.stat(p).st_mtime_ns for p in folder.glob("*.parquet")}

    store.begin_stage("embed", {})
    grown, summary = store.commit_parts("embed", {"a": None, "b": None, "c": tables["c"]}, "fp2", count=count)
    assert grown != digest and summary == {"rows": 6} and store.is_done("embed", "fp2")
    assert all(os.stat(folder / name).st_mtime_ns == stamp for name, stamp in stamps.items())  # not rewritten
    assert store.read_items("embed", pa.array(["c:1", "a:0"]), ["path"]).column("item_id").to_pylist() == ["a:0", "c:1"]
    assert set(store.read_parts("embed", ["c"]).column("item_id").to_pylist()) == {"c:0", "c:1"}

    store.begin_stage("embed", {})
    store.commit_parts("embed", {"c": None}, "fp3")  # parts no longer named are removed
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["c.parquet"]
    with pytest.raises(KeyError, match="'zz' of stage 'embed' was never committed"):
        store.commit_parts("embed", {"zz": None}, "fp4")


def test_a_manifest_in_parts_is_not_done_when_a_part_or_a_file_it_names_changes(tmp_path):
    import shutil

    store, tables = _parted(tmp_path)
    store.commit_parts("embed", tables, "fp")
    (store.root / "layers" / "a" / "0.png").unlink()  # a file a part points at
    assert not store.is_done("embed", "fp")
    (store.root / "layers" / "a" / "0.png").write_bytes(b"png")
    assert store.is_done("embed", "fp")  # back in place: the slow path finds every file
    (store.manifest_path("embed") / "b.parquet").write_bytes(b"not parquet")
    assert not store.is_done("embed", "fp")
    store.commit_parts("embed", tables, "fp")
    (store.manifest_path("embed") / "stray.parquet").write_bytes(b"x")  # a reader of the folder would read it
    assert not store.is_done("embed", "fp")
    (store.manifest_path("embed") / "stray.parquet").unlink()
    rewritten = pa.table({"item_id": ["b:9"], "path": pa.array([None], pa.string())})
    pq.write_table(rewritten, store.manifest_path("embed") / "b.parquet")  # by an attempt killed before its commit
    store.commit_parts("embed", {"a": None, "b": None}, "fp")  # a kept part is indexed as it now is
    assert store.is_done("embed", "fp") and store.read_manifest("embed").column("item_id").to_pylist()[-1] == "b:9"
    copied = tmp_path / "copy"
    shutil.copytree(tmp_path / "r", copied / "r", copy_function=shutil.copy)  # new mtimes: checked by content
    assert RunStore(copied, "r").is_done("embed", "fp")


def test_shard_rows_become_parts_by_link_and_a_redone_shard_is_linked_again(tmp_path):
    import os

    from tasks.run.stage import merge_shard_parts, run_shard

    store = RunStore(tmp_path, "r")
    schema = pa.schema([("item_id", pa.string())])
    summarize = lambda totals, reports: {"shards": len(reports)}  # noqa: E731
    for key, fp in (("ep1", "s1"), ("ep2", "s2")):
        run_shard(store, "segment", key, fp, lambda out, prefix, key=key: (pa.table({"item_id": [key]}, schema=schema), {}))
    store.begin_stage("segment", {})
    merge_shard_parts(store, "segment", "fp", {"ep1": "s1", "ep2": "s2"}, schema, summarize)
    part = store.manifest_path("segment") / "ep1.parquet"
    assert os.stat(part).st_ino == os.stat(store.shard_dir("segment", "ep1") / "rows.parquet").st_ino
    run_shard(store, "segment", "ep1", "s1b", lambda out, prefix: (pa.table({"item_id": ["ep1-again"]}, schema=schema), {}))
    store.begin_stage("segment", {})
    merge_shard_parts(store, "segment", "fp2", {"ep1": "s1b", "ep2": "s2"}, schema, summarize)
    assert store.read_manifest("segment").column("item_id").to_pylist() == ["ep1-again", "ep2"]
    store.begin_stage("segment", {})
    result = merge_shard_parts(store, "segment", "fp3", {}, schema, summarize)  # no shards: one empty part
    assert result.summary == {"shards": 0} and store.read_manifest("segment").num_rows == 0
