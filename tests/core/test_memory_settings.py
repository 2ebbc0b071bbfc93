"""A trained role's memory settings in plan files: defaults, round trip, refusals."""

import copy

import pytest

from hybridflow.memory import DEFAULT, MemorySettings, MemorySettingsError
from hybridflow.plan import Plan
from hybridflow.planner.search import plan_job
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.predict import predict_plan


@pytest.fixture(scope="module")
def plan_dict() -> dict:
    job = Job.create("ppo", "llama-2-7b", 512, 512, 64, mini_batches=2)
    return plan_job(Cluster.from_gpus("a100-80gb", 16), job)[0].to_dict()


def test_every_trained_role_gets_its_settings(plan_dict):
    plan = Plan.from_dict(plan_dict)
    for s in plan.sets:
        for role in s.models:
            if role in ("actor", "critic"):
                assert s.memory[role].micro_batch_tokens == 1024  # one sequence, filled in
            else:
                assert role not in s.memory
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_a_plan_without_settings_gets_verls_defaults(plan_dict):
    old = copy.deepcopy(plan_dict)
    for s in old["sets"]:
        s.pop("memory", None)
    plan = Plan.from_dict(old)
    for s in plan.sets:
        for mem in s.memory.values():
            assert mem == DEFAULT.resolved(1024)
            assert mem.distributed_optimizer and mem.recompute == "none" and not mem.offload
    assert predict_plan(plan).iteration_s > 0


def test_settings_change_the_prediction(plan_dict):
    d = copy.deepcopy(plan_dict)
    d.pop("predicted")
    base = predict_plan(Plan.from_dict(d))
    for s in d["sets"]:
        if "actor" in s["models"]:
            s["memory"]["actor"]["recompute"] = "full"
    full = predict_plan(Plan.from_dict(d))
    assert full.stages["train"] > base.stages["train"]
    assert "recompute" in full.to_dict()["terms"]["actor"]["train"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"recompute": "some"}, "recompute must be one of none, selective, full"),
        ({"offload": "yes"}, "offload must be true or false"),
        ({"fsdp": None}, "fsdp must be true or false"),
        ({"distributed_optimizer": 1}, "distributed_optimizer must be true or false"),
        ({"micro_batch_tokens": 0}, "micro_batch_tokens must be a positive integer"),
        ({"micro_batch_tokens": 2.5}, "micro_batch_tokens must be a positive integer"),
        ({"micro_batch_tokens": 100}, "cannot hold one sequence"),
        ({"zero": 3}, "keys among"),
    ],
)
def test_impossible_settings_are_refused(plan_dict, bad, match):
    d = copy.deepcopy(plan_dict)
    s = next(s for s in d["sets"] if "actor" in s["models"])
    s["memory"]["actor"].update(bad)
    if "zero" in bad:
        s["memory"]["actor"] = bad
    with pytest.raises(MemorySettingsError, match=match):
        Plan.from_dict(d)


def test_settings_only_for_trained_roles(plan_dict):
    d = copy.deepcopy(plan_dict)
    s = d["sets"][0]
    s.setdefault("memory", {})[s["models"][-1] if "reference" in s["models"] else "x"] = {}
    with pytest.raises(ValueError, match="trained roles only|memory"):
        Plan.from_dict(d)


def test_str_names_what_is_on():
    assert str(MemorySettings(recompute="full", offload=True)) == "distopt recompute=full offload"
    assert str(MemorySettings(fsdp=True)) == "fsdp"
