"""Training and inference (forward-only) predictors of one model on one 3D layout.

Rank order is hybridflow.layout's (megatron's): TP innermost, then CP, DP, PP; the devices a
group spans come from ParallelLayout.span and stride. A trained role's MemorySettings decide
the micro-batches (one sequence, or sequences packed to a token budget), the optimizer's
gradient exchange (distributed optimizer: reduce-scatter of the gradients and all-gather of
the weights; else an all-reduce), recomputation and host offload (train_memory.py holds the
bytes). Compute follows the tokens really produced (prompt + mean response) and, for
mixture-of-experts models, the active parameters; a pipeline runs at its slowest stage (the
LM head's stage; uneven stages balance it), each micro-batch crossing every stage boundary.
"""

from __future__ import annotations

import math

from hybridflow.layout import LayoutError, ParallelLayout, check_model_fits
from hybridflow.memory import DEFAULT, MemorySettings
from hybridflow.simulator.costs import Cost, collective, cost
from hybridflow.simulator.job import Job
from hybridflow.simulator.moe import moe_alltoall_seconds
from hybridflow.simulator.profile import Profile, interpolate
from hybridflow.simulator.train_memory import (
    GRAD_BYTES,
    MASTER_BYTES,
    MOMENT_BYTES,
    head_layers,
    rank_expert_params,
    rank_params,
    stage_split,
    train_micro_batches,
)
from hybridflow.simulator.training_measured import measured_infer, measured_train
from hybridflow.vocab import VALUE_ROLES

WEIGHT_BYTES = 2
SELECTIVE_RECOMPUTE_BYTES = 8  # per token, hidden and layer: the MLP activation re-run


def flops_per_token(job: Job, role: str, context: float) -> float:
    """Forward FLOPs per token; value models replace the LM head with a scalar head."""
    spec = job.spec(role)
    f = spec.flops_per_token(int(context))
    if role in VALUE_ROLES:
        f -= 2.0 * (spec.vocab - 1) * spec.hidden
    return f


def check_ep(job: Job, role: str, layout: ParallelLayout) -> None:
    spec = job.spec(role)
    if layout.ep > 1 and (not spec.is_moe or spec.experts % layout.ep):
        raise LayoutError(
            f"{role}: ep={layout.ep} does not divide the model's {spec.experts} experts"
        )


def role_params(job: Job, role: str, ep: int = 1) -> int:
    """Parameters one rank of an expert-parallel group of `ep` holds (before tp and pp
    divide them): everything but the routed experts, and 1/ep of those."""
    if job.is_rule(role):
        return 0
    routed = job.spec(role).routed_expert_params
    return job.params(role) - routed + routed // ep


def expert_share(job: Job, role: str, ep: int = 1) -> int:
    """The routed-expert part of role_params (reduced over dp/ep ranks, not dp)."""
    return 0 if job.is_rule(role) else job.spec(role).routed_expert_params // ep


def check_layout(job: Job, role: str, layout: ParallelLayout) -> None:
    spec = job.spec(role)
    check_model_fits(spec.layers, spec.heads, spec.kv_heads, layout.pp, layout.tp)
    check_ep(job, role, layout)

    per_update = job.sequences // job.mini_batches
    if layout.dp > per_update:
        raise LayoutError(
            f"{role}: dp={layout.dp} exceeds the {per_update} sequences of a "
            f"mini-batch (a data-parallel rank would have no data)"
        )


# What the controller sends each worker per sequence and token (int64): infer calls carry
# input_ids, attention_mask, responses, response_mask; train calls add log-probs, reference
# log-probs, advantages, returns and values (float32, counted as 8 bytes, an upper bound).
DISPATCH_FIELDS = {"infer": 4, "train": 9}


def dispatch_cost(job: Job, sequences: int, kind: str, profile: Profile) -> Cost:
    """The single controller's call to a worker group (Ray round trip carrying the batch):
    a measured per-call cost from the profile, none when the profile has no such table."""
    nbytes = sequences * job.seq_len * 8 * DISPATCH_FIELDS[kind]
    return cost(("dispatch", profile.overheads.dispatch(nbytes), "measured"))


def _intra(gpn: int, span: int) -> bool:
    return span <= gpn


def _compute(
    job: Job,
    role: str,
    layout: ParallelLayout,
    profile: Profile,
    tokens: float,
    per_micro: float,
    passes: int,
) -> tuple[float, str]:
    """Seconds of `passes` x forward FLOPs over `tokens` (of one data-parallel rank, in
    micro-batches of `per_micro` tokens) on one model-parallel group and its cp ranks."""
    spec = job.spec(role)
    m = profile.measured
    seq = job.mean_seq_len
    if m.train_layer and m.train_layer_model == spec.name and layout.tp == 1 and layout.cp == 1:
        per_seq = interpolate(m.train_layer, seq) * spec.layers / layout.pp * profile.slowdown
        return per_seq * (tokens / seq) * passes / 3.0, "measured"  # table is fwd+bwd
    thr, src = profile.matmul_flops(per_micro / layout.cp, spec.hidden / layout.tp, spec.hidden)
    work = tokens * passes * flops_per_token(job, role, seq / 2)
    return work / (layout.model_parallel * layout.cp) / thr, src


def _tp_pp_comm(
    job: Job,
    role: str,
    layout: ParallelLayout,
    profile: Profile,
    gpn: int,
    micro_total: float,
    per_micro: float,
    allreduces_per_layer: int,
    p2p_per_micro: int,
) -> tuple[tuple[float, str], tuple[float, str]]:
    """Tensor-parallel all-reduces of each layer's activations, and each micro-batch's
    point-to-point send across each stage boundary (forward, and back in training)."""
    spec = job.spec(role)
    act = per_micro / layout.cp * spec.hidden * WEIGHT_BYTES
    ar, ar_src = collective(profile, "all_reduce", act, layout.tp, _intra(gpn, layout.span("tp")))
    tp = micro_total * spec.layers / layout.pp * allreduces_per_layer * ar
    pp = 0.0, "roofline"
    if layout.pp > 1:
        # two neighbouring stages
        p2p, src = collective(profile, "p2p", act, 2, _intra(gpn, 2 * layout.stride("pp")))
        pp = micro_total * p2p_per_micro * p2p, src
    return (tp, ar_src), pp


def _pipeline_terms(
    job: Job,
    role: str,
    layout: ParallelLayout,
    work: float,
    per_micro_extra: float,
    micro_total: int,
    steps: int,
) -> tuple[float, float]:
    """(imbalance, bubble) seconds of a pipeline doing `work` seconds of compute spread
    over its stages (as if even) in `micro_total` micro-batches over `steps` flushes: the
    slowest stage sets the pace (uneven layers, the LM head on the last stage), and each
    1F1B flush idles (pp - 1) micro-batch times of that stage."""
    if layout.pp == 1:
        return 0.0, 0.0
    spec, value = job.spec(role), role in VALUE_ROLES
    split = stage_split(spec, layout.pp, value)
    head = head_layers(spec, value)
    loads = [n + (head if s == layout.pp - 1 else 0.0) for s, n in enumerate(split)]
    factor = max(loads) / (sum(loads) / layout.pp)
    imbalance = work * (factor - 1.0)
    bubble = steps * (layout.pp - 1) * (work * factor / micro_total + per_micro_extra)
    return imbalance, bubble


def _grad_sync(
    job: Job, role: str, layout: ParallelLayout, profile: Profile, gpn: int, mem: MemorySettings
) -> tuple[float, str]:
    """One optimizer step's data-parallel exchange: an all-reduce of the fp32 gradients, or
    with the distributed optimizer a reduce-scatter of them and an all-gather of the updated
    bf16 weights (a reduce-scatter moves what an all-gather does); routed experts over the
    dp / ep ranks that replicate them."""
    spec, ranks = job.spec(role), layout.dp * layout.cp
    shard = rank_params(spec, layout, 0, role in VALUE_ROLES)
    experts = rank_expert_params(spec, layout, 0)
    intra = _intra(gpn, layout.span("dp"))
    out, src = 0.0, "roofline"
    for n, r in ((shard - experts, ranks), (experts, ranks // layout.ep)):
        if mem.distributed_optimizer:
            rs, src = collective(profile, "all_gather", GRAD_BYTES * n, r, intra)
            ag, _ = collective(profile, "all_gather", WEIGHT_BYTES * n, r, intra)
            out += rs + ag
        else:
            ar, src = collective(profile, "all_reduce", GRAD_BYTES * n, r, intra)
            out += ar
    return out, src


BUCKET_PARAMS = 40_000_000  # megatron-core DDP's default bucket (bucket_size)


def exposed_sync(
    seconds: float, backward: float, job: Job, role: str, layout: ParallelLayout
) -> float:
    """What one step's data-parallel exchange adds to the step: megatron's and FSDP's
    bucketed exchange overlaps the backward pass (overlap_grad_reduce; the weights'
    all-gather overlaps the next forward), all but the last bucket's share, and whatever
    outlasts the backward pass."""
    n = rank_params(job.spec(role), layout, 0, role in VALUE_ROLES)
    last = seconds * min(1.0, BUCKET_PARAMS / max(n, 1))
    return max(seconds - backward, last)


def _fsdp_comm(
    job: Job,
    role: str,
    layout: ParallelLayout,
    profile: Profile,
    gpn: int,
    compute: float,
    micro: int,
) -> tuple[float, str]:
    """One step of FSDP2 (per optimizer step; the caller multiplies by the steps): each
    micro-batch gathers every layer's bf16 weights for its forward and again for its
    backward, and reduce-scatters the fp32 gradients; prefetching hides it behind the
    compute of the layers before, but for the first layer's gather and what outlasts it."""
    if layout.pp > 1:
        raise LayoutError(f"{role}: fsdp runs without pipeline parallelism, got pp={layout.pp}")
    spec, ranks = job.spec(role), layout.dp * layout.cp
    n = rank_params(spec, layout, 0, role in VALUE_ROLES)
    intra = _intra(gpn, layout.span("dp"))
    gather, src = collective(profile, "all_gather", WEIGHT_BYTES * n, ranks, intra)
    scatter, _ = collective(profile, "all_gather", GRAD_BYTES * n, ranks, intra)
    per_micro = 2 * gather + scatter
    steps = job.ppo_epochs * job.mini_batches
    compute_micro = compute / (steps * micro)
    exposed = max(per_micro - compute_micro, per_micro / spec.layers)
    return micro * exposed, src


def _optimizer(
    job: Job, role: str, layout: ParallelLayout, profile: Profile, mem: MemorySettings, steps: int
) -> tuple[tuple[str, float, str], ...]:
    """Adam over this rank's share (all of it, or 1/(dp x cp) with the distributed
    optimizer): on the GPU at memory speed, reading the fp32 gradient, reading and writing
    master weights and moments, writing the bf16 weight; or (offload) on the host, the
    gradient going down and the weight coming back each step, and the weights moved off and
    back once an iteration."""
    spec, value = job.spec(role), role in VALUE_ROLES
    n = rank_params(spec, layout, 0, value)
    sharded = mem.distributed_optimizer or mem.fsdp
    n_opt = n / (layout.dp * layout.cp) if sharded else n
    touched = n_opt * (GRAD_BYTES + 2 * (MASTER_BYTES + MOMENT_BYTES) + WEIGHT_BYTES)
    if not mem.offload:
        return (("optimizer", steps * profile.memory_seconds(touched), "roofline"),)
    if not profile.host_bandwidth:
        raise LayoutError(
            f"{role}: offload needs the profile's host_bandwidth, which {profile.name} lacks"
        )
    on_gpu = n_opt if mem.fsdp else n  # the weights an iteration moves off and back
    moved = steps * n_opt * (GRAD_BYTES + WEIGHT_BYTES) + 2 * WEIGHT_BYTES * on_gpu
    return (
        # estimate: the host's Adam streams its state at about the host link's rate
        ("offload_optimizer_step", steps * touched / profile.host_bandwidth, "formula"),
        ("offload_transfer", moved / profile.host_bandwidth, "formula"),
    )


def train_cost(
    job: Job,
    role: str,
    layout: ParallelLayout,
    profile: Profile,
    gpn: int,
    mem: MemorySettings = DEFAULT,
) -> Cost:
    """PPO updates: ppo_epochs x mini_batches optimizer steps over all sequences."""
    check_layout(job, role, layout)
    measured = measured_train(job, role, layout, profile)
    if measured is not None:
        steps_s = measured.as_dict().get("train_steps", 0.0)
        tokens = job.ppo_epochs * job.sequences / layout.dp * job.mean_seq_len
        again = _recompute(job, role, layout, profile, steps_s, tokens, mem)
        return measured + cost(("recompute", again, "measured" if again else "formula"))
    micro = train_micro_batches(job, layout, mem)
    steps = job.ppo_epochs * job.mini_batches
    tokens = steps * math.ceil(job.sequences / (job.mini_batches * layout.dp)) * job.mean_seq_len
    per_micro = tokens / (steps * micro)
    comp, comp_src = _compute(job, role, layout, profile, tokens, per_micro, 3)
    (tp, tp_src), (pp, pp_src) = _tp_pp_comm(
        job, role, layout, profile, gpn, steps * micro, per_micro, 4, 2
    )
    cp = _cp_exchange(job, role, layout, profile, gpn, steps * micro, per_micro, 3)
    a2a = _alltoall(job, role, layout, profile, gpn, tokens / layout.cp, 4)
    recompute = _recompute(job, role, layout, profile, comp, tokens, mem)
    imbalance, bubble = _pipeline_terms(
        job, role, layout, comp + recompute, (tp + a2a + cp) / (steps * micro), steps * micro, steps
    )
    if mem.fsdp:
        grad, grad_src = _fsdp_comm(job, role, layout, profile, gpn, comp + recompute, micro)
    else:
        grad, grad_src = _grad_sync(job, role, layout, profile, gpn, mem)
        grad = exposed_sync(grad, (comp + recompute) * 2 / 3 / steps, job, role, layout)
    return cost(
        ("train_compute", comp, comp_src),
        ("recompute", recompute, comp_src),
        ("tp_allreduce", tp, tp_src),
        ("cp_kv_exchange", cp, tp_src),
        ("pp_p2p", pp, pp_src),
        ("ep_alltoall", a2a),
        ("pp_imbalance", imbalance, comp_src),
        ("pp_bubble", bubble, comp_src),
        ("fsdp_comm" if mem.fsdp else "dp_grad_sync", steps * grad, grad_src),
        *_optimizer(job, role, layout, profile, mem, steps),
    ) + dispatch_cost(job, job.sequences, "train", profile)


def _recompute(
    job: Job,
    role: str,
    layout: ParallelLayout,
    profile: Profile,
    comp: float,
    tokens: float,
    mem: MemorySettings,
) -> float:
    """Full recomputation re-runs each layer's forward (a third of fwd + bwd); selective
    re-runs the MLP activation (memory-bound)."""
    if mem.recompute == "full":
        return comp / 3.0
    if mem.recompute == "selective":
        spec = job.spec(role)
        per_rank = tokens / layout.cp * spec.hidden / layout.tp * spec.layers / layout.pp
        return profile.memory_seconds(SELECTIVE_RECOMPUTE_BYTES * per_rank)
    return 0.0


def _cp_exchange(
    job: Job,
    role: str,
    layout: ParallelLayout,
    profile: Profile,
    gpn: int,
    micro_total: float,
    per_micro: float,
    passes: int,
) -> float:
    """Context parallelism's ring attention: each layer passes every rank's keys and values
    round the cp group, in the forward and twice in the backward pass (not overlapped)."""
    if layout.cp == 1:
        return 0.0
    spec = job.spec(role)
    kv = spec.kv_bytes_per_token(WEIGHT_BYTES) / spec.layers / layout.tp * per_micro
    ag, _ = collective(profile, "all_gather", kv, layout.cp, _intra(gpn, layout.span("cp")))
    return micro_total * spec.layers / layout.pp * passes * ag


def _alltoall(
    job: Job,
    role: str,
    layout: ParallelLayout,
    profile: Profile,
    gpn: int,
    tokens: float,
    passes: int,
) -> float:
    """Expert-parallel dispatch and combine of `tokens` tokens of one dp rank: its ep peers
    are the next data-parallel ranks, tp devices apart."""
    return moe_alltoall_seconds(
        profile, job.spec(role), tokens, layout.ep, layout.tp, layout.pp, gpn, passes
    )


def infer_cost(
    job: Job, role: str, layout: ParallelLayout, profile: Profile, gpn: int, sequences: int
) -> Cost:
    """Forward passes over `sequences` (log-probs, values or scores), one sequence a
    micro-batch."""
    spec = job.spec(role)
    check_model_fits(spec.layers, spec.heads, spec.kv_heads, layout.pp, layout.tp)
    check_ep(job, role, layout)
    measured = measured_infer(job, role, layout, profile, sequences)
    if measured is not None:
        return measured
    micro = math.ceil(sequences / layout.dp)
    tokens = micro * job.mean_seq_len
    comp, comp_src = _compute(job, role, layout, profile, tokens, job.mean_seq_len, 1)
    (tp, tp_src), (pp, pp_src) = _tp_pp_comm(
        job, role, layout, profile, gpn, micro, job.mean_seq_len, 2, 1
    )
    cp = _cp_exchange(job, role, layout, profile, gpn, micro, job.mean_seq_len, 1)
    a2a = _alltoall(job, role, layout, profile, gpn, tokens / layout.cp, 2)
    imbalance, bubble = _pipeline_terms(job, role, layout, comp, (tp + a2a + cp) / micro, micro, 1)
    return cost(
        ("infer_compute", comp, comp_src),
        ("tp_allreduce", tp, tp_src),
        ("cp_kv_exchange", cp, tp_src),
        ("pp_p2p", pp, pp_src),
        ("ep_alltoall", a2a),
        ("pp_imbalance", imbalance, comp_src),
        ("pp_bubble", bubble, comp_src),
    ) + dispatch_cost(job, sequences, "infer", profile)
