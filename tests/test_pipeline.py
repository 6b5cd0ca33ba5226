"""The pipeline layer: a stage declared once (spec) runs the same as a plain call and through Prefect,
a table is sliced by `until`, inputs are handed by role, hooks run after the last of their stages."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import BaseModel

from tasks.run.runner import hook, run_pipeline, stages_between
from tasks.run.spec import GlobalStage, ShardedStage, run_stage, sources_result, step
from tasks.run.stage import Plan, RunRef, Shard, merge_shards, run_shard
from tasks.run.store import RunStore, fingerprint


class CountParams(BaseModel):
    factor: int = 2


class Params(BaseModel):
    numbers: CountParams = CountParams()
    total: CountParams = CountParams()


def _plan(store: RunStore, params: Params, inputs: dict) -> Plan:
    settings = params.numbers.model_dump()
    return Plan(shards=[Shard(key=f"n{v}", payload=int(v), fingerprint=fingerprint("numbers", 1, settings, {"v": v}))
                        for v in inputs["sources"].summary["paths"]])


def _shard(store: RunStore, shard: Shard, params: Params, plan: Plan):
    rows = pa.table({"item_id": [shard.key], "value": [shard.payload * params.numbers.factor]})
    return run_shard(store, "numbers", shard.key, shard.fingerprint, lambda out, prefix: (rows, {"n": 1}))


def _merge(store: RunStore, plan: Plan, params: Params):
    return merge_shards(store, "numbers", plan.fingerprint, {s.key: s.fingerprint for s in plan.shards},
                        lambda tables, reports: (pa.concat_tables(tables), {"kept": sum(t.num_rows for t in tables)}, []))


def _total(store: RunStore, params: Params, inputs: dict, folder):
    values = store.read_manifest(inputs["values"].stage).column("value").to_pylist()  # the stage handed to it
    return pa.table({"item_id": ["sum"], "value": [sum(values) * params.total.factor]}), {"kept": 1}, []


NUMBERS = ShardedStage(name="numbers", version=1, params=CountParams, inputs=("sources",),
                       plan=_plan, shard=_shard, merge=_merge)
TOTAL = GlobalStage(name="total", version=1, params=CountParams, inputs=("values",), build=_total)
HOOKED: list[str] = []
STEPS = [step(NUMBERS), step(TOTAL, values="numbers"),
         hook("note", lambda run, given: HOOKED.append(",".join(f"{role}={r.stage}" for role, r in given.items())),
              after=("numbers", "total"), inputs=("counted",), optional=("summed",), counted="numbers", summed="total")]


def test_a_spec_runs_as_a_plain_call(tmp_path):
    store = RunStore(tmp_path, "plain")
    numbers = run_stage(NUMBERS, store, Params(), {"sources": sources_result(["1", "2", "3"])})
    assert not (store.root / "numbers" / "plan.json").exists() or store.is_done("numbers")
    assert sorted(store.read_manifest("numbers").column("value").to_pylist()) == [2, 4, 6]
    total = TOTAL.run(store, Params(), {"values": numbers})
    assert store.read_manifest("total").column("value").to_pylist() == [24]
    assert not NUMBERS.run(store, Params(), {"sources": sources_result(["1", "2", "3"])}).recomputed
    assert not TOTAL.run(store, Params(), {"values": numbers}).recomputed and total.recomputed


def test_the_runner_slices_the_table_and_runs_hooks_after_their_last_stage(tmp_path, prefect_api):
    from prefect import flow

    run = RunRef(runs_dir=str(tmp_path), name="flow")

    @flow
    def numbers_flow(until: str) -> dict:
        return run_pipeline(run, Params(), STEPS, until, sources=["1", "2", "3"])

    HOOKED.clear()
    assert list(numbers_flow("numbers")) == ["numbers"] and HOOKED == ["counted=numbers"]  # the hook after `numbers`
    results = numbers_flow("total")
    assert list(results) == ["numbers", "total"] and not results["numbers"].recomputed
    assert HOOKED == ["counted=numbers", "counted=numbers,summed=total"]  # once, after `total`, handed both by role
    assert run.store().read_manifest("total").column("value").to_pylist() == [24]
    assert stages_between(STEPS, "total", after="numbers") == ["total"]


def test_a_step_names_its_input_roles_and_until_names_the_stages():
    with pytest.raises(KeyError, match="total has no input role frames; its roles: values"):
        step(TOTAL, frames="numbers")
    with pytest.raises(KeyError, match="note has no input role frames; its roles: counted, summed"):
        hook("note", print, after=("numbers",), inputs=("counted",), optional=("summed",), frames="numbers")
    optional = GlobalStage(name="total", version=1, params=CountParams, inputs=("values",), optional=("extra",), build=_total)
    results = {"numbers": sources_result(["1"]), "other": sources_result(["2"])}
    assert list(step(optional, values="numbers").inputs(results)) == ["values"]  # an unbound optional role: no input
    assert step(optional, values="numbers", extra="other").inputs(results)["extra"] is results["other"]
    with pytest.raises(ValueError, match="unknown stage 'nonsense'; this pipeline's stages are: numbers, total"):
        stages_between(STEPS, "nonsense")


def test_planning_writes_nothing_and_done_needs_every_shard(tmp_path):
    store = RunStore(tmp_path, "pure")
    sources = {"sources": sources_result(["1", "2"])}
    plan = NUMBERS.planned(store, Params(), sources)
    assert [s.key for s in plan.shards] == ["n1", "n2"] and plan.fingerprint and not store.root.exists()
    assert NUMBERS.done(store, Params(), sources) is None and not store.root.exists()
    run_stage(NUMBERS, store, Params(), sources)
    assert NUMBERS.done(store, Params(), sources).fingerprint == plan.fingerprint


def test_a_stage_is_fingerprinted_by_what_it_declares_it_reads(tmp_path, capsys):
    reading = GlobalStage(name="total", version=1, params=CountParams, inputs=("values",),
                          reads=("total", "numbers.factor"), build=_total)
    store = RunStore(tmp_path, "reads")
    numbers = run_stage(NUMBERS, store, Params(), {"sources": sources_result(["1"])})
    changed = Params(numbers=CountParams(factor=3))
    assert reading.fingerprint(Params(), {"values": numbers}) != reading.fingerprint(changed, {"values": numbers})
    assert TOTAL.fingerprint(Params(), {"values": numbers}) == TOTAL.fingerprint(changed, {"values": numbers})
    run_stage(TOTAL, store, Params(), {"values": numbers})
    capsys.readouterr()
    run_stage(reading, store, Params(), {"values": numbers})  # the same stage, now declaring a read of numbers.factor
    assert "total: recomputed, it now reads other parameters (numbers.factor, total)" in capsys.readouterr().err
    again = run_stage(reading, store, changed, {"values": numbers})
    assert again.recomputed and "total: recomputed, its settings changed (numbers.factor)" in capsys.readouterr().err


class TupleParams(BaseModel):
    factor: int = 2
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)


class TupleRunParams(BaseModel):
    numbers: CountParams = CountParams()
    total: TupleParams = TupleParams()


def test_a_new_version_is_not_reported_as_changed_settings_when_a_setting_is_a_tuple(tmp_path, capsys):
    """params.json holds tuples as lists: the same tuple must not read as a changed setting."""
    store = RunStore(tmp_path, "tuple")
    numbers = run_stage(NUMBERS, store, TupleRunParams(), {"sources": sources_result(["1"])})
    reads = ("total.factor", "total.mean")  # a declared read of one field gives its value as is: a tuple
    first = GlobalStage(name="total", version=1, params=TupleParams, inputs=("values",), reads=reads, build=_total)
    run_stage(first, store, TupleRunParams(), {"values": numbers})
    capsys.readouterr()
    newer = GlobalStage(name="total", version=2, params=TupleParams, inputs=("values",), reads=reads, build=_total)
    assert run_stage(newer, store, TupleRunParams(), {"values": numbers}).recomputed
    assert "total: recomputed, its inputs or its version changed" in capsys.readouterr().err
