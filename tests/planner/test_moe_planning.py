"""Mixture-of-experts jobs: compute follows active parameters, memory follows total
parameters split over ep ranks, expert-parallel all-to-all and gradient reduction by hand,
plan JSON's optional "ep", and the planner's search over ep (CP-SAT == brute force)."""

import dataclasses

import pytest

from hybridflow.layout import GenLayout, LayoutError, ParallelLayout
from hybridflow.memory import MemorySettings
from hybridflow.plan import Plan
from hybridflow.planner.search import Planner, plan_job
from hybridflow.planner.tables import _expert_degrees, _pareto
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.costs import collective
from hybridflow.simulator.generation import gen_shape, generation_cost, vllm_workspace_bytes
from hybridflow.simulator.job import Job
from hybridflow.simulator.model import load_model
from hybridflow.simulator.moe import alltoall_seconds, touched_fraction
from hybridflow.simulator.profile import load_profile
from hybridflow.simulator.train_memory import rank_expert_params, rank_params, resident_memory
from hybridflow.simulator.training import check_layout, role_params, train_cost
from tests.planner.brute import brute_force_best

A100 = load_profile("a100-80gb")
THR = A100.peak_flops * A100.eff_matmul
JOB = Job.create("grpo", "tiny-moe", 64, 64, 8, n_samples=2, mini_batches=2)
SPEC = JOB.spec("actor")  # 2 layers, hidden 128, 8 experts (top 2) of width 96


def test_layout_ep_key_is_optional():
    assert ParallelLayout(1, 2, 4).to_dict() == {"pp": 1, "tp": 2, "cp": 1, "dp": 4}
    assert ParallelLayout(1, 2, 4, 2).to_dict() == {"pp": 1, "tp": 2, "cp": 1, "dp": 4, "ep": 2}
    assert ParallelLayout.from_dict({"pp": 1, "tp": 2, "dp": 4}).ep == 1
    assert ParallelLayout.from_dict({"pp": 1, "tp": 2, "dp": 4, "ep": 4}).ep == 4
    for bad in (
        {"pp": 1, "tp": 2, "dp": 4, "ep": 3},
        {"pp": 1, "tp": 2, "dp": 4, "xp": 2},
        {"pp": 1, "tp": 2, "dp": 4, "ep": 0},
    ):
        with pytest.raises(LayoutError):
            ParallelLayout.from_dict(bad)
    with pytest.raises(LayoutError, match="experts"):
        check_layout(Job.create("grpo", "tiny", 64, 64, 8), "actor", ParallelLayout(1, 1, 2, 2))
    with pytest.raises(LayoutError, match="experts"):
        check_layout(
            Job.create("grpo", "qwen3-30b-a3b", 64, 64, 64), "actor", ParallelLayout(1, 1, 6, 3)
        )
    assert _expert_degrees(128, 24) == [1, 2, 4, 8] and _expert_degrees(0, 16) == [1]


def test_memory_follows_total_params_over_ep():
    routed = SPEC.routed_expert_params
    assert routed == 2 * 8 * 3 * 128 * 96
    for ep in (1, 2, 4):
        assert role_params(JOB, "actor", ep) == SPEC.params - routed + routed // ep
        lay = ParallelLayout(1, 2, 4, ep)
        got = resident_memory(JOB, "actor", lay).as_dict()
        n = rank_params(SPEC, lay, 0)
        # the routed experts split over ep (and tp): the rest is the same at every ep
        assert n - rank_params(SPEC, ParallelLayout(1, 2, 4), 0) == (routed // ep - routed) / 2
        experts = rank_expert_params(SPEC, lay, 0)
        assert experts == routed / ep / 2
        # Adam (fp32 master, m, v) sharded over dp=4; each rank's experts over dp/ep ranks
        opt = 12 * ((n - experts) / 4 + experts / (4 // ep))
        # (megatron's buffer padding aside: tests/executor/test_train_options.py is exact)
        assert got == pytest.approx({"weights": 2 * n, "grads": 4 * n, "optimizer": opt}, rel=1e-3)


def test_train_cost_by_hand_with_ep():
    lay = ParallelLayout(1, 2, 4, 2)
    t = train_cost(
        JOB, "actor", lay, A100, 8, MemorySettings(distributed_optimizer=False)
    ).as_dict()
    tokens = 2 * 2 * 128  # 2 mini-batches x 2 sequences per dp rank, 64 + 64 tokens
    # compute follows the active parameters: 2 of 8 experts per token
    assert t["train_compute"] == pytest.approx(tokens * 3 * SPEC.flops_per_token(64) / 2 / THR)
    assert SPEC.flops_per_token(64) < 2 * SPEC.params
    # per MoE layer: dispatch + combine, forward and backward; peers one dp rank (tp=2) apart
    sent = tokens / 2 * 2 * 128 * 2 * (2 - 1) / 2  # tokens/tp x top-2 x hidden x bf16, half away
    one = A100.comm_latency_s + sent / (A100.intra_node_bandwidth * A100.eff_communication)
    assert alltoall_seconds(A100, sent, 2, 2, 8) == pytest.approx(one)
    assert t["ep_alltoall"] == pytest.approx(2 * 4 * one)
    # non-expert gradients over dp=4 ranks, each rank's experts over dp/ep=2 ranks
    shard = rank_params(SPEC, lay, 0)
    experts = SPEC.routed_expert_params / 2 / 2
    grad = (
        collective(A100, "all_reduce", 4 * (shard - experts), 4, True)[0]
        + collective(A100, "all_reduce", 4 * experts, 2, True)[0]
    )
    assert t["dp_grad_sync"] == pytest.approx(2 * grad)
    assert "ep_alltoall" not in train_cost(JOB, "actor", ParallelLayout(1, 2, 4), A100, 8).as_dict()


def test_generation_uses_the_training_expert_split():
    train, gen = ParallelLayout(1, 2, 4, 4), GenLayout(1, 1, 2)
    shape = gen_shape(JOB, train, gen, 16)
    routed = SPEC.routed_expert_params
    assert shape.weight_bytes == 2 * (SPEC.params - routed + routed // 4)
    assert shape.expert_bytes == 2 * routed // 4 and (shape.ep, shape.ep_stride) == (4, 2)
    t = generation_cost(JOB, gen, shape, 1, A100, 8).as_dict()
    untouched = shape.expert_bytes * (1 - touched_fraction(SPEC, 1 * 4))
    assert t["decode_weights"] == pytest.approx(
        64 * (shape.weight_bytes - untouched) / (A100.hbm_bandwidth * A100.eff_memory)
    )
    assert t["ep_alltoall"] > 0


def test_pareto_equals_the_quadratic_definition():
    import random

    @dataclasses.dataclass(frozen=True)
    class C:
        total: float
        resident: float
        transient: float

    rng = random.Random(3)
    for _ in range(500):
        cs = [
            C(rng.randint(0, 5), rng.randint(0, 5), rng.randint(0, 5))
            for _ in range(rng.randint(0, 20))
        ]
        slow = []
        for c in sorted(cs, key=lambda c: (c.total, c.resident, c.transient)):
            if not any(k.resident <= c.resident and k.transient <= c.transient for k in slow):
                slow.append(c)
        assert _pareto(cs) == slow


@pytest.mark.parametrize("gpus", [4, 8])
def test_moe_planner_equals_brute_force(gpus):
    # ~8 MiB usable: even with the distributed optimizer, recomputation and offload on
    # offer, tiny-moe's state forces model and expert splits
    # (and vLLM's workspace for a forward of its largest batch, which does not shrink)
    work = vllm_workspace_bytes(load_model("tiny-moe"), GenLayout(1, 1, 1)) / 2**30
    small = dataclasses.replace(A100, hbm_gib=A100.reserved_gib + 0.008 + work)
    job = Job.create("grpo", "tiny-moe", 256, 256, 8, n_samples=4, mini_batches=2)
    cluster = Cluster.from_gpus("a100-80gb", gpus)
    best = plan_job(cluster, job, small)[0]
    exhaustive = brute_force_best(cluster, job, small)
    assert best.predicted["iteration_s"] == pytest.approx(exhaustive[0], rel=1e-6)
    assert any(
        lay.ep > 1
        for s in best.sets
        for kinds in s.layouts.values()
        for lay in kinds.values()
        if isinstance(lay, ParallelLayout)
    )
    assert Plan.from_dict(best.to_dict()).to_dict() == best.to_dict()


def test_expert_parallelism_lets_a_big_moe_fit():
    job = Job.create(
        "grpo", "qwen3-235b-a22b", 1024, 2048, 64, n_samples=8, mini_batches=4, reward="rule"
    )
    planner = Planner(job, load_profile("h100-80gb"), 8)
    best = planner.plan(Cluster.from_gpus("h100-80gb", 256))[0]
    actor = best.set_of("actor").layouts["actor"]["train"]
    assert actor.ep > 1  # without ep the 235B actor cannot hold Adam states on 256 GPUs
    assert best.to_dict()["sets"][0]["layouts"]["actor"]["train"]["ep"] == actor.ep
    mem = best.predicted["peak_memory_gib"]["actor"]
    assert 0 < mem <= load_profile("h100-80gb").usable_bytes / 2**30


def test_an_expert_parallel_group_waits_for_its_longest_response():
    job = Job.create("grpo", "tiny-moe", 64, 256, 8, n_samples=2, mini_batches=2, response_mean=64)
    gen = GenLayout(1, 1, 2)
    alone = gen_shape(job, ParallelLayout(1, 2, 4), gen, 16)
    grouped = gen_shape(job, ParallelLayout(1, 2, 4, 4), gen, 16)
    a = generation_cost(job, gen, alone, 1, A100, 8).as_dict()
    g = generation_cost(job, gen, grouped, 1, A100, 8).as_dict()
    hbm = A100.hbm_bandwidth * A100.eff_memory
    # one token reads its 2 of 8 experts; a group of 4 reads more of them
    skip = alone.expert_bytes * (1 - touched_fraction(SPEC, 1))
    assert a["decode_weights"] == pytest.approx(
        job.lengths.expected_max(1) * (alone.weight_bytes - skip) / hbm
    )
    untouched = grouped.expert_bytes * (1 - touched_fraction(SPEC, 4))
    assert g["decode_weights"] == pytest.approx(
        job.lengths.expected_max(4) * (grouped.weight_bytes - untouched) / hbm
    )
    assert job.lengths.expected_max(4) > job.lengths.expected_max(1)
