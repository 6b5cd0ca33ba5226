"""Flow wiring: a failed fan-out task fails the flow with its own error, not a later symptom."""

from __future__ import annotations

import pytest

from tasks.run.stage import settle
from tasks.run.store import reaches


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


def test_reaches_follows_the_stage_order():
    assert reaches("evaluate", "frames") and reaches("segment", "segment")
    assert not reaches("frames", "segment")
    with pytest.raises(ValueError):
        reaches("frames", "nonsense")
