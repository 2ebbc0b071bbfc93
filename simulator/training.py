"""Training and inference (forward-only) predictors of one model on one 3D layout.

Rank order is hybridflow.layout's (megatron's): TP innermost, then DP, then PP; the devices a
group spans come from ParallelLayout.span and stride. One micro-batch is one sequence. bf16
weights, fp32 gradients, fp32 Adam (master copy, m, v) as in the paper. Compute follows the
tokens really produced (prompt + mean response) and, for mixture-of-experts models, the
active parameters; memory follows the longest sequence and every parameter, the routed
experts divided over the layout's ep ranks.
"""

from __future__ import annotations

import math

from hybridflow.layout import LayoutError, ParallelLayout, check_model_fits
from hybridflow.simulator.costs import Cost, Memory, collective, cost, memory
from hybridflow.simulator.job import Job
from hybridflow.simulator.moe import moe_alltoall_seconds
from hybridflow.simulator.profile import Profile, interpolate
from hybridflow.vocab import TRAINED_ROLES, VALUE_ROLES

WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 2, 4, 12
ACT_BYTES_PER_TOKEN_HIDDEN = 34  # per layer, bf16, flash attention (Korthikanti et al. 2022)
LOGIT_BYTES = 4  # fp32 logits for log-probs


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


def resident_memory(job: Job, role: str, layout: ParallelLayout) -> Memory:
    """Bytes per GPU held for the whole iteration."""
    shard = role_params(job, role, layout.ep) / layout.model_parallel
    if role in TRAINED_ROLES:
        return memory(
            weights=WEIGHT_BYTES * shard, grads=GRAD_BYTES * shard, adam=ADAM_BYTES * shard
        )
    return memory(weights=WEIGHT_BYTES * shard)


def _micro(job: Job, layout: ParallelLayout) -> int:
    return math.ceil(job.sequences / (job.mini_batches * layout.dp))


def stage_memory(job: Job, role: str, layout: ParallelLayout, kind: str) -> Memory:
    """Transient bytes per GPU during a train or infer stage (1F1B keeps up to pp
    micro-batches of activations on the first stage)."""
    spec = job.spec(role)
    per_layer = ACT_BYTES_PER_TOKEN_HIDDEN * spec.hidden / layout.tp * job.seq_len
    logits = 0.0 if role in VALUE_ROLES else job.seq_len * spec.vocab / layout.tp * LOGIT_BYTES
    if kind == "train":
        in_flight = min(layout.pp, _micro(job, layout))
        return memory(
            activations=spec.layers / layout.pp * per_layer * in_flight, logits=2 * logits
        )
    return memory(activations=per_layer, logits=logits)


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
    job: Job, role: str, layout: ParallelLayout, profile: Profile, tokens: float, passes: int
) -> tuple[float, str]:
    """Seconds of `passes` x forward FLOPs over `tokens` on one model-parallel group."""
    spec = job.spec(role)
    m = profile.measured
    seq = job.mean_seq_len
    if m.train_layer and m.train_layer_model == spec.name and layout.tp == 1:
        per_seq = interpolate(m.train_layer, seq) * spec.layers / layout.pp * profile.slowdown
        return per_seq * (tokens / seq) * passes / 3.0, "measured"  # table is fwd+bwd
    thr, src = profile.matmul_flops(seq, spec.hidden / layout.tp, spec.hidden)
    work = tokens * passes * flops_per_token(job, role, seq / 2)
    return work / layout.model_parallel / thr, src


def _tp_pp_comm(
    job: Job,
    role: str,
    layout: ParallelLayout,
    profile: Profile,
    gpn: int,
    micro_total: float,
    allreduces_per_layer: int,
    p2p_per_micro: int,
) -> tuple[tuple[float, str], tuple[float, str]]:
    spec = job.spec(role)
    act = job.mean_seq_len * spec.hidden * WEIGHT_BYTES
    ar, ar_src = collective(profile, "all_reduce", act, layout.tp, _intra(gpn, layout.span("tp")))
    tp = micro_total * spec.layers / layout.pp * allreduces_per_layer * ar
    pp = 0.0, "roofline"
    if layout.pp > 1:
        # two neighbouring stages
        p2p, src = collective(profile, "p2p", act, 2, _intra(gpn, 2 * layout.stride("pp")))
        pp = micro_total * p2p_per_micro * p2p, src
    return (tp, ar_src), pp


def _measured_calls(job: Job, role: str, layout: ParallelLayout, profile: Profile) -> bool:
    return profile.calls.applies(job.spec(role).name) and layout.ep == 1


def measured_train(job: Job, role: str, layout: ParallelLayout, profile: Profile) -> Cost | None:
    """The executor's update call from the profile's per-call tables: ppo_epochs x
    mini_batches optimizer steps of this DP rank's share, and the controller's dispatch;
    None where the tables have no row for this model, layout and set size."""
    if not _measured_calls(job, role, layout, profile):
        return None
    calls = profile.calls
    per_rank = math.ceil(job.sequences / (job.mini_batches * layout.dp))
    step = calls.train_step(
        layout.n_gpus,
        layout.tp,
        layout.pp,
        calls.same_work(per_rank, job.seq_len),
        role in VALUE_ROLES,
    )
    disp = calls.dispatch("train", layout.n_gpus, job.sequences)
    if step is None or disp is None:
        return None
    steps = job.ppo_epochs * job.mini_batches
    return cost(
        ("train_steps", steps * (step[0] - step[1]), "measured"),
        ("optimizer_steps", steps * step[1], "measured"),
        ("dispatch", disp, "measured"),
    )


def measured_infer(
    job: Job, role: str, layout: ParallelLayout, profile: Profile, sequences: int
) -> Cost | None:
    """Forward calls of the executor (one per batch of the job's sequences: ReMax scores
    its greedy baseline in a call of its own) from the per-call tables, or None."""
    if not _measured_calls(job, role, layout, profile):
        return None
    calls = profile.calls
    n_calls = math.ceil(sequences / job.sequences)
    per_call = sequences / n_calls
    fwd = calls.forward(
        layout.n_gpus,
        layout.tp,
        layout.pp,
        calls.same_work(math.ceil(per_call / layout.dp), job.seq_len),
        role in VALUE_ROLES,
    )
    disp = calls.dispatch("forward", layout.n_gpus, per_call)
    if fwd is None or disp is None:
        return None
    return cost(
        ("forward_calls", n_calls * fwd, "measured"), ("dispatch", n_calls * disp, "measured")
    )


def train_cost(job: Job, role: str, layout: ParallelLayout, profile: Profile, gpn: int) -> Cost:
    """PPO updates: ppo_epochs x mini_batches optimizer steps over all sequences."""
    check_layout(job, role, layout)
    measured = measured_train(job, role, layout, profile)
    if measured is not None:
        return measured
    micro = _micro(job, layout)
    steps = job.ppo_epochs * job.mini_batches
    micro_total = steps * micro
    tokens = micro_total * job.mean_seq_len
    comp, comp_src = _compute(job, role, layout, profile, tokens, 3)
    (tp, tp_src), (pp, pp_src) = _tp_pp_comm(job, role, layout, profile, gpn, micro_total, 4, 2)
    a2a = _alltoall(job, role, layout, profile, gpn, tokens, 4)
    bubble = (layout.pp - 1) / micro * (comp + tp + a2a)
    shard = role_params(job, role, layout.ep) / layout.model_parallel
    experts = expert_share(job, role, layout.ep) / layout.model_parallel
    intra = _intra(gpn, layout.span("dp"))
    grad, grad_src = collective(
        profile, "all_reduce", GRAD_BYTES * (shard - experts), layout.dp, intra
    )
    # each rank's experts are replicated over dp/ep ranks only
    grad_e, _ = collective(
        profile, "all_reduce", GRAD_BYTES * experts, layout.dp // layout.ep, intra
    )
    # Adam reads bf16 weights, fp32 grads and 3 fp32 states, writes weights and states
    opt = profile.memory_seconds(
        shard * (WEIGHT_BYTES + GRAD_BYTES + 2 * ADAM_BYTES + WEIGHT_BYTES)
    )
    return cost(
        ("train_compute", comp, comp_src),
        ("tp_allreduce", tp, tp_src),
        ("pp_p2p", pp, pp_src),
        ("ep_alltoall", a2a),
        ("pp_bubble", bubble, comp_src),
        ("dp_grad_reduce", steps * (grad + grad_e), grad_src),
        ("optimizer", steps * opt),
    ) + dispatch_cost(job, job.sequences, "train", profile)


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
    """Forward passes over `sequences` (log-probs, values or scores)."""
    check_model_fits(
        job.spec(role).layers, job.spec(role).heads, job.spec(role).kv_heads, layout.pp, layout.tp
    )
    check_ep(job, role, layout)
    measured = measured_infer(job, role, layout, profile, sequences)
    if measured is not None:
        return measured
    micro = math.ceil(sequences / layout.dp)
    tokens = micro * job.mean_seq_len
    comp, comp_src = _compute(job, role, layout, profile, tokens, 1)
    (tp, tp_src), (pp, pp_src) = _tp_pp_comm(job, role, layout, profile, gpn, micro, 2, 1)
    a2a = _alltoall(job, role, layout, profile, gpn, tokens, 2)
    bubble = (layout.pp - 1) / micro * (comp + tp + a2a)
    return cost(
        ("infer_compute", comp, comp_src),
        ("tp_allreduce", tp, tp_src),
        ("pp_p2p", pp, pp_src),
        ("ep_alltoall", a2a),
        ("pp_bubble", bubble, comp_src),
    ) + dispatch_cost(job, sequences, "infer", profile)
