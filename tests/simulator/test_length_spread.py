"""Response-length spread: generation follows each wave's longest response (stragglers),
training and inference follow the tokens really produced."""

import json

import pytest

from hybridflow.cli.main import main
from hybridflow.layout import GenLayout, ParallelLayout
from hybridflow.plan import PlacedSet, Plan
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.generation import decode_steps, gen_shape, generation_cost
from hybridflow.simulator.job import Job, JobError
from hybridflow.simulator.lengths import LengthError
from hybridflow.simulator.predict import predict_plan
from hybridflow.simulator.profile import load_profile

A100 = load_profile("a100-80gb")
HBM = A100.hbm_bandwidth * A100.eff_memory
SETS = (
    PlacedSet(
        ("actor", "reference", "reward"),
        8,
        {
            "actor": {"train": ParallelLayout(1, 2, 4), "generate": GenLayout(1, 1, 2)},
            "reference": {"infer": ParallelLayout(1, 1, 8)},
            "reward": {"infer": ParallelLayout(1, 1, 8)},
        },
    ),
)


def _plan(job):
    return Plan(Cluster("a100-80gb", 1, 8), job, SETS)


def test_wide_spread_generates_longer_than_the_same_mean():
    fixed = Job.create("grpo", "qwen2.5-1.5b", 512, 1024, 64, n_samples=4)
    spread = Job.create("grpo", "qwen2.5-1.5b", 512, 16384, 64, n_samples=4, response_mean=1024)
    a, b = predict_plan(_plan(fixed), A100), predict_plan(_plan(spread), A100)
    assert b.stages["generate"] > 2 * a.stages["generate"]
    # training and scoring follow the tokens produced: the same mean, the same seconds
    assert b.stages["train"] == pytest.approx(a.stages["train"])
    assert b.stages["prepare"] == pytest.approx(a.stages["prepare"])
    assert b.tokens == a.tokens == 256 * (512 + 1024)


def test_predicted_says_which_lengths_it_used():
    spread = Job.create("grpo", "qwen2.5-1.5b", 512, 16384, 64, n_samples=4, response_mean=1024)
    d = predict_plan(_plan(spread), A100).to_dict()
    used = d["response_tokens"]
    assert used["train"] == used["prepare"] == {"basis": "mean", "tokens": 1024.0}
    gen = used["generate"]
    assert "longest" in gen["basis"] and gen["max"] == 16384
    assert 1024 < gen["tokens"] < 16384 and gen["waves"] >= 1
    assert gen["tokens"] == pytest.approx(spread.lengths.expected_max(gen["sequences_per_wave"]))
    fixed = Job.create("grpo", "qwen2.5-1.5b", 512, 1024, 64, n_samples=4)
    assert "response_tokens" not in predict_plan(_plan(fixed), A100).to_dict()


def test_generation_terms_with_spread_by_hand():
    job = Job.create("grpo", "qwen2.5-0.5b", 256, 1000, 4, n_samples=4, response_mean=500)
    train, gen = ParallelLayout(1, 1, 4), GenLayout(1, 1, 1)
    shape = gen_shape(job, train, gen, 16)  # 4 sequences per replica
    t = generation_cost(job, gen, shape, 2, A100, 8).as_dict()
    # F(x) = x / 1000 (a = 1): a wave of 2 lasts E[max] = 1000 * 2 / 3 steps
    assert decode_steps(job, 4, 2) == (2, pytest.approx(2000 / 3), pytest.approx(4000 / 3))
    weights = shape.weight_bytes / HBM
    assert t["decode_weights"] == pytest.approx(2000 / 3 * weights)
    assert t["kv_waves"] == pytest.approx(2000 / 3 * weights)
    kv_token = shape.kv_bytes_per_seq / (256 + 1000)  # cache bytes of one token
    mean_sq = 1000**2 / 3
    assert t["decode_kv"] == pytest.approx(4 * (256 * 500 + mean_sq / 2) * kv_token / HBM)
    assert t["step_overhead"] == pytest.approx(4000 / 3 * A100.step_overhead_s)


def test_job_json_keeps_the_spread(tmp_path):
    job = Job.create("grpo", "tiny", 64, 256, 8, response_mean=100)
    d = job.to_dict()
    assert d["response_mean"] == 100.0 and Job.from_dict(d) == job
    dist = dict(d, response_dist=[[32, 3], [256, 1]])
    del dist["response_mean"]
    j2 = Job.from_dict(dist)
    assert j2.lengths.mean == pytest.approx((32 * 3 + 256) / 4)
    assert j2.to_dict()["response_dist"] == [[32, 3.0], [256, 1.0]]
    assert j2.tokens_per_iteration == round(32 * (64 + j2.lengths.mean))
    with pytest.raises(LengthError):
        Job.create("grpo", "tiny", 64, 256, 8, response_mean=300)
    with pytest.raises(JobError, match="response_dist"):
        Job.from_dict(dict(d, response_dist="32:1"))


def test_cli_response_mean(capsys, tmp_path):
    tiny = [
        "--gpu",
        "local-cpu",
        "--gpus",
        "4",
        "--model",
        "tiny",
        "--prompt-len",
        "64",
        "--batch",
        "8",
        "--mini-batches",
        "2",
    ]
    assert main(["plan", *tiny, "--response-len", "256", "--response-mean", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["job"]["response_mean"] == 64.0
    assert plan["predicted"]["response_tokens"]["train"]["tokens"] == 64.0
    assert main(["plan", *tiny, "--response-len", "256", "--response-mean", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "mean response length" in err and "Traceback" not in err
