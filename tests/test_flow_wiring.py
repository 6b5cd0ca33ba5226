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
