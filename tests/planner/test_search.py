"""The planner: CP-SAT's choice equals brute force on every job here (<= 32 GPUs), the
chosen plan's prediction equals the search objective, infeasible jobs name the GPU count
that would fit."""

import dataclasses
import json

import pytest

from hybridflow.plan import Plan
from hybridflow.planner.cpsat import brute_force, greedy, solve
from hybridflow.planner.search import Planner, plan_job, set_partitions, standard_placements
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.job import Job
from hybridflow.simulator.predict import predict_plan
from hybridflow.simulator.profile import load_profile
from tests.conftest import A100, A100_24GIB
from tests.planner.brute import brute_force_best

SMALL = A100_24GIB  # forces splits and model parallelism

JOBS = [  # (job, profile, GPUs)
    (Job.create("ppo", "qwen2.5-1.5b", 256, 256, 32, mini_batches=2), A100, 8),
    (Job.create("ppo", "llama-2-7b", 512, 512, 32, mini_batches=2), SMALL, 16),
    (
        Job.create(
            "ppo",
            "llama-2-13b",
            512,
            512,
            32,
            mini_batches=2,
            critic="llama-2-7b",
            reward="llama-2-7b",
        ),
        SMALL,
        32,
    ),
    (Job.create("grpo", "qwen2.5-3b", 256, 256, 8, n_samples=4), SMALL, 8),
    (Job.create("remax", "qwen2.5-0.5b", 256, 256, 16), SMALL, 4),
]


def test_set_partitions_are_the_bell_numbers():
    for n, bell in [(1, 1), (2, 2), (3, 5), (4, 15), (6, 203)]:
        items = tuple("abcdef"[:n])
        parts = list(set_partitions(items))
        assert len(parts) == bell
        canon = {frozenset(frozenset(s) for s in p) for p in parts}
        assert len(canon) == bell
        assert all(sorted(x for s in p for x in s) == list(items) for p in parts)


@pytest.mark.parametrize("job,profile,gpus", JOBS)
def test_cpsat_equals_brute_force_for_every_placement(job, profile, gpus):
    planner = Planner(job, profile, min(8, gpus))
    solved = 0
    for placement in set_partitions(job.roles):
        inst = planner.instance(placement, gpus)
        if inst is None:
            continue
        exact, cp = brute_force(inst), solve(inst)
        assert cp is not None and cp.optimal
        assert cp.objective == pytest.approx(exact.objective, abs=1e-5)
        assert inst.gpus(cp.choice) <= gpus
        assert greedy(inst).objective >= exact.objective - 1e-9
        solved += 1
    assert solved > 1


@pytest.mark.parametrize("job,profile,gpus", JOBS)
def test_planner_equals_exhaustive_search(job, profile, gpus):
    cluster = Cluster.from_gpus("a100-80gb", gpus)
    best = plan_job(cluster, job, profile)[0]
    exhaustive = brute_force_best(cluster, job, profile)
    assert best.predicted["iteration_s"] == pytest.approx(exhaustive[0], rel=1e-6, abs=1e-5)
    # the plan file carries what its prediction needs: read back from JSON, the plan
    # predicts the objective the search ranked it by (the allocation's sum of stage maxima)
    objective = (
        Planner(job, profile, cluster.gpus_per_node).candidates(gpus, 1)[0].solution.objective
    )
    loaded = Plan.from_dict(json.loads(json.dumps(best.to_dict())))
    assert predict_plan(loaded, profile).iteration_s == pytest.approx(objective, rel=1e-6, abs=1e-5)
    assert best.gpus <= gpus


def test_top_k_and_standard_placements():
    job, profile, gpus = JOBS[1]
    cluster = Cluster.from_gpus("a100-80gb", gpus)
    plans = plan_job(cluster, job, profile, top=3)
    its = [p.predicted["iteration_s"] for p in plans]
    assert its == sorted(its) and len(plans) == 3
    assert len({tuple(s.models for s in p.sets) for p in plans}) == 3
    std = standard_placements(cluster, job, profile)
    assert set(std) <= {"colocated", "split", "separate"} and "colocated" in std
    assert [s.models for s in std["colocated"].sets] == [job.roles]
    for plan in std.values():
        assert plan.predicted["iteration_s"] >= its[0] - 1e-9
    if "separate" in std:
        assert all(len(s.models) == 1 for s in std["separate"].sets)


def test_infeasible_job_names_the_smallest_gpu_count():
    job = Job.create("ppo", "llama-2-70b", 1024, 1024, 64, mini_batches=2)
    planner = Planner(job, A100, 8)
    with pytest.raises(DoesNotFit, match=r"smallest GPU count that fits is (\d+)") as e:
        plan_job(Cluster.from_gpus("a100-80gb", 8), job, A100, planner=planner)
    need = int(e.value.args[0].rsplit(" ", 1)[1])
    assert need % 8 == 0 and need > 8
    assert plan_job(Cluster.from_gpus("a100-80gb", need), job, A100, planner=planner)
    with pytest.raises(DoesNotFit):
        plan_job(Cluster.from_gpus("a100-80gb", need - 8), job, A100, planner=planner)


def test_tables_are_reused_across_cluster_sizes():
    job, profile, _ = JOBS[1]
    shared = Planner(job, profile, 8)
    for gpus in (16, 32, 24):
        cluster = Cluster.from_gpus("a100-80gb", gpus)
        reused = shared.plan(cluster)[0].predicted["iteration_s"]
        fresh = plan_job(cluster, job, profile)[0].predicted["iteration_s"]
        assert reused == pytest.approx(fresh)
    assert ("actor", 16, True) in shared.tables._roles


def test_pruned_set_tables_equal_exhaustive():
    job, profile, _ = JOBS[2]
    planner = Planner(job, profile, 8)
    for roles in [
        ("actor", "reference"),
        ("actor", "critic", "reference", "reward"),
        ("critic", "reward"),
    ]:
        for n in (8, 16, 32):
            a = planner.tables.best_set(roles, n)
            b = planner.tables.best_set(roles, n, prune=False)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.total == pytest.approx(b.total)


@pytest.mark.parametrize("factors", [None, ((2.0, 1.9), (3.0, 2.9), (4.0, 3.9))])
def test_shared_host_plans_rank_by_the_prediction(factors):
    """Where devices share a host's cores (a profile with `sharing`), concurrent sets slow
    each other: the plans come in the order of their prediction (the fastest predicted of
    every placement's best allocation first), not of the sum of stage maxima."""
    prof = load_profile("local-cpu")
    if factors is not None:  # ranks time-slice the cores: concurrency never pays
        prof = dataclasses.replace(
            prof, overheads=dataclasses.replace(prof.overheads, sharing=factors)
        )
    job = Job.create("ppo", "tiny", 16, 8, 32, mini_batches=2)
    cluster = Cluster.from_gpus("local-cpu", 4, 4)
    planner = Planner(job, prof, 4, max_gen_pp=1)
    found = planner.candidates(4, 15)
    every = sorted(planner.to_plan(c, cluster).predicted["iteration_s"] for c in found)
    plans = plan_job(cluster, job, prof, top=3, planner=planner)
    assert [p.predicted["iteration_s"] for p in plans] == pytest.approx(every[:3])
    if factors is not None:  # the stage sums alone would have ranked another plan first
        first = planner.to_plan(found[0], cluster).predicted["iteration_s"]
        assert first > every[0] + 1e-6
