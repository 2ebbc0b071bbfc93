"""The asynchronous search: brute force agrees on every job here (<= 32 GPUs), the chosen
plan's prediction is the search's step, the staleness bound, and `plan --pipeline`."""

from __future__ import annotations

import json

import pytest

from hybridflow.cli.main import main
from hybridflow.plan import Plan
from hybridflow.planner.asynchronous import AsyncSearch
from hybridflow.planner.pipelines import plan_pipelines
from hybridflow.planner.search import Planner
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.predict import predict_plan
from hybridflow.simulator.profile import load_profile
from tests.conftest import A100, A100_24GIB
from tests.planner.brute_async import brute_force_async

JOBS = [  # (job, profile, GPUs)
    (Job.create("grpo", "qwen2.5-1.5b", 256, 512, 32, n_samples=4, reward="rule"), A100, 8),
    (Job.create("ppo", "qwen2.5-1.5b", 256, 256, 32, mini_batches=2), A100, 16),
    (Job.create("grpo", "qwen2.5-3b", 256, 256, 8, n_samples=4), A100_24GIB, 8),
    (Job.create("remax", "qwen2.5-0.5b", 256, 256, 16, response_mean=100), A100_24GIB, 4),
    (
        Job.create("ppo", "llama-2-7b", 512, 512, 32, mini_batches=2, reward="qwen2.5-1.5b"),
        A100_24GIB,
        32,
    ),
]


def _search(job: Job, profile, gpus: int, staleness: int = 1) -> tuple[AsyncSearch, Cluster]:
    cluster = Cluster.from_gpus("a100-80gb", gpus)
    return AsyncSearch(Planner(job, profile, cluster.gpus_per_node), staleness), cluster


CASES = [(*j, 1) for j in JOBS] + [(*j, 0) for j in JOBS[:4]]  # brute force on 32 GPUs: 20 s


@pytest.mark.parametrize("job,profile,gpus,staleness", CASES)
def test_async_search_equals_brute_force(job, profile, gpus, staleness) -> None:
    search, cluster = _search(job, profile, gpus, staleness)
    best = search.best(cluster)
    exhaustive = brute_force_async(cluster, job, profile, staleness)
    assert best is not None and exhaustive is not None
    assert best.objective == pytest.approx(exhaustive[0], rel=1e-6, abs=1e-6)
    # the plan file predicts the step the search ranked it by
    plan = Plan.from_dict(json.loads(json.dumps(search.to_plan(best, cluster).to_dict())))
    assert plan.asynchronous and plan.pipeline.staleness == staleness
    assert plan.gpus <= gpus
    assert predict_plan(plan, profile).iteration_s == pytest.approx(best.objective, rel=1e-6)


def test_scoring_models_are_tried_beside_the_engines() -> None:
    job, profile, gpus = JOBS[1]
    search, cluster = _search(job, profile, gpus)
    assert search.scoring_sides() == [(), ("reward",)]
    rc = search.rollout(("reward",), 8)
    assert rc is not None and dict(rc.scoring.layouts)["reward"]["infer"].n_gpus == 8
    assert rc.produce_s > rc.generate_s  # the reward's forward passes run on that side


def test_staleness_bound_picks_the_smallest_k_that_reaches_the_best_step() -> None:
    job, profile, gpus = JOBS[1]
    cluster = Cluster.from_gpus("a100-80gb", gpus)
    planner = Planner(job, profile, cluster.gpus_per_node)
    steps = {}
    for bound in (0, 1, 3):
        plan = AsyncSearch(planner, bound).plan(cluster)
        assert plan is not None
        steps[bound] = (plan.pipeline.staleness, plan.prediction["iteration_s"])
    assert steps[0][0] == 0 and steps[1][0] == 1 and steps[3][0] == 1
    assert steps[3][1] == pytest.approx(steps[1][1]) and steps[1][1] < steps[0][1]


def test_auto_takes_the_faster_pipeline() -> None:
    job, profile, gpus = JOBS[1]
    cluster = Cluster.from_gpus("a100-80gb", gpus)
    planner = Planner(job, profile, cluster.gpus_per_node)
    auto = plan_pipelines(planner, cluster, "auto")
    assert auto.sync and auto.asynchronous is not None
    sync_s = auto.sync[0].prediction["iteration_s"]
    async_s = auto.asynchronous.prediction["iteration_s"]
    assert auto.best.prediction["iteration_s"] == min(sync_s, async_s)
    assert auto.best.asynchronous == (async_s < sync_s)
    assert ("chose asynchronous" if async_s < sync_s else "chose synchronous") in auto.reason()
    only = plan_pipelines(planner, cluster, "sync")
    assert only.asynchronous is None and not only.best.asynchronous
    assert plan_pipelines(planner, cluster, "async").best.asynchronous


def test_plan_command_prints_both_pipelines_and_the_choice(capsys) -> None:
    argv = [
        "plan",
        "--gpus",
        "16",
        "--model",
        "qwen2.5-1.5b",
        "--batch",
        "32",
        "--pipeline",
        "auto",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Pipelines, the best plan of each:" in out
    sync_line = next(line for line in out.splitlines() if line.startswith("  synchronous "))
    async_line = next(line for line in out.splitlines() if line.startswith("  asynchronous "))
    assert "rollout:" in async_line and "rollout" not in sync_line
    assert "max(produce" in out and "consume" in out and "chose " in out
    assert main([*argv, "--pipeline", "async", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["pipeline"] == {"mode": "async", "staleness": 1}
    assert d["predicted"]["pipeline"]["step_s"] == d["predicted"]["iteration_s"]
    assert main([*argv, "--pipeline", "sync", "--json"]) == 0
    assert "pipeline" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--staleness", "-1"], "--staleness must be an integer from 0 to 1024, got -1"),
        (["--pipeline", "async", "--export", "verl"], "--export writes synchronous launch"),
        (["--pipeline", "async", "--gpus", "1"], "no asynchronous plan fits in memory on 1"),
    ],
)
def test_bad_pipeline_flags_are_one_line(capsys, extra, message) -> None:
    assert main(["plan", "--model", "qwen2.5-1.5b", "--batch", "32", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_on_shared_cores_the_prediction_ranks_the_candidates() -> None:
    """The local cluster's devices share their host's cores: the chosen asynchronous plan
    is the best predicted of every candidate, and no prediction beats its own step."""
    profile = load_profile("local-cpu")
    job = Job.create("ppo", "tiny", 16, 8, 64, ppo_epochs=2, mini_batches=4)
    cluster = Cluster("local-cpu", 1, 4)
    search = AsyncSearch(Planner(job, profile, 4))
    chosen = search.plan(cluster)
    every = [search.to_plan(c, cluster) for c in search.solved(cluster)]
    assert chosen is not None and len(every) > 1
    steps = [p.prediction["iteration_s"] for p in every]
    assert chosen.prediction["iteration_s"] == pytest.approx(min(steps))
    for cand, plan in zip(search.solved(cluster), every):
        assert plan.prediction["iteration_s"] >= cand.objective - 1e-9
