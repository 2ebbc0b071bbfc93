"""An asynchronous plan's prediction: the rollout set's engines, the weight sync between the
two sides, and the steady-state step (simulator.steady).

The rollout set runs dp vLLM engines of pp x tp GPUs (hybridflow.layout.RolloutLayout): each
GPU holds its shard of the actor's weights (no training state), vLLM's workspace and a KV
cache of what is left beside the inference roles placed with it (their resident weights and
the activations of their forward passes, which score each batch while the engines generate
the next). The training sets are predicted as a synchronous plan's sets are
(simulator.predict.predict_set), the actor without generation.
"""

from __future__ import annotations

import dataclasses

from hybridflow.layout import ParallelLayout, RolloutLayout
from hybridflow.plan import PlacedSet, Plan
from hybridflow.simulator.costs import GIB, Cost, DoesNotFit, Memory, collective, cost, memory
from hybridflow.simulator.generation import (
    GREEDY_RESHARD,
    GenShape,
    decode_steps,
    gen_shape,
    generation_cost,
    kv_memory,
    vllm_workspace_bytes,
)
from hybridflow.simulator.job import Job
from hybridflow.simulator.predict import (
    Prediction,
    RolePrediction,
    SetPrediction,
    fluid_finish,
    predict_set,
    rule_predictions,
    rule_seconds,
    share_cores,
)
from hybridflow.simulator.profile import Profile
from hybridflow.simulator.steady import (
    ROLLOUT_BASIS,
    STREAMED_BASIS,
    WEIGHT_LOAD,
    WEIGHT_SEND,
    PipelineTerms,
)
from hybridflow.simulator.train_memory import resident_memory, stage_memory
from hybridflow.simulator.training import WEIGHT_BYTES, infer_cost, role_params
from hybridflow.vocab import ROLLOUT


def streamed_job(job: Job) -> Job:
    """The job as streamed engines generate it: every response of the mean length (a freed
    KV slot takes the next prompt at once, so neither the stragglers nor their KV cache
    hold the engines); the job itself where the lengths do not spread."""
    if not job.lengths.spread:
        return job
    mean = max(1, round(job.lengths.mean))
    return dataclasses.replace(job, response_len=mean, response_mean=0.0, response_dist=())


def engine_shape(job: Job, lay: RolloutLayout) -> tuple[GenShape, float]:
    """The engines' per-replica shape and the bytes per GPU they hold before any KV cache
    (the weights' shard and vLLM's workspace)."""
    train, gen = lay.engine()
    shape = gen_shape(job, train, gen, job.works("actor")[0].sequences)
    return shape, shape.weight_bytes + vllm_workspace_bytes(job.spec("actor"), gen)


def engine_cost(
    job: Job, lay: RolloutLayout, shape: GenShape, in_flight: int, profile: Profile, gpn: int
) -> Cost:
    """Seconds for the engines to generate one batch with `in_flight` KV slots each (a
    ReMax greedy call generates again; there is nothing to reshard)."""
    if in_flight < 1:
        raise DoesNotFit(
            f"rollout layout pp={lay.pp} tp={lay.tp}: no memory left for the KV cache of one "
            f"sequence ({shape.kv_bytes_per_seq / GIB:.2f} GiB) beside the engine's weights "
            f"and what its set holds"
        )
    gen = lay.engine()[1]
    c = generation_cost(job, gen, shape, in_flight, profile, gpn)
    return Cost(tuple(t for t in c.terms if t.name != GREEDY_RESHARD))


def weight_sync(
    job: Job,
    train: ParallelLayout,
    fsdp: bool,
    lay: RolloutLayout,
    profile: Profile,
    intra: bool,
) -> Cost:
    """weight_send: each training rank of one model-parallel replica (each FSDP rank) sends
    its shard, pipelined to every engine's ranks that need it (a broadcast over the group
    that joins both sides), so a link carries the larger of a sender's and a receiver's
    shard once; over the node's links when the cluster is one node, else across nodes.
    weight_load: each engine rank reads what it received and writes vLLM's parameters in
    its tp layout."""
    held = WEIGHT_BYTES * role_params(job, "actor", train.ep)
    send_shard = held / (train.n_gpus if fsdp else train.model_parallel)
    link = max(send_shard, _engine_shard(job, lay))
    seconds, src = collective(profile, "p2p", link, 2, intra)
    return cost((WEIGHT_SEND, seconds, src)) + weight_load(job, lay, profile)


def _engine_shard(job: Job, lay: RolloutLayout) -> float:
    return WEIGHT_BYTES * role_params(job, "actor") / lay.model_parallel


def weight_load(job: Job, lay: RolloutLayout, profile: Profile) -> Cost:
    """An engine rank's load of the weights it received (read, and write in its layout)."""
    return cost((WEIGHT_LOAD, profile.memory_seconds(2 * _engine_shard(job, lay)), "roofline"))


def held_bytes(job: Job, placed: PlacedSet) -> tuple[dict[str, Memory], float]:
    """The inference roles of a rollout set: each one's resident and transient bytes, and
    what they hold together at most (all residents and the largest forward pass)."""
    mem, res, trans = {}, 0.0, 0.0
    for r in placed.models:
        if r == ROLLOUT:
            continue
        resident = resident_memory(job, r, placed.layout(r))
        transient = stage_memory(job, r, placed.layout(r), "infer")
        mem[r] = resident + transient
        res, trans = res + resident.bytes, max(trans, transient.bytes)
    return mem, res + trans


def predict_rollout_set(
    job: Job, placed: PlacedSet, profile: Profile, gpn: int, streamed: bool = False
) -> SetPrediction:
    lay = placed.rollout()
    mem, held = held_bytes(job, placed)
    engines = streamed_job(job) if streamed else job
    shape, engine = engine_shape(engines, lay)
    n = shape.in_flight(profile.usable_bytes - held - engine)
    generate = engine_cost(engines, lay, shape, n, profile, gpn)
    gen_mem = memory(
        generation_weights=shape.weight_bytes, vllm_activations=engine - shape.weight_bytes
    )
    roles = [RolePrediction(ROLLOUT, {"generate": generate}, gen_mem + kv_memory(shape, n))]
    for r, m in mem.items():
        n_seq = next(w.sequences for w in job.works(r) if w.kind == "infer")
        prepare = infer_cost(job, r, placed.layout(r), profile, gpn, n_seq)
        roles.append(RolePrediction(r, {"prepare": prepare}, m))
    peak = held + engine + kv_memory(shape, n).bytes
    return SetPrediction(placed, tuple(roles), peak, n)


def _sides(job: Job, train: tuple[SetPrediction, ...], rollout: SetPrediction) -> tuple[Cost, Cost]:
    produce = cost(
        ("generate", rollout.stage_seconds("generate"), "formula"),
        ("rollout_scoring", rollout.stage_seconds("prepare"), "formula"),
    )
    prepare = max(max(s.stage_seconds("prepare") for s in train), rule_seconds(job))
    consume = cost(
        ("prepare", prepare, "formula"),
        ("train", max(s.stage_seconds("train") for s in train), "formula"),
    )
    return produce, consume


def _share_sides(
    produce: Cost, consume: Cost, ranks: tuple[int, int], profile: Profile, gpn: int
) -> tuple[Cost, Cost]:
    """On a host whose devices share its cores, the two sides, working at once, slow each
    other (simulator.predict.fluid_finish): each side gains a `core_sharing` term."""
    work = [produce.seconds, consume.seconds]
    done = fluid_finish(work, list(ranks), profile.overheads.slowdown, gpn)
    out = []
    for c, w, f in zip((produce, consume), work, done):
        out.append(c + cost(("core_sharing", f - w, "measured")) if f > w * (1 + 1e-9) else c)
    return out[0], out[1]


def predict_async(plan: Plan, profile: Profile, reshard: str = "hybridengine") -> Prediction:
    """One steady-state step of an asynchronous plan (simulator.steady)."""
    job, gpn = plan.job, plan.cluster.gpus_per_node
    train = tuple(
        predict_set(job, s, profile.shared(min(s.gpus, gpn)), gpn, reshard)
        for s in plan.training_sets
    )
    if profile.overheads.sharing:
        train = share_cores(train, profile, gpn)
    rs = plan.rollout_set
    streamed = plan.pipeline.streamed
    rollout = predict_rollout_set(job, rs, profile.shared(min(rs.gpus, gpn)), gpn, streamed)
    actor = plan.set_of("actor")
    intra = plan.cluster.n_gpus <= gpn
    sync = weight_sync(
        job, actor.layout("actor"), actor.settings("actor").fsdp, rs.rollout(), profile, intra
    )
    produce, consume = _sides(job, train, rollout)
    k = plan.pipeline.staleness
    assert k is not None
    if profile.overheads.sharing and k >= 1:
        ranks = (min(rs.gpus, gpn), min(sum(s.gpus for s in plan.training_sets), gpn))
        produce, consume = _share_sides(produce, consume, ranks, profile, gpn)
    terms = PipelineTerms(k, produce, consume, sync, streamed)
    roles = (
        RolePrediction(
            ROLLOUT, {**rollout.roles[0].stages, "reshard": sync}, rollout.roles[0].memory
        ),
    )
    rollout = SetPrediction(rs, roles + rollout.roles[1:], rollout.peak_bytes, rollout.in_flight)
    stages = {
        "generate": rollout.stage_seconds("generate"),
        "prepare": consume.as_dict().get("prepare", 0.0),
        "train": consume.as_dict().get("train", 0.0),
        "reshard": terms.exposed.seconds,
    }
    return Prediction(
        train + (rollout,),
        stages,
        job.tokens_per_iteration,
        rule_predictions(job),
        _lengths(job, rollout, streamed),
        terms,
    )


def _lengths(job: Job, rollout: SetPrediction, streamed: bool) -> dict[str, dict] | None:
    """With a length spread: the response tokens each stage was costed with."""
    if not job.lengths.spread:
        return None
    mean = {"basis": "mean", "tokens": job.lengths.mean}
    if streamed:
        return {"generate": {**mean, "basis": STREAMED_BASIS}, "prepare": mean, "train": mean}
    shape, _ = engine_shape(job, rollout.placed.rollout())
    waves, full, _ = decode_steps(job, shape.sequences, rollout.in_flight)
    generate = {
        "basis": f"expected longest response of each wave (stragglers); {ROLLOUT_BASIS}",
        "tokens": full,
        "max": job.response_len,
        "waves": waves,
        "sequences_per_wave": rollout.in_flight,
    }
    return {"generate": generate, "prepare": mean, "train": mean}
