"""Compose per-model predictions into a set and an iteration (the paper's d_cost):
within a set the stages of its models add up; across sets a stage takes the slowest set;
the stages (generate, prepare, train, reshard) add up. Rule rewards and costs run on the
controller's CPU during the prepare stage, beside the GPU sets (no GPUs, no GPU memory)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from hybridflow.plan import PlacedSet, Plan
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.costs import GIB, Cost, DoesNotFit, Memory, cost, memory
from hybridflow.simulator.generation import (
    GREEDY_RESHARD,
    decode_steps,
    gen_shape,
    generation_cost,
    kv_memory,
    vllm_workspace_bytes,
)
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import Profile, load_profile
from hybridflow.simulator.reshard import SCHEMES, ReshardError, actor_reshard
from hybridflow.simulator.steady import PipelineTerms
from hybridflow.simulator.train_memory import reloaded_weights, resident_memory, stage_memory
from hybridflow.simulator.training import WEIGHT_BYTES, infer_cost, role_params, train_cost
from hybridflow.vocab import STAGES


class PlanLike(Protocol):
    @property
    def cluster(self) -> Cluster: ...
    @property
    def job(self) -> Job: ...
    @property
    def sets(self) -> tuple[PlacedSet, ...]: ...


@dataclass(frozen=True)
class RolePrediction:
    role: str
    stages: Mapping[str, Cost]
    memory: Memory  # the role's own peak bytes per GPU, by term


@dataclass(frozen=True)
class SetPrediction:
    placed: PlacedSet
    roles: tuple[RolePrediction, ...]
    peak_bytes: float  # the set's peak per GPU (all residents + the largest transient)
    in_flight: int = 0  # the actor's sequences generated at once per replica (its set only)

    def stage_seconds(self, stage: str) -> float:
        return float(sum(r.stages[stage].seconds for r in self.roles if stage in r.stages))


@dataclass(frozen=True)
class Prediction:
    sets: tuple[SetPrediction, ...]
    stages: Mapping[str, float]
    tokens: int
    rules: tuple[RolePrediction, ...] = ()  # rule rewards/costs: CPU seconds, no memory
    lengths: Mapping[str, dict] | None = None  # response tokens each stage followed
    pipeline: PipelineTerms | None = None  # an asynchronous plan's step (stages overlap)

    @property
    def iteration_s(self) -> float:
        """The stages' sum; an asynchronous plan's steady-state step (simulator.steady)."""
        if self.pipeline is not None:
            return self.pipeline.step_s
        return sum(self.stages.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.iteration_s if self.iteration_s > 0 else 0.0

    def roles(self) -> Iterable[RolePrediction]:
        yield from (r for s in self.sets for r in s.roles)
        yield from self.rules

    def sources(self) -> dict[str, dict[str, dict[str, str]]]:
        """{role: {stage: {term: "measured" | "roofline"}}}, parallel to to_dict()["terms"]."""
        return {r.role: {st: c.sources() for st, c in r.stages.items()} for r in self.roles()}

    def to_dict(self) -> dict:
        """The plan JSON's "predicted" object ("response_tokens" only with a length spread)."""
        d = {
            "iteration_s": self.iteration_s,
            "tokens_per_s": self.tokens_per_s,
            "stages": dict(self.stages),
            "terms": {
                r.role: {st: c.as_dict() for st, c in r.stages.items()} for r in self.roles()
            },
            "peak_memory_gib": {r.role: r.memory.gib for r in self.roles()},
        }
        if self.lengths:
            d["response_tokens"] = {k: dict(v) for k, v in self.lengths.items()}
        if self.pipeline is not None:
            d["pipeline"] = self.pipeline.to_dict()
        return d


def rule_predictions(job: Job) -> tuple[RolePrediction, ...]:
    """Rule rewards and costs: a per-response CPU cost on the controller."""
    return tuple(
        RolePrediction(
            r, {"prepare": cost(("rule_cpu", job.rule_cpu_s * w.sequences, "formula"))}, Memory()
        )
        for r in job.rule_roles
        for w in job.works(r)
    )


def rule_seconds(job: Job) -> float:
    """The controller scores with each rule in turn."""
    return sum(r.stages["prepare"].seconds for r in rule_predictions(job))


def _fits(what: str, need: float, profile: Profile) -> None:
    if need > profile.usable_bytes:
        raise DoesNotFit(
            f"{what} needs {need / GIB:.1f} GiB per GPU, more than the "
            f"{profile.usable_bytes / GIB:.1f} GiB usable on {profile.name}"
        )


def _actor_generation(
    job: Job, placed: PlacedSet, profile: Profile, gpn: int, scheme: str, others_resident: float
) -> tuple[dict[str, Cost], Memory, int]:
    """Generation and reshard costs of the actor and its transient memory."""
    train, gen = placed.layout("actor"), placed.generation()
    model_bytes = WEIGHT_BYTES * role_params(job, "actor", train.ep)
    name, fsdp = job.spec("actor").name, placed.settings("actor").fsdp
    weights, swap, reshard = actor_reshard(
        scheme, model_bytes, train, gen, profile, gpn, model=name, fsdp=fsdp
    )
    # an offloaded actor brings its training weights back to reshard and generate
    weights += reloaded_weights(job, "actor", train, placed.settings("actor"))
    workspace = vllm_workspace_bytes(job.spec("actor"), gen)
    extra = weights + workspace
    _fits(
        f"resharding the actor ({scheme}) in set {list(placed.models)}",
        others_resident + max(swap, extra),
        profile,
    )
    shape = gen_shape(job, train, gen, job.works("actor")[0].sequences)
    n = shape.in_flight(profile.usable_bytes - others_resident - extra)
    generate = generation_cost(job, gen, shape, n, profile, gpn)
    # a ReMax greedy generation of its own reshards again: generation_cost counts it (the
    # planner's tables add generate and reshard of the actor's set alike); its stage is reshard
    again = tuple(t for t in generate.terms if t.name == GREEDY_RESHARD)
    stages = {
        "generate": Cost(tuple(t for t in generate.terms if t.name != GREEDY_RESHARD)),
        "reshard": reshard + Cost(again),
    }
    gen_mem = memory(generation_weights=weights, vllm_activations=workspace)
    return stages, gen_mem + kv_memory(shape, n), n


def predict_set(
    job: Job, placed: PlacedSet, profile: Profile, gpn: int, scheme: str = "hybridengine"
) -> SetPrediction:
    mem = {r: placed.settings(r) for r in placed.models}
    resident = {r: resident_memory(job, r, placed.layout(r), mem[r]) for r in placed.models}
    transient = {
        r: max(
            (
                stage_memory(job, r, placed.layout(r), w.kind, mem[r])
                for w in job.works(r)
                if w.kind != "generate"
            ),
            key=lambda m: m.bytes,
        )
        for r in placed.models
    }
    total_resident = sum(m.bytes for m in resident.values())
    _fits(
        f"set {list(placed.models)} on {placed.gpus} GPUs",
        total_resident + max(m.bytes for m in transient.values()),
        profile,
    )
    roles, peak = [], total_resident + max(m.bytes for m in transient.values())
    in_flight = 0
    for role in placed.models:
        layout = placed.layout(role)
        stages: dict[str, Cost] = {}
        own = transient[role]
        for w in job.works(role):
            if w.kind == "train":
                stages["train"] = train_cost(job, role, layout, profile, gpn, mem[role])
            elif w.kind == "infer":
                stages["prepare"] = infer_cost(job, role, layout, profile, gpn, w.sequences)
        if role == "actor" and "generate" in placed.layouts["actor"]:
            gen_stages, gen_mem, in_flight = _actor_generation(
                job, placed, profile, gpn, scheme, total_resident
            )
            stages.update(gen_stages)
            own = max(own, gen_mem, key=lambda m: m.bytes)
            peak = max(peak, total_resident + gen_mem.bytes)
        roles.append(RolePrediction(role, stages, resident[role] + own))
    return SetPrediction(placed, tuple(roles), peak, in_flight)


def compose(sets: tuple[SetPrediction, ...], job: Job) -> Prediction:
    stages: dict[str, float] = {st: max(s.stage_seconds(st) for s in sets) for st in STAGES}
    stages["prepare"] = max(stages["prepare"], rule_seconds(job))
    return Prediction(
        sets, stages, job.tokens_per_iteration, rule_predictions(job), _length_basis(job, sets)
    )


def _length_basis(job: Job, sets: tuple[SetPrediction, ...]) -> dict[str, dict] | None:
    """With a length spread: the response tokens per sequence each stage was costed with."""
    if not job.lengths.spread:
        return None
    mean = {"basis": "mean", "tokens": job.lengths.mean}
    out: dict[str, dict] = {
        "generate": {
            "basis": "expected longest response of each wave (stragglers)",
            "tokens": float(job.response_len),
            "max": job.response_len,
        }
    }
    actor = next((s for s in sets if "actor" in s.placed.models), None)
    if actor is not None and actor.in_flight > 0:
        placed, n = actor.placed, actor.in_flight
        shape = gen_shape(
            job, placed.layout("actor"), placed.generation(), job.works("actor")[0].sequences
        )
        waves, full, _ = decode_steps(job, shape.sequences, n, shape.ep)
        out["generate"].update(tokens=full, waves=waves, sequences_per_wave=n * shape.ep)
        if shape.ep > 1:
            out["generate"]["basis"] += f"; a wave spans the {shape.ep} replicas of an ep group"
    return {**out, "prepare": mean, "train": mean}


def predict_plan(
    plan: PlanLike, profile: Profile | str | None = None, reshard: str = "hybridengine"
) -> Prediction:
    """Predict one iteration of a plan (sets, GPUs, layouts) without searching."""
    if reshard not in SCHEMES:
        raise ReshardError(
            f"unknown resharding scheme {reshard!r}: choose one of {', '.join(SCHEMES)}"
        )
    if profile is None or isinstance(profile, str):
        profile = load_profile(profile or plan.cluster.gpu)
    if isinstance(plan, Plan) and plan.asynchronous:
        # the asynchronous step composes this module's set predictions (it imports them)
        from hybridflow.simulator.rollout import predict_async

        return predict_async(plan, profile, reshard)
    gpn = plan.cluster.gpus_per_node
    # each set as if alone: its own ranks busy (what the per-call tables measured)
    sets = tuple(
        predict_set(plan.job, s, profile.shared(min(s.gpus, gpn)), gpn, reshard) for s in plan.sets
    )
    if profile.overheads.sharing:
        sets = share_cores(sets, profile, gpn)
    return compose(sets, plan.job)


def fluid_finish(
    work: list[float], ranks: list[int], slowdown: Callable[[float], float], host: int
) -> list[float]:
    """When each of several sets, started together, finishes its `work` (seconds with only
    its own `ranks` busy) on a host of `host` devices whose cores they all share: while a
    group of sets runs, each progresses at slowdown(own) / slowdown(all busy ranks), and
    the others speed up as sets finish (processor sharing)."""
    left = list(work)
    done = [0.0] * len(work)
    active = {i for i, w in enumerate(work) if w > 0}
    now = 0.0
    while active:
        busy = min(host, sum(ranks[i] for i in active))
        speed = {i: min(1.0, slowdown(min(ranks[i], host)) / slowdown(busy)) for i in active}
        step = min(left[i] / speed[i] for i in active)
        now += step
        for i in list(active):
            left[i] -= speed[i] * step
            if left[i] <= 1e-12 * work[i]:
                done[i] = now
                active.discard(i)
    return done


def share_cores(
    sets: tuple[SetPrediction, ...], profile: Profile, gpn: int
) -> tuple[SetPrediction, ...]:
    """Sets that work in the same stage at once share the host's cores (a measured
    `sharing` table): each role's stage cost gains a `core_sharing` term, its share of the
    time its set loses to the other sets' ranks (fluid_finish)."""
    extra: list[dict[str, float]] = [{} for _ in sets]  # set -> stage -> stretch factor
    ranks = [min(s.placed.gpus, gpn) for s in sets]
    for st in STAGES:
        work = [s.stage_seconds(st) for s in sets]
        finish = fluid_finish(work, ranks, profile.overheads.slowdown, gpn)
        for i, (w, f) in enumerate(zip(work, finish)):
            if w > 0 and f > w * (1 + 1e-9):
                extra[i][st] = f / w - 1.0
    out = []
    for s, stretch in zip(sets, extra):
        roles = tuple(
            RolePrediction(
                r.role,
                {
                    st: c + cost(("core_sharing", c.seconds * stretch[st], "measured"))
                    if st in stretch
                    else c
                    for st, c in r.stages.items()
                },
                r.memory,
            )
            for r in s.roles
        )
        out.append(SetPrediction(s.placed, roles, s.peak_bytes, s.in_flight))
    return tuple(out)
