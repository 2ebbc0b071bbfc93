"""The iteration breakdown: each stage's wall time split into the critical worker group's
timed work, the controller's own and the rest (dispatch)."""

from __future__ import annotations

import pytest

from hybridflow.executor.engines import timers
from hybridflow.executor.rl.breakdown import breakdown


def test_the_slowest_group_is_the_stage_and_the_rest_is_dispatch() -> None:
    stages = {"generate": 1.0, "reshard": 0.2, "prepare": 2.0, "train": 3.0}
    actor = {
        "call:actor.generate": 1.1,
        "generate:actor.vllm": 0.8,
        "generate:actor.reshard": 0.2,
        "call:actor.response_outputs": 0.5,
        "compute:actor.forward": 0.4,
        "call:actor.update": 2.5,
        "compute:actor.forward_backward": 2.0,
        "compute:actor.optimizer": 0.3,
        "sync:actor.metrics": 0.1,
    }
    critic = {"call:critic.response_outputs": 1.5, "compute:critic.forward": 1.2}
    out = breakdown(stages, [actor, critic], {"controller:prepare.rules": 0.25})
    assert out["generate.vllm"] == 0.8 and out["generate.reshard"] == 0.2
    assert out["generate.worker"] == pytest.approx(0.1)
    assert out["generate.dispatch"] == pytest.approx(0.1)
    # the critic's group is the prepare stage's critical path
    assert out["prepare.compute"] == 1.2 and out["prepare.worker"] == pytest.approx(0.3)
    assert out["prepare.controller"] == 0.25
    assert out["prepare.dispatch"] == pytest.approx(0.25)
    assert out["train.compute"] == 2.0 and out["train.optimizer"] == 0.3
    assert out["train.metrics"] == 0.1 and out["train.worker"] == pytest.approx(0.1)
    assert out["train.dispatch"] == pytest.approx(0.5)
    assert sum(out.values()) == pytest.approx(sum(stages.values()))


def test_no_worker_time_is_all_dispatch() -> None:
    out = breakdown({"generate": 0.5, "prepare": 0.0, "train": 0.0}, [], {})
    assert out["generate.dispatch"] == 0.5 and out["generate.worker"] == 0.0


def test_timers_accumulate_and_clear() -> None:
    timers.take()
    with timers.timed("compute:x.forward"):
        pass
    timers.add("compute:x.forward", 1.0)
    got = timers.take()
    assert got["compute:x.forward"] >= 1.0 and timers.take() == {}
