"""Each cost and memory term against values computed by hand from the architecture and
the a100-80gb datasheet numbers."""

import math

import pytest

from hybridflow.layout import GenLayout, LayoutError, ParallelLayout
from hybridflow.memory import MemorySettings
from hybridflow.simulator.costs import DoesNotFit, collective
from hybridflow.simulator.generation import gen_shape, generation_cost
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import load_profile
from hybridflow.simulator.reshard import (
    actor_reshard,
    redundant_bytes,
    reshard_bytes_per_rank,
    reshard_cost,
    reshard_peak_bytes,
)
from hybridflow.simulator.train_memory import (
    head_layers,
    resident_memory,
    stage_memory,
    stage_split,
)
from hybridflow.simulator.training import infer_cost, train_cost

A100 = load_profile("a100-80gb")
FLOPS = 312e12 * 0.5  # peak bf16 x matmul efficiency
NVLINK = 300e9 * 0.7  # per direction x communication efficiency
HBM = 2.039e12 * 0.8
LAT = 1e-5
# llama-2-7b: 32 layers, hidden 4096, ffn 11008, vocab 32000, 32 heads
L, H, FFN, V = 32, 4096, 11008, 32000
P = 32000 * 4096 * 2 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096


def fwd_flops(ctx: int) -> float:
    return 2 * (L * (4 * H * H + 3 * H * FFN) + V * H) + 4 * L * H * ctx


@pytest.fixture(scope="module")
def job() -> Job:
    return Job.create("ppo", "llama-2-7b", 512, 512, 16, mini_batches=2)


JOB7B = Job.create("grpo", "llama-2-7b", 512, 512, 16, n_samples=4, reward="rule")


def test_params_and_flops_match_the_architecture(job):
    assert job.params("actor") == P
    assert job.spec("actor").flops_per_token(512) == fwd_flops(512)
    # value models drop the LM head for a scalar head
    assert job.params("critic") == P - V * H + H


# one rank of stage 0 of pp=2, tp=2: the embedding and 16 layers split over tp, norms whole
LAYER_TP2 = (4 * H * H + 3 * H * FFN) / 2 + 2 * H
STAGE0_TP2 = V * H / 2 + 16 * LAYER_TP2


def test_pipeline_stages_balance_the_lm_head(job):
    spec = job.spec("actor")
    # the head is V*H = 0.65 layers of 4*H*H + 3*H*FFN: too little to move a layer
    assert head_layers(spec) == pytest.approx(V * H / (4 * H * H + 3 * H * FFN))
    assert stage_split(spec, 2) == (16, 16)
    assert sum(stage_split(spec, 5)) == L  # 32 layers over 5 stages: uneven
    assert stage_split(spec, 5)[-1] < stage_split(spec, 5)[1]


def test_train_terms(job):
    lay = ParallelLayout(pp=2, tp=2, dp=2)
    t = train_cost(job, "actor", lay, A100, gpn=8).as_dict()
    micro, steps = 16 // (2 * 2), 2  # sequences per dp rank per mini-batch; updates
    seq = 1024
    comp = steps * micro * seq * 3 * fwd_flops(512) / 4 / FLOPS
    assert t["train_compute"] == pytest.approx(comp)
    act = seq * H * 2  # bf16 activations of one micro-batch
    ar = 2 * LAT + act / NVLINK  # ring all-reduce over 2 ranks
    tp = steps * micro * (L // 2) * 4 * ar  # 2 fwd + 2 bwd all-reduces per layer
    assert t["tp_allreduce"] == pytest.approx(tp)
    assert t["pp_p2p"] == pytest.approx(steps * micro * 2 * (LAT + act / NVLINK))
    # the last stage also runs the head: it sets the pipeline's pace
    factor = (16 + head_layers(job.spec("actor"))) / (16 + head_layers(job.spec("actor")) / 2)
    assert t["pp_imbalance"] == pytest.approx(comp * (factor - 1))
    assert t["pp_bubble"] == pytest.approx((2 - 1) / micro * (comp * factor + tp))
    # distributed optimizer: reduce-scatter fp32 grads, all-gather bf16 weights over dp=2,
    # hidden behind the backward pass but for the last 40M-parameter bucket
    last = 40e6 / STAGE0_TP2
    sync = 2 * LAT + 0.5 * 6 * STAGE0_TP2 / NVLINK
    assert t["dp_grad_sync"] == pytest.approx(steps * sync * last)
    assert t["optimizer"] == pytest.approx(steps * STAGE0_TP2 / 2 * 30 / HBM)
    assert sum(t.values()) == pytest.approx(train_cost(job, "actor", lay, A100, 8).seconds)
    plain = train_cost(job, "actor", lay, A100, 8, MemorySettings(distributed_optimizer=False))
    assert plain.as_dict()["dp_grad_sync"] == pytest.approx(
        steps * (2 * LAT + 4 * STAGE0_TP2 / NVLINK) * last
    )


def test_recompute_costs_a_forward(job):
    lay = ParallelLayout(pp=1, tp=2, dp=4)
    none = train_cost(job, "actor", lay, A100, 8).as_dict()
    full = train_cost(job, "actor", lay, A100, 8, MemorySettings(recompute="full")).as_dict()
    assert full["recompute"] == pytest.approx(none["train_compute"] / 3)
    sel = train_cost(job, "actor", lay, A100, 8, MemorySettings(recompute="selective"))
    assert 0 < sel.as_dict()["recompute"] < full["recompute"] / 10


def test_offload_pays_the_host_link(job):
    lay = ParallelLayout(pp=1, tp=8, dp=1)
    t = train_cost(job, "actor", lay, A100, 8, MemorySettings(offload=True)).as_dict()
    n = V * H / 8 + L * ((4 * H * H + 3 * H * FFN) / 8 + 2 * H) + H + V * H / 8
    steps, host = 2, 25e9
    assert t["offload_transfer"] == pytest.approx((steps * n * 6 + 2 * 2 * n) / host)
    assert t["offload_optimizer_step"] == pytest.approx(steps * n * 30 / host)
    assert "optimizer" not in t


def test_inter_node_groups_use_the_nic(job):
    lay = ParallelLayout(pp=1, tp=8, dp=2)  # dp group spans 16 ranks: two nodes
    mem = MemorySettings(distributed_optimizer=False)
    t = train_cost(job, "actor", lay, A100, gpn=8, mem=mem).as_dict()
    shard = V * H / 8 + L * ((4 * H * H + 3 * H * FFN) / 8 + 2 * H) + H + V * H / 8
    sync = 2 * LAT + 4 * shard / (25e9 * 0.7)
    backward = t["train_compute"] * 2 / 3 / 2
    assert sync > backward  # over the NIC the exchange outlasts the backward pass
    assert t["dp_grad_sync"] == pytest.approx(2 * (sync - backward))


def test_infer_terms(job):
    lay = ParallelLayout(pp=1, tp=2, dp=4)
    t = infer_cost(job, "reference", lay, A100, 8, sequences=16).as_dict()
    micro = 16 // 4
    assert t["infer_compute"] == pytest.approx(micro * 1024 * fwd_flops(512) / 2 / FLOPS)
    assert t["tp_allreduce"] == pytest.approx(micro * L * 2 * (2 * LAT + 1024 * H * 2 / NVLINK))
    assert "pp_bubble" not in t and "pp_p2p" not in t


def test_memory_terms(job):
    lay = ParallelLayout(pp=2, tp=2, dp=2)
    res = resident_memory(job, "actor", lay).as_dict()
    # stage 1 holds the head and the final norm, a little more than stage 0's embedding
    last = STAGE0_TP2 + H
    assert res == pytest.approx({"weights": 2 * last, "grads": 4 * last, "optimizer": 6 * last})
    plain = resident_memory(job, "actor", lay, MemorySettings(distributed_optimizer=False))
    assert plain.as_dict()["optimizer"] == pytest.approx(12 * last)
    assert resident_memory(job, "reference", lay).as_dict() == pytest.approx({"weights": 2 * last})
    assert resident_memory(job, "actor", lay, MemorySettings(offload=True)).bytes == 0
    tr = stage_memory(job, "actor", lay, "train").as_dict()
    in_flight = min(2, 4)  # 1F1B: up to pp micro-batches on stage 0
    assert tr["activations"] == pytest.approx(L / 2 * 34 * H / 2 * 1024 * in_flight)
    last_stage = stage_memory(job, "critic", ParallelLayout(pp=1, tp=2, dp=4), "train")
    assert "logits" not in last_stage.as_dict()
    full = stage_memory(job, "actor", lay, "train", MemorySettings(recompute="full")).as_dict()
    # the last stage peaks: one micro-batch of layer inputs in flight, one layer re-run, logits
    assert full["activations"] == pytest.approx((2 * 16 * 1 + 34) * H / 2 * 1024)
    assert full["logits"] == pytest.approx(2 * 1024 * V / 2 * 4)
    assert "logits" not in stage_memory(job, "critic", lay, "infer").as_dict()


def test_generation_terms_and_waves(job):
    train, gen = ParallelLayout(1, 2, 4), GenLayout(1, 1, 2)
    shape = gen_shape(job, train, gen, 16)
    assert shape.sequences == 2  # 16 sequences over 4 x 2 replicas
    kv_seq = 2 * L * H * 2 * 1024  # K and V, bf16, full length
    assert shape.kv_bytes_per_seq == kv_seq
    assert shape.in_flight(1.5 * kv_seq) == 1  # room for one sequence: 2 waves
    t = generation_cost(job, gen, shape, 1, A100, 8).as_dict()
    weights = 2 * P / HBM  # one read of all weights per step
    assert t["decode_weights"] == pytest.approx(512 * weights)
    assert t["kv_waves"] == pytest.approx((2 - 1) * 512 * weights)
    assert t["decode_kv"] == pytest.approx(2 * 512 * kv_seq / 1024 * (512 + 256) / HBM)
    assert t["prefill_compute"] == pytest.approx(2 * 512 * fwd_flops(256) / FLOPS)
    assert t["step_overhead"] == pytest.approx(2 * 512 * 2e-3)
    assert "tp_allreduce" not in t
    one_wave = generation_cost(job, gen, shape, 2, A100, 8).as_dict()
    assert "kv_waves" not in one_wave
    with pytest.raises(DoesNotFit, match="KV cache"):
        generation_cost(job, gen, shape, 0, A100, 8)


def test_generation_tp_allreduce(job):
    train, gen = ParallelLayout(1, 2, 4), GenLayout(1, 2, 1)
    shape = gen_shape(job, train, gen, 16)
    t = generation_cost(job, gen, shape, 4, A100, 8).as_dict()
    pre = 2 * LAT + 4 * 512 * H * 2 / NVLINK
    dec = 2 * LAT + 4 * H * 2 / NVLINK
    assert t["tp_allreduce"] == pytest.approx(L * 2 * (pre + 512 * dec))


def test_table2_volumes_paper_example():
    # 8 GPUs, training 1-4-2, generation 1-2-2-2 (PAPER.md's example)
    M, args = 1000.0, (1, 4, 2, 1, 2)
    assert reshard_bytes_per_rank("hybridengine", M, *args) == pytest.approx((4 - 2) / (2 * 4) * M)
    assert reshard_bytes_per_rank("hybridengine-v", M, *args) == pytest.approx(3 / 4 * M)
    assert reshard_bytes_per_rank("allgather", M, *args) == pytest.approx(7 / 8 * M)
    assert reshard_peak_bytes("hybridengine", M, *args) == pytest.approx(M / 2)
    assert reshard_peak_bytes("hybridengine-v", M, *args) == M
    assert reshard_peak_bytes("allgather", M, *args) == M
    assert redundant_bytes("hybridengine", M, *args) == 0
    assert redundant_bytes("hybridengine-v", M, *args) == pytest.approx(M / 4)
    assert redundant_bytes("allgather", M, *args) == pytest.approx(M / 8)


@pytest.mark.parametrize("p,t,d,pg,tg", [(2, 8, 4, 1, 2), (4, 4, 1, 2, 1), (1, 8, 16, 1, 8)])
def test_table2_formulas(p, t, d, pg, tg):
    M = 7e9
    assert reshard_bytes_per_rank("hybridengine", M, p, t, d, pg, tg) == pytest.approx(
        (t * p - tg * pg) / (tg * pg * t * p) * M
    )
    assert reshard_bytes_per_rank("hybridengine-v", M, p, t, d, pg, tg) == pytest.approx(
        (t * p - 1) / (t * p) * M
    )
    assert reshard_bytes_per_rank("allgather", M, p, t, d, pg, tg) == pytest.approx(
        (t * p * d - 1) / (t * p * d) * M
    )
    # zero redundancy: each rank receives exactly its generation shard minus its training shard
    assert reshard_bytes_per_rank("hybridengine", M, p, t, d, pg, tg) == pytest.approx(
        M / (tg * pg) - M / (t * p)
    )


def test_reshard_time_is_one_micro_dp_allgather():
    M = 1e9
    c = reshard_cost("hybridengine", M, 1, 4, 2, 1, 2, A100, 8, model="tiny").as_dict()
    # micro-DP groups of 2 consecutive ranks; each receives M/4
    assert c["reshard_allgather"] == pytest.approx(LAT + (M / 4) / NVLINK)
    full = reshard_cost("allgather", M, 1, 8, 4, 1, 2, A100, 8, model="tiny").as_dict()
    r = 32  # every rank, across 4 nodes
    assert full["reshard_allgather"] == pytest.approx(
        (r - 1) * LAT + (r - 1) / r * M / (25e9 * 0.7)
    )


def test_bad_reshard_inputs():
    with pytest.raises(ValueError, match="unknown resharding scheme"):
        reshard_bytes_per_rank("zero3", 1.0, 1, 2, 1, 1, 1)
    with pytest.raises(LayoutError):
        reshard_bytes_per_rank("hybridengine", 1.0, 1, 4, 1, 1, 6)  # neither nested nor wider


def test_a_generation_group_wider_than_training():
    """Training tp 2 x pp 2 on 16 GPUs, generating at tp 8 (two training replicas' worth):
    each rank slices the layers of its own stage and gathers those of the other."""
    m = 16e9
    assert reshard_bytes_per_rank("hybridengine", m, 2, 2, 4, 1, 8) == pytest.approx(m / 8 / 2)
    assert reshard_peak_bytes("hybridengine", m, 2, 2, 4, 1, 8) == pytest.approx(m / 4 + m / 8)
    c = reshard_cost("hybridengine", m, 2, 2, 4, 1, 8, A100, 8, model="x").as_dict()
    gathered, _ = collective(A100, "all_gather", m / 8, 2, False)  # pp ranks 8 apart: 2 nodes
    assert c["reshard_allgather"] == pytest.approx(gathered)
    assert c["reshard_slice"] == pytest.approx(2 * m / 8 / HBM)
    train, gen = ParallelLayout(pp=2, tp=2, dp=4), GenLayout(1, 8, 1)
    gen.check(16, train)  # decoupled: allowed
    assert gen.decoupled(train) and gen_shape(JOB7B, train, gen, 64).replicas == 2


def test_collective_roofline_degenerate_cases():
    assert collective(A100, "all_reduce", 1e6, 1, True) == (0.0, "roofline")
    s, src = collective(A100, "all_gather", 8e6, 4, True)
    assert src == "roofline" and s == pytest.approx(3 * LAT + 3 / 4 * 8e6 / NVLINK)
    assert math.isclose(collective(A100, "broadcast", 1e6, 2, False)[0], LAT + 1e6 / (25e9 * 0.7))


def test_compute_follows_the_mean_prompt_memory_the_longest():
    long = Job.create("grpo", "llama-2-7b", 2048, 512, 16, n_samples=4, reward="rule")
    short = Job.create(
        "grpo", "llama-2-7b", 2048, 512, 16, n_samples=4, reward="rule", prompt_mean=200
    )
    assert short.mean_seq_len == 712 and short.seq_len == long.seq_len == 2560
    assert short.tokens_per_iteration == 64 * 712
    lay = ParallelLayout(pp=1, tp=2, dp=4)
    a, b = (train_cost(j, "actor", lay, A100, 8).as_dict() for j in (long, short))
    assert b["train_compute"] < a["train_compute"] * 712 / 2560 * 1.05
    assert (
        stage_memory(short, "actor", lay, "train").bytes
        == stage_memory(long, "actor", lay, "train").bytes
    )
    with pytest.raises(ValueError, match="prompt_mean"):
        Job.create("grpo", "llama-2-7b", 256, 512, 16, n_samples=4, prompt_mean=300)


def test_fsdp_shards_weights_and_gradients_too(job):
    lay = ParallelLayout(pp=1, tp=1, dp=8)
    fsdp = MemorySettings(fsdp=True)
    n = P  # pp 1, tp 1: the whole model per rank before sharding
    got = resident_memory(job, "actor", lay, fsdp).as_dict()
    per_layer = (P - 2 * V * H - H) / L
    assert got == pytest.approx(
        {
            "weights": 4 * n / 8,
            "grads": 4 * n / 8,
            "optimizer": 8 * n / 8,
            "fsdp_gathered": 4 * per_layer,
        }
    )
    t = train_cost(job, "actor", lay, A100, 8, fsdp).as_dict()
    assert "fsdp_comm" in t and "dp_grad_sync" not in t
    assert t["optimizer"] == pytest.approx(2 * n / 8 * 30 / HBM)
    with pytest.raises(LayoutError, match="fsdp"):
        train_cost(job, "actor", ParallelLayout(pp=2, tp=1, dp=4), A100, 8, fsdp)


def test_fsdp_weights_go_to_vllm_whole():
    """FSDP-sharded weights are gathered parameter by parameter: the generation buffer is
    vLLM's own tp shard, with no swap."""
    m = 16e9
    extra, swap, c = actor_reshard(
        "hybridengine", m, ParallelLayout(dp=8), GenLayout(1, 2, 4), A100, 8, model="x", fsdp=True
    )
    assert (extra, swap) == (m / 2, 0.0)
    assert c.as_dict()["fsdp_gather"] == pytest.approx(
        collective(A100, "all_gather", m, 8, True)[0]
    )
