"""predict_plan composes stages as the paper's d_cost, and works for the executor's tiny
models on the local-cpu profile."""

import dataclasses
from types import SimpleNamespace

import pytest

from hybridflow.layout import GenLayout, LayoutError, ParallelLayout
from hybridflow.plan import PlacedSet
from hybridflow.simulator.calls import Calls
from hybridflow.simulator.cluster import Cluster, ClusterError
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.job import Job, JobError
from hybridflow.simulator.predict import fluid_finish, predict_plan, predict_set
from hybridflow.simulator.profile import Overheads, load_profile

CPU = load_profile("local-cpu")
# its analytic model alone: no per-call tables, no cores shared between sets
ANALYTIC = dataclasses.replace(CPU, calls=Calls(), overheads=Overheads())


def _tiny_plan(sets):
    return SimpleNamespace(
        cluster=Cluster("local-cpu", 1, 4),
        job=Job.create("ppo", "tiny", 64, 64, 8, mini_batches=2),
        sets=sets,
    )


SPLIT = (
    PlacedSet(
        ("actor", "reference"),
        2,
        {
            "actor": {"train": ParallelLayout(1, 2, 1), "generate": GenLayout(1, 1, 2)},
            "reference": {"infer": ParallelLayout(1, 1, 2)},
        },
    ),
    PlacedSet(
        ("critic", "reward"),
        2,
        {
            "critic": {"train": ParallelLayout(2, 1, 1)},
            "reward": {"infer": ParallelLayout(1, 1, 2)},
        },
    ),
)


def test_tiny_models_on_local_cpu_compose_as_d_cost():
    plan = _tiny_plan(SPLIT)
    pred = predict_plan(plan)  # profile from the cluster's GPU kind
    # each set as if alone (its own 2 ranks busy), then the sets of a stage share the cores
    sets = [predict_set(plan.job, s, CPU.shared(2), 4) for s in SPLIT]
    for stage in ("generate", "prepare", "train", "reshard"):
        within = [sum(r.stages[stage].seconds for r in s.roles if stage in r.stages) for s in sets]
        shared = fluid_finish(within, [2, 2], CPU.overheads.slowdown, 4)
        assert pred.stages[stage] == pytest.approx(max(shared))  # slowest set
        assert max(shared) >= max(within)
    plain = predict_plan(plan, ANALYTIC)  # without sharing: the slowest set alone
    for stage in ("generate", "prepare", "train", "reshard"):
        alone = [predict_set(plan.job, s, ANALYTIC, 4).stage_seconds(stage) for s in SPLIT]
        assert plain.stages[stage] == pytest.approx(max(alone))
    prepare_a = (
        sets[0].roles[0].stages["prepare"].seconds + sets[0].roles[1].stages["prepare"].seconds
    )
    assert sets[0].stage_seconds("prepare") == pytest.approx(prepare_a)  # colocated roles add
    assert pred.iteration_s == pytest.approx(sum(pred.stages.values()))
    assert pred.tokens_per_s == pytest.approx(8 * 128 / pred.iteration_s)
    d = pred.to_dict()
    assert set(d) == {"iteration_s", "tokens_per_s", "stages", "terms", "peak_memory_gib"}
    assert set(d["terms"]["actor"]) == {"generate", "prepare", "train", "reshard"}
    assert set(d["peak_memory_gib"]) == {"actor", "critic", "reference", "reward"}
    for stages in d["terms"].values():
        for terms in stages.values():
            assert all(v > 0 for v in terms.values())


def test_reshard_scheme_changes_only_reshard_and_memory():
    plan = _tiny_plan(
        (
            PlacedSet(
                ("actor", "critic", "reference", "reward"),
                4,
                {
                    "actor": {"train": ParallelLayout(1, 2, 2), "generate": GenLayout(1, 1, 2)},
                    "critic": {"train": ParallelLayout(1, 1, 4)},
                    "reference": {"infer": ParallelLayout(1, 1, 4)},
                    "reward": {"infer": ParallelLayout(1, 1, 4)},
                },
            ),
        )
    )
    # the schemes of the analytic model (the per-call table measured the executor's one)
    he, ag = predict_plan(plan, ANALYTIC, "hybridengine"), predict_plan(plan, ANALYTIC, "allgather")
    assert ag.stages["reshard"] > he.stages["reshard"] > 0
    assert ag.stages["train"] == he.stages["train"]
    with pytest.raises(ValueError, match="unknown resharding scheme"):
        predict_plan(plan, CPU, "zero")


def test_memory_limit_names_the_need():
    job = Job.create("ppo", "llama-2-7b", 512, 512, 16)
    big = PlacedSet(
        ("actor",), 1, {"actor": {"train": ParallelLayout(1, 1, 1), "generate": GenLayout(1, 1, 1)}}
    )
    with pytest.raises(
        DoesNotFit, match=r"needs \d+\.\d GiB per GPU, more than the 76.0 GiB usable"
    ):
        predict_set(job, big, load_profile("a100-80gb"), 8)


def test_kv_cache_takes_the_free_memory():
    job = Job.create("grpo", "llama-2-7b", 512, 512, 64, n_samples=8)
    a100 = load_profile("a100-80gb")
    s = PlacedSet(
        ("actor", "reference", "reward"),
        8,
        {
            "actor": {"train": ParallelLayout(1, 8, 1), "generate": GenLayout(1, 2, 4)},
            "reference": {"infer": ParallelLayout(1, 1, 8)},
            "reward": {"infer": ParallelLayout(1, 1, 8)},
        },
    )
    roomy = predict_set(job, s, a100, 8)
    tight = predict_set(job, s, dataclasses.replace(a100, hbm_gib=52.0), 8)

    def gen(p):
        return p.roles[0].stages["generate"].as_dict()

    assert gen(tight).get("kv_waves", 0) > gen(roomy).get("kv_waves", 0)
    assert roomy.peak_bytes <= a100.usable_bytes


@pytest.mark.parametrize(
    "make,err",
    [
        (lambda: Cluster("a100-80gb", 0), ClusterError),
        (lambda: Cluster.from_gpus("a100-80gb", 12), ClusterError),
        (lambda: Job.create("ppo", "tiny", 0, 64, 8), JobError),
        (lambda: Job.create("ppo", "tiny", 64, 64, 8, mini_batches=3), JobError),
        (lambda: Job.create("ppo", "tiny", 400, 200, 8), JobError),  # > max_position
        (lambda: Job.create("grpo", "tiny", 64, 64, 8, n_samples=1), JobError),
        (lambda: Job.create("ppo", "gpt-5", 64, 64, 8), ValueError),
        (lambda: ParallelLayout(1, 0, 1), LayoutError),
        (lambda: GenLayout(1, 3, 1).check(4), LayoutError),
        (lambda: GenLayout(1, 2, 1).check(4, ParallelLayout(1, 4, 1)), LayoutError),
        (lambda: ParallelLayout(1, 2, 2).check(8), LayoutError),
    ],
)
def test_nouns_validate(make, err):
    with pytest.raises(err):
        make()


def test_job_dataflow():
    ppo = Job.create("ppo", "tiny", 64, 64, 8)
    assert [w.stage for w in ppo.works("actor")] == ["generate", "prepare", "train"]
    assert [w.stage for w in ppo.works("critic")] == ["prepare", "train"]
    remax = Job.create("remax", "tiny", 64, 64, 8)
    assert remax.works("actor")[0].sequences == 16  # sampled + greedy baseline
    assert remax.works("reward")[0].sequences == 16
    grpo = Job.create("grpo", "tiny", 64, 64, 8, n_samples=4)
    assert grpo.roles == ("actor", "reference", "reward") and grpo.sequences == 32
    safe = Job.create("safe-rlhf", "tiny", 64, 64, 8, critic="tiny-4l")
    assert safe.to_dict()["models"]["cost_critic"] == "tiny-4l"
    assert Job.from_dict(safe.to_dict()) == safe
