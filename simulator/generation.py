"""Actor generation on its generation layout (pg, tg) replicated d x micro_dp times.

Prefill is compute-bound; decode reads the weights once per step (memory-bound) and the KV
cache of the sequences in flight. The KV cache takes the memory left free; fewer sequences
in flight means more waves, each re-reading the weights for every decode step. A wave lasts
as long as its longest response; the KV reads and FLOPs follow the tokens produced.
Mixture-of-experts actors generate with their training layout's expert split (ep ranks
along data parallelism, tp devices apart): each GPU holds 1/ep of the routed experts and a
decode step reads only those its batch uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybridflow.layout import GenLayout, ParallelLayout, check_model_fits
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.costs import GIB, Cost, DoesNotFit, Memory, collective, cost, memory
from hybridflow.simulator.job import Job
from hybridflow.simulator.moe import moe_alltoall_seconds, touched_fraction
from hybridflow.simulator.profile import Profile, interpolate
from hybridflow.simulator.training import WEIGHT_BYTES, expert_share, flops_per_token, role_params


@dataclass(frozen=True)
class GenShape:
    """Per-replica quantities of one generation layout that do not depend on memory."""

    sequences: int  # per replica
    weight_bytes: float  # per GPU
    kv_bytes_per_seq: float  # per GPU, full prompt + response length
    expert_bytes: float = 0.0  # the routed experts' part of weight_bytes
    ep: int = 1  # expert parallel ranks (the training layout's)
    ep_stride: int = 1  # devices between two of them
    replicas: int = 1  # generation replicas of the set (training dp x micro_dp)

    def in_flight(self, kv_budget: float) -> int:
        if kv_budget >= self.sequences * self.kv_bytes_per_seq:
            return self.sequences
        return int(max(kv_budget, 0.0) // self.kv_bytes_per_seq)


def gen_shape(job: Job, train: ParallelLayout, gen: GenLayout, sequences: int) -> GenShape:
    spec = job.spec("actor")
    check_model_fits(spec.layers, spec.heads, spec.kv_heads, gen.pp, gen.tp, replicate_kv=True)
    replicas = train.n_gpus // gen.model_parallel  # dp x micro_dp, or fewer and wider
    kv = kv_bytes_per_gpu(spec, gen) * job.seq_len
    mp = gen.model_parallel
    return GenShape(
        math.ceil(sequences / replicas),
        WEIGHT_BYTES * role_params(job, "actor", train.ep) / mp,
        kv,
        WEIGHT_BYTES * expert_share(job, "actor", train.ep) / mp,
        train.ep,
        train.stride("dp"),  # ep ranks are data-parallel ranks
        replicas,
    )


def kv_bytes_per_gpu(spec: ModelSpec, gen: GenLayout) -> float:
    """One token's KV cache on one GPU as vLLM keeps it: KV heads split over tp, each
    copied to tp / kv_heads ranks when tp exceeds them; MLA's latent on every tp rank;
    layers split over pp (the largest stage of an uneven split)."""
    layers = math.ceil(spec.layers / gen.pp)
    per_layer = spec.kv_bytes_per_token(WEIGHT_BYTES) / spec.layers
    share = 1.0 if spec.is_mla else max(1.0 / gen.tp, 1.0 / spec.kv_heads)
    return per_layer * layers * share


VLLM_BATCHED_TOKENS = 8192  # vLLM's default max_num_batched_tokens (V1 engine)


def vllm_workspace_bytes(spec: ModelSpec, gen: GenLayout) -> float:
    """What vLLM keeps back from the KV cache for a forward pass of its largest batch
    (it profiles this peak at start-up): the hidden states and the MLP's intermediate
    activations of max_num_batched_tokens tokens on one tp rank, bf16."""
    width = max(spec.ffn, spec.expert_ffn * max(spec.experts_per_token, 1))
    per_token = (4 * spec.hidden + 2 * width / gen.tp) * WEIGHT_BYTES
    return VLLM_BATCHED_TOKENS * per_token


def kv_memory(shape: GenShape, in_flight: int) -> Memory:
    return memory(kv_cache=in_flight * shape.kv_bytes_per_seq)


def _measured(
    job: Job, profile: Profile, shape: GenShape, n: int, waves: int, steps: float
) -> Cost | None:
    m = profile.measured
    if not m.decode or m.generate_model != job.spec("actor").name:
        return None
    prefill = (
        interpolate(tuple((b * t, s) for b, t, s in m.prefill), n * job.prompt_len)
        * waves
        * profile.slowdown
    )
    batches = sorted({b for b, _, _ in m.decode}, key=lambda b: abs(math.log(b / n)))
    rows = tuple((c, s) for b, c, s in m.decode if b == batches[0])
    step = interpolate(rows, job.prompt_len + job.lengths.mean / 2) * profile.slowdown
    return cost(
        ("prefill_measured", prefill, "measured"), ("decode_measured", steps * step, "measured")
    )


def decode_steps(
    job: Job, sequences: int, in_flight: int, group: int = 1
) -> tuple[int, float, float]:
    """(waves, steps of a full wave, steps of all waves): each wave lasts as long as the
    expected longest of its responses (the stragglers), over the `group` replicas that
    step together (an expert-parallel group exchanges tokens at every step)."""
    waves = math.ceil(sequences / in_flight)
    last = sequences - (waves - 1) * in_flight
    full = job.lengths.expected_max(in_flight * group)
    return waves, full, (waves - 1) * full + job.lengths.expected_max(last * group)


def generation_cost(
    job: Job, gen: GenLayout, shape: GenShape, in_flight: int, profile: Profile, gpn: int
) -> Cost:
    """Seconds to generate this replica's sequences with `in_flight` KV slots, and the
    controller's generate call(s) (ReMax adds a greedy generation) where measured."""
    calls = 2 if job.dataflow.greedy_baseline else 1
    measured = measured_generation(job, gen, shape, in_flight, profile, calls)
    if measured is not None:
        return measured
    call = profile.overheads.dispatch(job.global_batch * job.prompt_len * 8)
    return _generation(job, gen, shape, in_flight, profile, gpn) + cost(
        ("dispatch", calls * call, "measured")
    )


GREEDY_RESHARD = "greedy_reshard"  # ReMax's second generate call reshards again


def measured_generation(
    job: Job, gen: GenLayout, shape: GenShape, in_flight: int, profile: Profile, calls: int
) -> Cost | None:
    """The executor's generate call(s) from the profile's per-call tables: vLLM's first
    token (prefill and the call's own work), the decode steps up to the longest response,
    the micro-DP gather of the results, and the controller's dispatch; a KV cache too small
    for the replica's sequences generates in waves; a second call (ReMax's greedy baseline)
    reshards again (`greedy_reshard`, a reshard-stage term). None where the tables do not
    apply."""
    table = profile.calls
    if not table.applies(job.spec("actor").name) or gen.pp != 1 or shape.ep != 1:
        return None
    ranks = shape.replicas * gen.tp
    per_call = math.ceil(job.sequences / shape.replicas)  # one call's sequences per replica
    n = max(1, min(in_flight, per_call))
    waves = math.ceil(per_call / n)
    # the call returns with its slowest replica: a wave lasts as long as the longest
    # response of that wave over every replica
    got = table.generate(
        ranks, gen.tp, gen.micro_dp, n, job.lengths.expected_max(n * shape.replicas), job.prompt_len
    )
    disp = table.dispatch("generate", ranks, job.global_batch)
    if got is None or disp is None:
        return None
    first, decode, gather = got
    again = (calls - 1) * (table.reshard(ranks, gen.tp, gen.micro_dp) or 0.0)
    return cost(
        ("vllm_first_token", calls * waves * first, "measured"),
        ("vllm_decode", calls * waves * decode, "measured"),
        ("micro_dp_gather", calls * gather, "measured"),
        ("dispatch", calls * disp, "measured"),
        (GREEDY_RESHARD, again, "measured"),
    )


def _generation(
    job: Job, gen: GenLayout, shape: GenShape, in_flight: int, profile: Profile, gpn: int
) -> Cost:
    if in_flight < 1:
        raise DoesNotFit(
            f"actor generation tp={gen.tp} pp={gen.pp}: no memory left for the "
            f"KV cache of one sequence ({shape.kv_bytes_per_seq / GIB:.2f} GiB)"
        )
    spec = job.spec("actor")
    waves, first, steps = decode_steps(job, shape.sequences, in_flight, shape.ep)
    if gen.model_parallel == 1:
        measured = _measured(job, profile, shape, in_flight, waves, steps)
        if measured is not None:
            return measured
    mp, h, lens = gen.model_parallel, spec.hidden, job.lengths
    prompt = job.prompt_tokens
    thr, src = profile.matmul_flops(in_flight * prompt, h / gen.tp, h)
    prefill = shape.sequences * prompt * flops_per_token(job, "actor", prompt / 2)
    # each pipeline stage streams its weights once per micro-batch, and a full pipeline
    # needs pp micro-batches per step: PP splits the weights' memory, not their read time;
    # a step reads only the experts its batch (over the ep group) routes tokens to
    untouched = shape.expert_bytes * (1.0 - touched_fraction(spec, in_flight * shape.ep))
    weights = profile.memory_seconds((shape.weight_bytes - untouched) * gen.pp)
    # every response attends to the prompt and to its own tokens so far
    kv_tokens = prompt * lens.mean + lens.mean_square / 2
    decode_kv = profile.memory_seconds(
        shape.sequences * kv_tokens * shape.kv_bytes_per_seq / job.seq_len
    )
    thr_d, _ = profile.matmul_flops(in_flight, h / gen.tp, h)
    decode_flops = (
        shape.sequences
        * lens.mean
        * flops_per_token(job, "actor", kv_tokens / lens.mean)
        / mp
        / thr_d
    )
    memory_bound = steps * weights + decode_kv
    a2a = _gen_alltoall(job, gen, shape, in_flight, profile, gpn, waves, steps)
    return cost(
        ("prefill_compute", prefill / mp / thr, src),
        ("decode_weights", first * weights),
        ("kv_waves", (steps - first) * weights),
        ("decode_kv", decode_kv),
        ("decode_compute", max(0.0, decode_flops - memory_bound), src),
        *_gen_comms(job, gen, in_flight, profile, gpn, waves, steps),
        ("ep_alltoall", a2a),
        # each pipeline stage's engine schedules and launches its own part of every step
        ("step_overhead", steps * profile.step_overhead_s * gen.pp, "roofline"),
    )


def _gen_comms(
    job: Job,
    gen: GenLayout,
    in_flight: int,
    profile: Profile,
    gpn: int,
    waves: int,
    steps: float,
) -> tuple[tuple[str, float, str], tuple[str, float, str]]:
    """The tensor-parallel all-reduces (two per layer: each prefill, each decode step) and
    the pipeline's point-to-point sends of the sequences in flight."""
    h, layers = job.spec("actor").hidden, job.spec("actor").layers / gen.pp
    ar_pre, _ = collective(
        profile, "all_reduce", in_flight * job.prompt_tokens * h * 2, gen.tp, gen.tp <= gpn
    )
    ar_dec, ar_src = collective(profile, "all_reduce", in_flight * h * 2, gen.tp, gen.tp <= gpn)
    p2p, p2p_src = (
        collective(profile, "p2p", in_flight * h * 2, 2, True) if gen.pp > 1 else (0.0, "roofline")
    )
    return (
        ("tp_allreduce", layers * 2 * (waves * ar_pre + steps * ar_dec), ar_src),
        ("pp_p2p", (steps + waves) * (gen.pp - 1) * p2p, p2p_src),
    )


def _gen_alltoall(
    job: Job,
    gen: GenLayout,
    shape: GenShape,
    in_flight: int,
    profile: Profile,
    gpn: int,
    waves: int,
    steps: float,
) -> float:
    """Dispatch and combine of every MoE layer: the prompts once per wave, then one token
    per sequence in flight per decode step."""
    spec = job.spec("actor")
    args = (shape.ep, gen.tp, gen.pp, gpn, 2)
    prefill = moe_alltoall_seconds(
        profile, spec, in_flight * job.prompt_tokens, *args, stride=shape.ep_stride
    )
    decode = moe_alltoall_seconds(profile, spec, in_flight, *args, stride=shape.ep_stride)
    return waves * prefill + steps * decode
