"""Best layouts per (role, GPU count) and per (set of colocated roles, GPU count).

Role tables list every memory-feasible layout with its resident bytes, transient bytes and
stage seconds; dominated layouts (no less memory and no less time than another) are pruned.
A set's best layouts minimise the set's own total time (the paper's per-model auto_parallel
with the set's memory shared), choosing jointly so the actor's KV cache gets what its
colocated models leave free. Tables are cached and reusable across cluster sizes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, overload

from hybridflow.layout import GenLayout, LayoutError, ParallelLayout
from hybridflow.memory import DEFAULT, RECOMPUTE, MemorySettings
from hybridflow.planner.choices import (
    Candidate,
    GenOption,
    SetChoice,
    _pareto,
    _Partial,
    _per_layout,
)
from hybridflow.simulator.generation import (
    GenShape,
    gen_shape,
    generation_cost,
    vllm_workspace_bytes,
)
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import Profile
from hybridflow.simulator.reshard import actor_reshard
from hybridflow.simulator.train_memory import (
    offloaded_state,
    reloaded_weights,
    resident_memory,
    stage_memory,
)
from hybridflow.simulator.training import (
    WEIGHT_BYTES,
    check_layout,
    infer_cost,
    role_params,
    train_cost,
)
from hybridflow.vocab import CRITIC_ROLES, STAGES, TRAINED_ROLES, Kind


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _expert_degrees(experts: int, dp: int) -> list[int]:
    """Expert parallel degrees of a layout: every common divisor of the experts and dp
    (just 1 for a dense model)."""
    return [e for e in range(1, min(experts, dp) + 1) if experts % e == 0 and dp % e == 0] or [1]


def set_sizes(gpus_per_node: int, limit: int) -> list[int]:
    """GPU counts a set may get: powers of two that divide a node, then whole nodes."""
    small = [
        s for s in _powers_of_two(gpus_per_node) if gpus_per_node % s == 0 and s < gpus_per_node
    ]
    return [s for s in small if s <= limit] + list(range(gpus_per_node, limit + 1, gpus_per_node))


class Tables:
    """Role and set tables for one job, profile and node size; share one across cluster
    sizes (a sweep) to reuse them."""

    def __init__(
        self,
        job: Job,
        profile: Profile,
        gpus_per_node: int,
        scheme: str = "hybridengine",
        max_gen_pp: int | None = None,
    ) -> None:
        self.job, self.profile, self.gpn, self.scheme = job, profile, gpus_per_node, scheme
        # a CPU cluster (devices sharing host cores) is the executor's own: plans there stay
        # what it runs (TP-only generation, megatron-core's even stages, no FSDP)
        self.local = profile.host_cores > 0
        self.max_gen_pp = 1 if self.local else max_gen_pp  # e.g. 1: TP-only generation
        self._roles: dict[tuple[str, int, bool], list[Candidate]] = {}
        self._gen: dict[tuple[ParallelLayout, bool], list[GenOption]] = {}
        self._gen_s: dict[tuple[ParallelLayout, GenLayout, int], float] = {}
        self._shapes: dict[tuple[ParallelLayout, GenLayout], GenShape] = {}
        self._sets: dict[tuple[tuple[str, ...], int, bool], SetChoice | None] = {}
        self._partial_cache: dict[tuple[tuple[str, ...], int, bool], list[_Partial]] = {}
        self._fastest: dict[tuple[ParallelLayout, bool], float] = {}
        self._infer: dict[tuple, tuple[float, float]] = {}

    # ---- per role -----------------------------------------------------------------
    def layouts(self, role: str, n: int) -> Iterator[ParallelLayout]:
        spec = self.job.spec(role)
        for t in _powers_of_two(min(self.gpn, n)):
            for p in range(1, spec.layers + 1):
                if n % (p * t) == 0:
                    dp = n // (p * t)
                    for ep in _expert_degrees(spec.experts, dp):
                        lay = ParallelLayout(p, t, dp, ep)
                        try:
                            check_layout(self.job, role, lay)
                        except LayoutError:
                            continue
                        if not self.local or spec.layers % p == 0:
                            yield lay

    def settings_options(
        self, role: str, lay: ParallelLayout | None = None
    ) -> list[MemorySettings]:
        """What the planner tries for a trained role: each recomputation, with and without
        host offload where the profile has a host link, and on layouts without tensor or
        pipeline parallelism FSDP too. The distributed optimizer stays on (it needs less
        memory and moves less than an all-reduce); micro-batches stay one sequence
        (packing saves no time in this model, only bubbles and memory), but on the
        executor's measured cluster they are the micro-batch its per-call tables were
        measured at, so that the plan runs what was measured."""
        if role not in TRAINED_ROLES:
            return [DEFAULT]
        offload = (False, True) if self.profile.host_bandwidth else (False,)
        fsdp = (False, True) if self._fsdp_applies(role, lay) else (False,)
        tokens = self.job.seq_len * max(1, self.profile.calls.micro_batch) if self.local else None
        return [
            MemorySettings(recompute=r, offload=o, fsdp=f, micro_batch_tokens=tokens).resolved(
                self.job.seq_len
            )
            for f in fsdp
            for o in offload
            for r in RECOMPUTE
        ]

    def _fsdp_applies(self, role: str, lay: ParallelLayout | None) -> bool:
        """FSDP is tried on layouts without tp and pp that have ranks to shard over, and not
        on the executor's own measured cluster (it trains with megatron-core)."""
        if lay is None or lay.pp > 1 or lay.tp > 1 or lay.dp * lay.cp == 1:
            return False
        return not self.local

    def _candidate(self, role: str, lay: ParallelLayout, mem: MemorySettings) -> Candidate:
        job, prof = self.job, self.profile
        secs = dict.fromkeys(STAGES, 0.0)
        transient = 0.0
        for w in job.works(role):
            if w.kind == "generate":
                continue
            if w.kind == "train":
                secs[w.stage] += train_cost(job, role, lay, prof, self.gpn, mem).seconds
                transient = max(transient, stage_memory(job, role, lay, w.kind, mem).bytes)
                continue
            # a forward pass costs the same under every memory setting; offload adds what
            # it loads back
            budget = MemorySettings(micro_batch_tokens=mem.micro_batch_tokens)
            key = (role, lay, w.sequences, budget)
            if key not in self._infer:
                self._infer[key] = (
                    infer_cost(job, role, lay, prof, self.gpn, w.sequences).seconds,
                    stage_memory(job, role, lay, w.kind, budget).bytes,
                )
            seconds, act = self._infer[key]
            secs[w.stage] += seconds
            loaded = offloaded_state(job, role, lay, mem, w.kind).bytes
            transient = max(transient, act + loaded)
        resident = resident_memory(job, role, lay, mem).bytes
        gen_resident = resident + (reloaded_weights(job, role, lay, mem) if role == "actor" else 0)
        return Candidate(
            lay, resident, transient, tuple(secs[s] for s in STAGES), mem, gen_resident
        )

    def role_candidates(self, role: str, n: int, prune: bool = True) -> list[Candidate]:
        key = (role, n, prune)
        if key not in self._roles:
            usable = self.profile.usable_bytes
            cands = [
                c
                for c in (
                    self._candidate(role, lay, mem)
                    for lay in self.layouts(role, n)
                    for mem in self.settings_options(role, lay)
                )
                if c.resident + c.transient <= usable
            ]
            # the actor keeps every layout (its generation options differ by layout), and
            # of each layout's settings those no other beats in memory, also while generating
            self._roles[key] = (
                (_pareto(cands) if role != "actor" else _per_layout(cands)) if prune else cands
            )
        return self._roles[key]

    def gen_options(self, train: ParallelLayout, fsdp: bool = False) -> list[GenOption]:
        """The actor's generation layouts on training layout `train` (trained with FSDP:
        its weights gathered whole into vLLM)."""
        if (train, fsdp) not in self._gen:
            spec, opts = self.job.spec("actor"), []
            model_bytes = WEIGHT_BYTES * role_params(self.job, "actor", train.ep)
            for pg, tg in self._gen_degrees(train):
                if spec.heads % tg or (spec.kv_heads % tg and tg % spec.kv_heads):
                    continue  # vLLM copies KV heads to fill a larger tp
                gen = GenLayout(pg, tg, max(train.model_parallel // (pg * tg), 1))
                extra, swap, reshard = actor_reshard(
                    self.scheme,
                    model_bytes,
                    train,
                    gen,
                    self.profile,
                    self.gpn,
                    model=spec.name,
                    fsdp=fsdp,
                )
                extra += vllm_workspace_bytes(spec, gen)
                opts.append(GenOption(gen, extra, swap, reshard.seconds))
            self._gen[(train, fsdp)] = opts
        return self._gen[(train, fsdp)]

    def _gen_degrees(self, train: ParallelLayout) -> list[tuple[int, int]]:
        """(pg, tg) of the generation layouts tried: inside the training model-parallel
        group (the 3D-HybridEngine), and tp up to a node wider than it (decoupled)."""
        top = min(train.pp, self.max_gen_pp or train.pp)
        pgs = [x for x in range(1, top + 1) if train.pp % x == 0]
        out = [(pg, tg) for tg in _powers_of_two(train.tp) for pg in pgs]
        if self.max_gen_pp is None:  # the executor runs the 3D-HybridEngine only
            wide = _powers_of_two(min(self.gpn, train.n_gpus))
            for tg in (x for x in wide if x > train.tp and x % train.tp == 0):
                out += [
                    (pg, tg)
                    for pg in pgs
                    if pg * tg > train.model_parallel and train.n_gpus % (pg * tg) == 0
                ]
        return out

    @overload
    def generation_seconds(
        self, train: ParallelLayout, opt: GenOption, free: float, check: Literal[False]
    ) -> float: ...
    @overload
    def generation_seconds(
        self, train: ParallelLayout, opt: GenOption, free: float, check: bool = True
    ) -> float | None: ...
    def generation_seconds(
        self, train: ParallelLayout, opt: GenOption, free: float, check: bool = True
    ) -> float | None:
        """Seconds to generate with `free` bytes per GPU left after all residents (None if
        the KV cache of one sequence or the resharding buffer does not fit)."""
        shape = self._shapes.get((train, opt.layout))
        if shape is None:
            shape = gen_shape(self.job, train, opt.layout, self.job.works("actor")[0].sequences)
            self._shapes[(train, opt.layout)] = shape
        n = shape.in_flight(free - opt.extra)
        if check and (n < 1 or opt.swap > free):
            return None
        n = max(n, 1)
        key = (train, opt.layout, n)
        if key not in self._gen_s:
            self._gen_s[key] = generation_cost(
                self.job, opt.layout, shape, n, self.profile, self.gpn
            ).seconds
        return self._gen_s[key]

    # ---- per set ------------------------------------------------------------------
    def best_set(self, roles: tuple[str, ...], n: int, prune: bool = True) -> SetChoice | None:
        """Best layouts of `roles` colocated on n GPUs, or None if they cannot fit."""
        key = (roles, n, prune)
        if key not in self._sets:
            self._sets[key] = self._search_set(roles, n, prune)
        return self._sets[key]

    def _partials(self, others: tuple[str, ...], n: int, prune: bool) -> list[_Partial]:
        """Joint layouts of non-actor roles on n GPUs; built one role at a time on the
        cached layouts of the roles before it (sets share these prefixes)."""
        key = (others, n, prune)
        if key not in self._partial_cache:
            if not others:
                self._partial_cache[key] = [_Partial(0.0, 0.0, (0.0,) * len(STAGES), ())]
                return self._partial_cache[key]
            role, usable = others[-1], self.profile.usable_bytes
            kind = Kind.TRAIN if role in CRITIC_ROLES else Kind.INFER
            trained = role in TRAINED_ROLES
            merged = [
                _Partial(
                    p.resident + c.resident,
                    max(p.transient, c.transient),
                    tuple(a + b for a, b in zip(p.stages, c.stages)),
                    p.layouts + ((role, {kind: c.layout}),),
                    p.memory + (((role, c.settings),) if trained else ()),
                )
                for p in self._partials(others[:-1], n, prune)
                for c in self.role_candidates(role, n, prune)
                if p.resident + c.resident + max(p.transient, c.transient) <= usable
            ]
            self._partial_cache[key] = _pareto(merged) if prune else merged
        return self._partial_cache[key]

    def _search_set(self, roles: tuple[str, ...], n: int, prune: bool) -> SetChoice | None:
        usable = self.profile.usable_bytes
        partial = self._partials(tuple(r for r in roles if r != "actor"), n, prune)
        if "actor" not in roles:
            alone = min(partial, key=lambda p: sum(p.stages), default=None)
            if alone is None:
                return None
            return SetChoice(
                alone.layouts, alone.stages, alone.resident + alone.transient, alone.memory
            )
        best: SetChoice | None = None
        partial = sorted(partial, key=lambda p: p.total)
        actors = [(a, self._fastest_generation(a)) for a in self.role_candidates("actor", n, prune)]
        for a, floor in sorted(actors, key=lambda x: x[0].total + x[1]):
            for p in partial:
                if prune and best is not None and p.total + a.total + floor >= best.total:
                    break  # partial is sorted by time: no later p can win with this actor
                choice = self._with_actor(a, p, usable)
                if choice is not None and (best is None or choice.total < best.total):
                    best = choice
        return best

    def _fastest_generation(self, a: Candidate) -> float:
        """Generation + reshard seconds of actor layout `a` with unlimited KV memory: a
        lower bound on what any colocation leaves it."""
        key = (a.layout, a.settings.fsdp)
        if key in self._fastest:
            return self._fastest[key]
        times = [
            self.generation_seconds(a.layout, opt, float("inf"), check=False) + opt.reshard_s
            for opt in self.gen_options(a.layout, a.settings.fsdp)
        ]
        self._fastest[key] = min((t for t in times if t is not None), default=float("inf"))
        return self._fastest[key]

    def _with_actor(self, a: Candidate, p: _Partial, usable: float) -> SetChoice | None:
        if p.resident + a.resident + max(p.transient, a.transient) > usable:
            return None
        res_all = p.resident + a.gen_resident
        best: SetChoice | None = None
        for opt in self.gen_options(a.layout, a.settings.fsdp):
            gen_s = self.generation_seconds(a.layout, opt, usable - res_all)
            if gen_s is None:
                continue
            stages = [x + y for x, y in zip(p.stages, a.stages)]
            stages[0] += gen_s
            stages[3] += opt.reshard_s
            if best is None or sum(stages) < best.total:
                lay = (("actor", {"train": a.layout, "generate": opt.layout}),) + p.layouts
                best = SetChoice(lay, tuple(stages), usable, (("actor", a.settings),) + p.memory)
        return best

    def min_size(self, roles: tuple[str, ...], limit: int) -> int | None:
        """Smallest set size up to `limit` on which `roles` fit together."""
        return next((n for n in set_sizes(self.gpn, limit) if self.best_set(roles, n)), None)
