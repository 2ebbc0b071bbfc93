"""Rule-based rewards and costs: a function on the controller's CPU, no GPUs, no memory."""

import json

import pytest

from hybridflow.cli.main import main
from hybridflow.plan import Plan, PlanError
from hybridflow.planner.search import plan_job, standard_placements
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import RULE_CPU_S, Job, JobError
from hybridflow.simulator.predict import predict_plan
from tests.conftest import A100_24GIB
from tests.planner.brute import brute_force_best

SMALL = A100_24GIB


def test_rule_roles_have_no_model():
    job = Job.create("grpo", "qwen2.5-3b", 256, 256, 8, n_samples=4, reward="rule")
    assert job.gpu_roles == ("actor", "reference") and job.rule_roles == ("reward",)
    assert job.params("reward") == 0
    assert [w.kind for w in job.works("reward")] == ["rule"]
    with pytest.raises(JobError, match="is a rule"):
        job.spec("reward")
    with pytest.raises(JobError, match="cannot be a rule"):
        Job.create("ppo", "tiny", 64, 64, 8, critic="rule")
    with pytest.raises(JobError, match="rule_cpu_s"):
        Job.create("grpo", "tiny", 64, 64, 8, reward="rule", rule_cpu_s=-1.0)
    safe = Job.create("safe-rlhf", "tiny", 64, 64, 8, reward="rule", cost="rule")
    assert safe.gpu_roles == ("actor", "critic", "reference", "cost_critic")


def test_a_rule_reward_costs_no_gpus():
    cluster = Cluster.from_gpus("a100-80gb", 8)
    model = Job.create("grpo", "qwen2.5-3b", 256, 256, 8, n_samples=4)
    rule = Job.create(
        "grpo", "qwen2.5-3b", 256, 256, 8, n_samples=4, reward="rule", rule_cpu_s=0.01
    )
    best = plan_job(cluster, rule, SMALL)[0]
    placed = [r for s in best.sets for r in s.models]
    assert sorted(placed) == ["actor", "reference"]
    pred = best.predicted
    assert pred["peak_memory_gib"]["reward"] == 0.0
    assert pred["terms"]["reward"] == {"prepare": {"rule_cpu": pytest.approx(32 * 0.01)}}
    assert pred["stages"]["prepare"] >= 32 * 0.01
    # the same job with a reward model needs its memory and time somewhere
    with_model = plan_job(cluster, model, SMALL)[0]
    assert with_model.predicted["iteration_s"] >= pred["iteration_s"] - 0.32 - 1e-9
    assert "reward" in [r for s in with_model.sets for r in s.models]


def test_rule_time_joins_the_prepare_stage_as_a_set_would():
    # a slow rule dominates prepare; CP-SAT's choice still equals brute force
    job = Job.create("grpo", "qwen2.5-3b", 256, 256, 8, n_samples=4, reward="rule", rule_cpu_s=0.5)
    cluster = Cluster.from_gpus("a100-80gb", 8)
    best = plan_job(cluster, job, SMALL)[0]
    exhaustive = brute_force_best(cluster, job, SMALL)
    assert best.predicted["iteration_s"] == pytest.approx(exhaustive[0], rel=1e-6)
    assert best.predicted["stages"]["prepare"] == pytest.approx(32 * 0.5)
    again = predict_plan(best, SMALL)
    assert again.iteration_s == pytest.approx(best.predicted["iteration_s"])
    assert set(standard_placements(cluster, job, SMALL)) == {"colocated", "split", "separate"}


def test_plan_json_with_a_rule(tmp_path):
    job = Job.create("safe-rlhf", "tiny", 64, 64, 8, reward="rule", cost="rule", rule_cpu_s=0.002)
    plan = plan_job(Cluster("local-cpu", 1, 4), job)[0]
    d = plan.to_dict()
    assert d["job"]["models"]["reward"] == "rule" and d["job"]["rule_cpu_s"] == 0.002
    assert Plan.from_dict(json.loads(json.dumps(d))).to_dict() == d
    d["sets"][0]["models"].append("reward")
    d["sets"][0]["layouts"]["reward"] = {"infer": {"pp": 1, "tp": 1, "dp": d["sets"][0]["gpus"]}}
    with pytest.raises(PlanError, match="reward is a rule"):
        Plan.from_dict(d)
    assert (
        Job.create("grpo", "tiny", 64, 64, 8, reward="rule").to_dict()["models"]["reward"] == "rule"
        and "rule_cpu_s" not in Job.create("grpo", "tiny", 64, 64, 8, reward="rule").to_dict()
    )
    assert RULE_CPU_S > 0


def test_cli_reward_rule(capsys, tmp_path):
    tiny = [
        "--gpu",
        "local-cpu",
        "--gpus",
        "4",
        "--model",
        "tiny",
        "--prompt-len",
        "64",
        "--response-len",
        "64",
        "--batch",
        "8",
        "--mini-batches",
        "2",
    ]
    path = tmp_path / "plan.json"
    assert main(["plan", *tiny, "--algorithm", "grpo", "--reward", "rule", "--out", str(path)]) == 0
    assert (
        "reward"
        not in capsys.readouterr()
        .out.split("Standard placements")[0]
        .split("Best plan")[1]
        .split("stages")[0]
    )
    assert main(["simulate", str(path)]) == 0
    assert "rule_cpu" in capsys.readouterr().out
    assert main(["plan", *tiny, "--critic", "rule"]) == 2
    err = capsys.readouterr().err
    assert "cannot be a rule" in err and "Traceback" not in err
