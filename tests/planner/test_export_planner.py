"""Exports of plans the planner makes (not hand-written): every standard placement."""

from __future__ import annotations

import shlex

import pytest

from hybridflow.planner.export import ExportError, export
from hybridflow.planner.export_refdata import verl_accepts
from hybridflow.planner.search import plan_job, standard_placements
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job

JOB = Job.create("ppo", "llama-2-7b", 512, 512, 256, mini_batches=4)


@pytest.fixture(scope="module")
def plans() -> dict[str, dict]:
    cluster = Cluster.from_gpus("a100-80gb", 16, 8)
    found = {k: p.to_dict() for k, p in standard_placements(cluster, JOB).items()}
    found["best"] = plan_job(cluster, JOB)[0].to_dict()
    return found


def test_planner_plans_export_to_verl_keys(plans: dict[str, dict]) -> None:
    assert {"colocated", "split", "separate", "best"} <= set(plans)
    for name, plan in plans.items():
        exp = export(plan, "verl")
        keys = [a.split("=", 1)[0] for a in exp.args]
        assert all(verl_accepts(k) for k in keys), name  # "+" appends uneven pipelines
        values = dict(a.split("=", 1) for a in exp.args)
        actor_set = next(s for s in plan["sets"] if "actor" in s["models"])
        assert (
            int(values["trainer.nnodes"]) * int(values["trainer.n_gpus_per_node"])
            == actor_set["gpus"]
        )
        train = actor_set["layouts"]["actor"]["train"]
        assert values["actor_rollout_ref.actor.megatron.tensor_model_parallel_size"] == str(
            train["tp"]
        )
        # a pool mapping exactly when a role other than the reward model leaves the actor's set
        needs_mapping = any(
            s["models"] != ["reward"] for s in plan["sets"] if "actor" not in s["models"]
        )
        assert bool(exp.extra) == needs_mapping, name
        shlex.split(exp.render(), comments=True)  # well-formed shell words


def test_planner_plans_to_openrlhf(plans: dict[str, dict]) -> None:
    colocated = plans["colocated"]
    gen = colocated["sets"][0]["layouts"]["actor"]["generate"]
    if gen["pp"] == 1:
        assert "--train.colocate_all" in export(colocated, "openrlhf").args
    else:
        with pytest.raises(ExportError, match="pipeline parallelism"):
            export(colocated, "openrlhf")
    for name in ("split", "separate"):
        with pytest.raises(ExportError, match="colocate_all"):
            export(plans[name], "openrlhf")
