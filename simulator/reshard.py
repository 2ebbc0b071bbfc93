"""Actor resharding between training (p, t, d) and generation (pg, tg, micro-DP) layouts:
the three schemes of the paper's Table 2 (model size M bytes), and a general one for
generation groups larger than the training model-parallel group (pg*tg > p*t: tg a
multiple of t, each generation stage whole training stages). There each rank slices its
generation shard from what it holds where the layers are its own (the generation
replica's ranks are chosen so that each one's tp slice lies in its training shard) and
gathers the layers of the other training stages; vLLM keeps its own buffer."""

from __future__ import annotations

from hybridflow.layout import GenLayout, LayoutError, ParallelLayout
from hybridflow.simulator.costs import Cost, collective, cost
from hybridflow.simulator.profile import Profile

SCHEMES = ("hybridengine", "hybridengine-v", "allgather")


class ReshardError(LayoutError):
    """Unknown resharding scheme or impossible layouts."""


def decoupled(p: int, t: int, pg: int, tg: int) -> bool:
    """The general scheme's case (hybridflow.layout.GenLayout.decoupled)."""
    return pg * tg > p * t and tg % t == 0 and p % pg == 0


def _local_fraction(p: int, pg: int) -> float:
    """Of a decoupled generation shard, the part whose layers the rank trains."""
    return pg / p


def _check(scheme: str, p: int, t: int, d: int, pg: int, tg: int) -> None:
    if scheme not in SCHEMES:
        raise ReshardError(
            f"unknown resharding scheme {scheme!r}: choose one of {', '.join(SCHEMES)}"
        )
    if decoupled(p, t, pg, tg):
        return
    if min(p, t, d, pg, tg) <= 0:
        raise ReshardError("resharding: all degrees must be positive")
    if (p * t) % (pg * tg):
        raise LayoutError(f"generation pg*tg = {pg * tg} must divide training p*t = {p * t}")


def reshard_bytes_per_rank(
    scheme: str, model_bytes: float, p: int, t: int, d: int, pg: int, tg: int
) -> float:
    """Bytes each rank receives to build its generation weights (Table 2, first row)."""
    _check(scheme, p, t, d, pg, tg)
    if decoupled(p, t, pg, tg):
        return model_bytes / (tg * pg) * (1 - _local_fraction(p, pg))
    if scheme == "allgather":
        return (t * p * d - 1) / (t * p * d) * model_bytes
    if scheme == "hybridengine-v":
        return (t * p - 1) / (t * p) * model_bytes
    return (t * p - tg * pg) / (tg * pg * t * p) * model_bytes


def reshard_peak_bytes(
    scheme: str, model_bytes: float, p: int, t: int, d: int, pg: int, tg: int
) -> float:
    """Peak bytes per rank of actor weights while resharding (Table 2, second row)."""
    _check(scheme, p, t, d, pg, tg)
    if decoupled(p, t, pg, tg):
        return model_bytes / (t * p) + model_bytes / (tg * pg)
    return model_bytes / (tg * pg) if scheme == "hybridengine" else model_bytes


def redundant_bytes(
    scheme: str, model_bytes: float, p: int, t: int, d: int, pg: int, tg: int
) -> float:
    """Training weights held twice during generation (Table 2, third row)."""
    _check(scheme, p, t, d, pg, tg)
    if decoupled(p, t, pg, tg):
        return model_bytes / (tg * pg) * _local_fraction(p, pg)
    if scheme == "allgather":
        return model_bytes / (t * p * d)
    return model_bytes / (t * p) if scheme == "hybridengine-v" else 0.0


def generation_extra_bytes(
    scheme: str, model_bytes: float, p: int, t: int, d: int, pg: int, tg: int
) -> float:
    """Bytes per rank held for generation weights beyond the training shard: the
    generation shard M/(tg*pg) minus the part that is the training shard itself."""
    gen_shard = model_bytes / (tg * pg)
    if scheme == "hybridengine" and not decoupled(p, t, pg, tg):
        _check(scheme, p, t, d, pg, tg)
        return gen_shard - model_bytes / (t * p)  # the training shard lies inside it
    return gen_shard  # separate buffer; the training shard stays (redundancy)


def _span(scheme: str, p: int, t: int, d: int, pg: int, tg: int) -> tuple[int, int]:
    """(ranks, span in consecutive devices) of the all-gather group of each scheme."""
    if decoupled(p, t, pg, tg):  # the training stages of one generation stage
        return p // pg, t * d * p
    if scheme == "allgather":
        return t * p * d, t * p * d
    if scheme == "hybridengine-v":
        return t * p, t if p == 1 else t * d * p
    dg = t * p // (tg * pg)
    return dg, t if p == pg else t * d * p


def reshard_cost(
    scheme: str,
    model_bytes: float,
    p: int,
    t: int,
    d: int,
    pg: int,
    tg: int,
    profile: Profile,
    gpn: int,
    *,
    model: str,
) -> Cost:
    """Seconds of the all-gather that builds generation weights; going back to the
    training layout only drops the generation buffer. Where the profile measured the
    executor's resharding of this `model` (its name; same scheme), its per-call table
    instead."""
    measured = measured_reshard(scheme, model, p, t, d, pg, tg, profile)
    if measured is not None:
        return measured
    volume = reshard_bytes_per_rank(scheme, model_bytes, p, t, d, pg, tg)
    ranks, span = _span(scheme, p, t, d, pg, tg)
    fixed = _barriers(profile, p * t * d, gpn)
    if decoupled(p, t, pg, tg):  # slicing the local part into vLLM's buffer
        gen_shard = model_bytes / (tg * pg)
        fixed += cost(("reshard_slice", profile.memory_seconds(2 * gen_shard), "roofline"))
    if ranks <= 1 or volume <= 0:
        return fixed
    # all_gather's table/roofline takes the gathered size; each rank receives (r-1)/r of it
    seconds, src = collective(
        profile, "all_gather", volume * ranks / (ranks - 1), ranks, span <= gpn
    )
    return cost(("reshard_allgather", seconds, src)) + fixed


BARRIERS = 2  # the engine synchronises every rank before gathering and after loading


def _barriers(profile: Profile, n_gpus: int, gpn: int) -> Cost:
    """The barriers around resharding, as the smallest all-reduce over all the actor's
    ranks, where the profile measured it (a latency the alpha-beta model leaves out on GPUs,
    where it is negligible)."""
    rows = [(b, s) for r, b, s in profile.measured.collective("all_reduce") if r == n_gpus]
    if n_gpus <= 1 or not rows or n_gpus > gpn:
        return Cost()
    return cost(("reshard_barrier", BARRIERS * min(rows)[1], "measured"))


def measured_reshard(
    scheme: str, model: str, p: int, t: int, d: int, pg: int, tg: int, profile: Profile
) -> Cost | None:
    """The 3D-HybridEngine's switch to the generation layout and back as the executor does
    it (barriers, gathers, conversion and vLLM's weight reload, freeing the cache), from the
    profile's per-call table: the row of this set size, generation tp and micro-DP (pipeline
    layouts read the row of the same micro-DP). None where the table does not apply: another
    model, scheme, or generation pp > 1."""
    calls = profile.calls
    if not calls.applies(model) or calls.scheme != scheme or pg != 1 or decoupled(p, t, pg, tg):
        return None
    seconds = calls.reshard(p * t * d, tg, p * t // tg)
    return None if seconds is None else cost(("reshard_calls", seconds, "measured"))


def fsdp_reshard(
    model_bytes: float, n_gpus: int, pg: int, tg: int, profile: Profile, gpn: int
) -> tuple[float, float, Cost]:
    """(extra bytes, swap bytes, seconds) of loading FSDP-sharded training weights into
    vLLM: every rank gathers each parameter whole from its n_gpus shards, keeps its tp slice
    in vLLM's own buffer and drops the rest (one parameter at a time: no swap)."""
    seconds, src = collective(profile, "all_gather", model_bytes, n_gpus, n_gpus <= gpn)
    return model_bytes / (tg * pg), 0.0, cost(("fsdp_gather", seconds, src))


def actor_reshard(
    scheme: str,
    model_bytes: float,
    train: ParallelLayout,
    gen: GenLayout,
    profile: Profile,
    gpn: int,
    *,
    model: str,
    fsdp: bool = False,
) -> tuple[float, float, Cost]:
    """(generation bytes beyond the training shard, transient bytes while resharding beyond
    it, the resharding's cost) of the actor's switch to its generation layout."""
    if fsdp:
        return fsdp_reshard(model_bytes, train.n_gpus, gen.pp, gen.tp, profile, gpn)
    args = (model_bytes, train.pp, train.tp, train.dp, gen.pp, gen.tp)
    extra = generation_extra_bytes(scheme, *args)
    swap = reshard_peak_bytes(scheme, *args) - model_bytes / train.model_parallel
    return extra, swap, reshard_cost(scheme, *args, profile, gpn, model=model)
