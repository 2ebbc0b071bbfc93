"""Actor generation on its generation layout (pg, tg) replicated d x micro_dp times.

Prefill is compute-bound; decode reads the weights once per step (memory-bound) and the KV
cache of the sequences in flight. The KV cache takes the memory left free; fewer sequences
in flight means more waves, each re-reading the weights for every decode step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from simulator.costs import Cost, DoesNotFit, GIB, collective, cost, memory, Memory
from simulator.job import Job
from simulator.layout import GenLayout, TrainLayout, check_model_fits
from simulator.profile import Profile, interpolate
from simulator.training import WEIGHT_BYTES, flops_per_token


@dataclass(frozen=True)
class GenShape:
    """Per-replica quantities of one generation layout that do not depend on memory."""
    sequences: int          # per replica
    weight_bytes: float     # per GPU
    kv_bytes_per_seq: float  # per GPU, full prompt + response length

    def in_flight(self, kv_budget: float) -> int:
        if kv_budget >= self.sequences * self.kv_bytes_per_seq:
            return self.sequences
        return int(max(kv_budget, 0.0) // self.kv_bytes_per_seq)


def gen_shape(job: Job, train: TrainLayout, gen: GenLayout, sequences: int) -> GenShape:
    spec = job.spec("actor")
    check_model_fits(spec.layers, spec.heads, spec.kv_heads, gen.pp, gen.tp)
    replicas = train.dp * gen.micro_dp
    kv = spec.kv_bytes_per_token(WEIGHT_BYTES) / gen.model_parallel * job.seq_len
    return GenShape(math.ceil(sequences / replicas),
                    WEIGHT_BYTES * job.params("actor") / gen.model_parallel, kv)


def kv_memory(shape: GenShape, in_flight: int) -> Memory:
    return memory(kv_cache=in_flight * shape.kv_bytes_per_seq)


def _measured(job: Job, profile: Profile, shape: GenShape, n: int, waves: int) -> Cost | None:
    m = profile.measured
    if not m.decode or m.generate_model != job.spec("actor").name:
        return None
    prefill = interpolate(tuple((b * t, s) for b, t, s in m.prefill), n * job.prompt_len) * waves
    batches = sorted({b for b, _, _ in m.decode}, key=lambda b: abs(math.log(b / n)))
    rows = tuple((c, s) for b, c, s in m.decode if b == batches[0])
    step = interpolate(rows, job.prompt_len + job.response_len / 2)
    return cost(("prefill_measured", prefill, "measured"),
                ("decode_measured", waves * job.response_len * step, "measured"))


def generation_cost(job: Job, gen: GenLayout, shape: GenShape, in_flight: int,
                    profile: Profile, gpn: int) -> Cost:
    """Seconds to generate this replica's sequences with `in_flight` KV slots."""
    if in_flight < 1:
        raise DoesNotFit(f"actor generation tp={gen.tp} pp={gen.pp}: no memory left for the "
                         f"KV cache of one sequence ({shape.kv_bytes_per_seq / GIB:.2f} GiB)")
    spec = job.spec("actor")
    waves = math.ceil(shape.sequences / in_flight)
    if gen.model_parallel == 1:
        measured = _measured(job, profile, shape, in_flight, waves)
        if measured is not None:
            return measured
    mp, h, steps = gen.model_parallel, spec.hidden, job.response_len
    thr, src = profile.matmul_flops(in_flight * job.prompt_len, h / gen.tp, h)
    prefill = shape.sequences * job.prompt_len * flops_per_token(job, "actor", job.prompt_len / 2)
    # each pipeline stage streams its weights once per micro-batch, and a full pipeline
    # needs pp micro-batches per step: PP splits the weights' memory, not their read time
    weights = profile.memory_seconds(shape.weight_bytes * gen.pp)
    kv_read = shape.kv_bytes_per_seq / job.seq_len * (job.prompt_len + steps / 2)
    decode_kv = profile.memory_seconds(shape.sequences * steps * kv_read)
    thr_d, _ = profile.matmul_flops(in_flight, h / gen.tp, h)
    decode_flops = shape.sequences * steps * flops_per_token(
        job, "actor", job.prompt_len + steps / 2) / mp / thr_d
    memory_bound = steps * weights * waves + decode_kv
    layers = spec.layers / gen.pp
    ar_pre, _ = collective(profile, "all_reduce", in_flight * job.prompt_len * h * 2, gen.tp, gen.tp <= gpn)
    ar_dec, ar_src = collective(profile, "all_reduce", in_flight * h * 2, gen.tp, gen.tp <= gpn)
    p2p, p2p_src = collective(profile, "p2p", in_flight * h * 2, 2, True) if gen.pp > 1 else (0.0, "roofline")
    return cost(("prefill_compute", prefill / mp / thr, src),
                ("decode_weights", steps * weights), ("kv_waves", (waves - 1) * steps * weights),
                ("decode_kv", decode_kv),
                ("decode_compute", max(0.0, decode_flops - memory_bound), src),
                ("tp_allreduce", waves * layers * 2 * (ar_pre + steps * ar_dec), ar_src),
                ("pp_p2p", waves * (steps + 1) * (gen.pp - 1) * p2p, p2p_src),
                ("step_overhead", waves * steps * profile.step_overhead_s, "roofline"))
