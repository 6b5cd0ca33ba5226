"""Flow wiring: a failed fan-out task fails the flow with its own error, not a later symptom."""

from __future__ import annotations

import pytest

from tasks.run.stage import settle
from tasks.pipelines import PIPELINES
from tasks.run.runner import stages_between


def test_a_failed_shard_fails_the_flow_with_its_own_error(prefect_api):
    from prefect import flow, task

    @task
    def shard(n: int) -> int:
        if n == 1:
            raise ValueError("shard 1 is broken")
        return n

    @flow
    def fan_out() -> list[int]:
        return settle([shard.submit(n) for n in range(3)])

    with pytest.raises(ValueError, match="shard 1 is broken"):
        fan_out()


def test_until_slices_the_pipeline_in_stage_order():
    steps = PIPELINES["episode"]
    assert "frames" in stages_between(steps, "evaluate") and "segment" in stages_between(steps, "segment")
    assert "segment" not in stages_between(steps, "frames")
    assert stages_between(steps, "caption", after="select") == ["augment", "caption"]
    with pytest.raises(ValueError, match="unknown stage 'nonsense'"):
        stages_between(steps, "nonsense")


def test_what_a_person_sets_on_every_run_comes_first_in_the_form_and_means_what_set_means():
    from prefect.utilities.callables import parameter_schema

    from flows.episode_to_lora import episode_to_lora
    from flows.params import RunParams
    from flows.pipeline_flow import with_training
    from flows.source_to_lora import source_to_lora

    for flow, first in ((episode_to_lora, ["inputs", "name", "until", "profile", "base"]),
                        (source_to_lora, ["source", "input_dir", "name", "trigger", "until", "profile", "base"])):
        schema = parameter_schema(flow.fn).model_dump_for_openapi()["properties"]
        assert sorted(schema, key=lambda k: schema[k]["position"])[:len(first)] == first
        assert all(schema[k].get("description") for k in schema), [k for k in schema if not schema[k].get("description")]
    params = RunParams()
    assert with_training(params, "", "") is params
    chosen = with_training(params, "final", "tiny-flux")
    assert (chosen.train.profile, chosen.train.base) == ("final", "tiny-flux")
    assert chosen.model_dump(exclude={"train"}) == params.model_dump(exclude={"train"})
    with pytest.raises(ValueError, match="profile"):
        with_training(params, "fastest", "")
