"""The 3D-HybridEngine (paper §5): the actor trains in layout (p, t, d) and generates in
(pg=1, tg, dg, d) in the same processes, dg = p·t/tg.

Ranks follow megatron's order (TP fastest, then DP, then PP). Three resharding schemes, one
interface (the paper's Table 2):
- ``hybridengine``: generation TP groups strided at t/tg inside each training TP group,
  micro-DP groups consecutive; every rank's training shard lies inside its generation shard,
  so one all-gather per micro-DP group builds the generation weights.
- ``hybridengine-v``: consecutive generation groups; each rank gathers the whole model from
  its model-parallel group (p·t ranks), then keeps its generation shard.
- ``allgather``: every rank gathers the whole model from all p·t·d ranks (each DP replica
  contributes 1/d of its shard, as ZeRO-3 partitions would), then keeps its shard.
Replicated tensors (norms) are not part of Table 2: with p > 1 each rank gathers the other
stages' norms over its pipeline group; counted separately.
"""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from executor import weights as W
from executor.vllm_engine import Completion, SamplingConfig, VllmEngine
from simulator.layout import GenLayout, LayoutError, TrainLayout
from simulator.model import ModelSpec

SCHEMES = ("hybridengine", "hybridengine-v", "allgather")
_GROUPS: dict[tuple[int, tuple[int, ...]], object] = {}  # process groups made so far


class ReshardError(ValueError):
    """Unknown scheme or a generation layout the training layout cannot reach."""


@dataclass(frozen=True)
class ReshardPlan:
    """Who groups with whom for one (training layout, generation TP, scheme)."""
    train: TrainLayout
    tg: int
    scheme: str = "hybridengine"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ReshardError(f"unknown resharding scheme {self.scheme!r}: "
                               f"choose one of {', '.join(SCHEMES)}")
        mp = self.train.pp * self.train.tp
        if not isinstance(self.tg, int) or self.tg < 1 or self.train.tp % self.tg:
            raise ReshardError(f"generation tp={self.tg} must divide the training "
                               f"tp={self.train.tp} (generation pp is 1)")
        try:
            GenLayout(1, self.tg, max(mp // self.tg, 1)).check(self.train.n_gpus, self.train)
        except LayoutError as e:
            raise ReshardError(str(e)) from None

    @property
    def gen(self) -> GenLayout:
        return GenLayout(1, self.tg, self.train.pp * self.train.tp // self.tg)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, tp_rank, dp_rank) of a global rank."""
        t, d = self.train.tp, self.train.dp
        return rank // (t * d), rank % t, (rank // t) % d

    def rank(self, s: int, r: int, k: int) -> int:
        return r + self.train.tp * (k + self.train.dp * s)

    def _mp(self, k: int, idx: int) -> int:
        """Global rank of model-parallel index idx = r + t·s in DP replica k."""
        return self.rank(idx // self.train.tp, idx % self.train.tp, k)

    def gen_tp_groups(self) -> list[list[int]]:
        """Generation TP groups (global ranks ordered by generation TP rank)."""
        p, t, d, tg = self.train.pp, self.train.tp, self.train.dp, self.tg
        if self.scheme == "hybridengine":
            step = t // tg
            return [[self.rank(s, i + m * step, k) for m in range(tg)]
                    for k in range(d) for s in range(p) for i in range(step)]
        return [[self._mp(k, c * tg + m) for m in range(tg)]
                for k in range(d) for c in range(p * t // tg)]

    def micro_dp_groups(self) -> list[list[int]]:
        """Ranks with the same generation TP rank in one DP replica, one per replica,
        ordered by replica: the groups 3D_ALL_MICRO_DP splits prompts over."""
        p, t, d, tg = self.train.pp, self.train.tp, self.train.dp, self.tg
        if self.scheme == "hybridengine":
            step = t // tg
            return [[self.rank(s, j * step + i, k) for s in range(p) for i in range(step)]
                    for k in range(d) for j in range(tg)]
        return [[self._mp(k, idx) for idx in range(j, p * t, tg)]
                for k in range(d) for j in range(tg)]

    def gather_groups(self) -> list[list[int]]:
        """The groups each scheme all-gathers training shards over."""
        if self.scheme == "hybridengine":
            return self.micro_dp_groups()
        if self.scheme == "hybridengine-v":
            mp = self.train.pp * self.train.tp
            return [[self._mp(k, i) for i in range(mp)] for k in range(self.train.dp)]
        return [list(range(self.train.n_gpus))]

    def pipeline_groups(self) -> list[list[int]]:
        p, t, d = self.train.pp, self.train.tp, self.train.dp
        return [[self.rank(s, r, k) for s in range(p)] for k in range(d) for r in range(t)]

    def gen_tp_rank(self, rank: int) -> int:
        return next(g.index(rank) for g in self.gen_tp_groups() if rank in g)


@dataclass(frozen=True)
class ReshardStats:
    seconds: float
    bytes_received: int  # TP-sharded tensors: the Table 2 quantity
    replicated_bytes: int  # norms of other pipeline stages
    padding_bytes: int  # all-gather padding of unequal contributions (not payload)
    gather_seconds: float = 0.0  # the all-gathers (flattening included)
    load_seconds: float = 0.0  # conversion to vLLM and in-place reload


def _flatten(sd: W.StateDict, names: Sequence[str]) -> torch.Tensor:
    return torch.cat([sd[n].reshape(-1) for n in names]) if names else torch.empty(0)


def _unflatten(flat: torch.Tensor, shapes: dict[str, tuple[int, ...]], names: Sequence[str]
               ) -> W.StateDict:
    out, i = {}, 0
    for n in names:
        m = math.prod(shapes[n])
        out[n] = flat[i:i + m].view(shapes[n])
        i += m
    return out


def _all_gather_varlen(flat: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:
    """All-gather tensors of known, possibly unequal sizes (gloo needs equal: pad)."""
    n = max(sizes)
    buf = flat
    if flat.numel() < n:
        buf = torch.zeros(n, dtype=flat.dtype)
        buf[:flat.numel()] = flat
    out = [torch.empty(n, dtype=flat.dtype) for _ in sizes]
    dist.all_gather(out, buf, group=group)
    return [o[:s] for o, s in zip(out, sizes)]


class HybridEngine:
    """One rank's actor in both layouts. Create on every rank together (makes subgroups).

    ``engine_factory(gen_tp_groups)`` builds the generation engine (a VllmEngine); None
    runs the resharding only (tests of weights and bytes, benchmarks)."""

    def __init__(self, spec: ModelSpec, plan: ReshardPlan,
                 engine_factory: Callable[[list[list[int]]], VllmEngine] | None = None,
                 dtype: torch.dtype = torch.float32):
        if dist.get_world_size() != plan.train.n_gpus:
            raise ReshardError(f"layout needs {plan.train.n_gpus} ranks, world has "
                               f"{dist.get_world_size()}")
        W.check_tp(spec, plan.train.tp)
        W.stage_layers(spec, plan.train.pp, 0)
        self.spec, self.plan, self.dtype = spec, plan, dtype
        self.rank = dist.get_rank()
        self.stage, self.tp_rank, self.dp_rank = plan.coords(self.rank)
        self._full_shapes = W.megatron_shapes(spec)
        self._templates: dict[tuple[int, int, bool], tuple] = {}
        self._groups = {kind: self._subgroup(getattr(plan, f"{kind}_groups")())
                        for kind in ("gather", "micro_dp", "pipeline")}
        self.gen_tp_rank = plan.gen_tp_rank(self.rank)
        self.engine = engine_factory(plan.gen_tp_groups()) if engine_factory else None
        self.gen_shard: W.StateDict | None = None

    def _subgroup(self, groups: list[list[int]]) -> tuple[list[int], object]:
        mine = None
        for g in groups:  # every rank creates every group, in the same order
            key = (id(dist.group.WORLD), tuple(g))
            if len(g) > 1 and key not in _GROUPS:  # reused by later engines of this world
                _GROUPS[key] = dist.new_group(g)
            if self.rank in g:
                mine = (g, _GROUPS.get(key))
        assert mine is not None
        return mine

    # ---- shard bookkeeping ----------------------------------------------------------
    def _template(self, s: int, r: int, sharded: bool = True
                  ) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        """Shapes and (sorted) names of training shard (stage s, TP rank r); cached."""
        key = (s, r, sharded)
        if key not in self._templates:
            t = self.plan.train.tp
            shapes = {n: W.shard_shape(n, shape, t) for n, shape in
                      W.stage_state(self._full_shapes, self.spec, self.plan.train.pp, s).items()}
            names = sorted(n for n in shapes if (W.split_kind(n) != "replicated") == sharded)
            self._templates[key] = (shapes, names, sum(math.prod(shapes[n]) for n in names))
        return self._templates[key][:2]

    def _numel(self, s: int, r: int, sharded: bool = True) -> int:
        self._template(s, r, sharded)
        return self._templates[(s, r, sharded)][2]

    def _itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    # ---- gathers --------------------------------------------------------------------
    def _gather_shards(self, local: W.StateDict) -> tuple[dict[tuple[int, int], W.StateDict],
                                                           int, int]:
        """Training shards {(stage, tp rank): sharded tensors} this rank receives (its own
        included), payload bytes received, padding bytes."""
        members, group = self._groups["gather"]
        _, names = self._template(self.stage, self.tp_rank)
        flat = _flatten(local, names).to(self.dtype)
        coords = [self.plan.coords(m)[:2] for m in members]
        d = self.plan.train.dp if self.plan.scheme == "allgather" else 1
        sizes = [-(-self._numel(s, r) // d) for s, r in coords]
        if d > 1:  # this DP replica's 1/d piece of its shard
            flat = torch.nn.functional.pad(flat, (0, sizes[members.index(self.rank)] * d
                                                  - flat.numel()))
            flat = flat.view(d, -1)[self.dp_rank]
        parts = _all_gather_varlen(flat, sizes, group) if group else [flat]
        pieces: dict[tuple[int, int], list[torch.Tensor]] = {}
        for (s, r), m, part in zip(coords, members, parts):
            pieces.setdefault((s, r), [None] * d)[self.plan.coords(m)[2] if d > 1 else 0] = part
        shards = {}
        for (s, r), ps in pieces.items():
            template, tnames = self._template(s, r)
            shards[(s, r)] = _unflatten(ps[0] if d == 1 else torch.cat(ps), template, tnames)
        mine = members.index(self.rank)
        received = sum(sz for i, sz in enumerate(sizes) if i != mine) * self._itemsize()
        padding = sum(max(sizes) - sz for i, sz in enumerate(sizes) if i != mine)
        return shards, received, padding * self._itemsize()

    def _gather_norms(self, local: W.StateDict) -> tuple[W.StateDict, int]:
        members, group = self._groups["pipeline"]
        _, names = self._template(self.stage, self.tp_rank, sharded=False)
        own = {n: local[n].to(self.dtype) for n in names}
        if group is None:
            return own, 0
        sizes = [self._numel(s, 0, False) for s in range(len(members))]
        parts = _all_gather_varlen(_flatten(own, names), sizes, group)
        out: W.StateDict = {}
        for s, part in enumerate(parts):
            template, tnames = self._template(s, 0, sharded=False)
            out.update(_unflatten(part, template, tnames))
        return out, (sum(sizes) - sizes[self.stage]) * self._itemsize()

    def _assemble(self, shards: dict[tuple[int, int], W.StateDict]) -> W.StateDict:
        """This rank's generation shard (megatron names, TP degree tg): the t/tg consecutive
        training shards it consists of, merged. hybridengine received exactly those;
        the other schemes received the whole model and use the same part of it."""
        p, t, tg = self.plan.train.pp, self.plan.train.tp, self.plan.tg
        step, j = t // tg, self.gen_tp_rank
        out: W.StateDict = {}
        for s in range(p):
            part = [shards[(s, r)] for r in range(j * step, (j + 1) * step)]
            out.update(W.merge_tp(part) if step > 1 else
                       {n: v.clone() for n, v in part[0].items()})
        return out

    # ---- the three phases -----------------------------------------------------------
    def to_generation(self, train_shard: W.StateDict) -> ReshardStats:
        """Build the generation weights from this rank's training shard (megatron names,
        global layer indices) and load them into the engine in place."""
        dist.barrier()
        t0 = time.perf_counter()
        shards, received, padding = self._gather_shards(train_shard)
        norms, norm_bytes = self._gather_norms(train_shard)
        t1 = time.perf_counter()
        gen = self._assemble(shards)
        gen.update(norms)
        del shards
        self.gen_shard = gen
        t2 = time.perf_counter()
        if self.engine is not None:
            self.engine.wake()
            self.engine.load_sharded(W.megatron_to_vllm(gen, self.spec, self.plan.tg))
        t3 = time.perf_counter()
        dist.barrier()
        return ReshardStats(time.perf_counter() - t0, received, norm_bytes, padding,
                            gather_seconds=t1 - t0, load_seconds=t3 - t2)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig
                 ) -> list[Completion]:
        """3D_ALL_MICRO_DP: `prompts` are this DP replica's (the same on all its ranks);
        each generation replica takes its part, the results are gathered back so every rank
        of the DP replica returns all completions, in prompt order."""
        if self.engine is None or self.gen_shard is None:
            raise ReshardError("generate() needs an engine and to_generation() first")
        members, group = self._groups["micro_dp"]
        offset, mine = split_micro_dp(prompts, members.index(self.rank), len(members))
        local = [Completion(c.prompt_index + offset, c.sample, c.token_ids, c.logprobs)
                 for c in self.engine.generate(mine, sampling)]
        return gather_micro_dp(local, group, len(members))

    def to_training(self) -> None:
        """Drop the generation weights and free the KV cache (GPU: vLLM sleep)."""
        self.gen_shard = None
        if self.engine is not None:
            self.engine.free_cache()
        gc.collect()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


# ---- 3D_ALL_MICRO_DP transfer protocol --------------------------------------------------
def split_micro_dp(items: Sequence, replica: int, replicas: int) -> tuple[int, list]:
    """Replica `replica`'s contiguous part of `items` (sizes differ by at most one) and
    the index of its first item."""
    if not 0 <= replica < replicas:
        raise ReshardError(f"replica {replica} out of range for {replicas} replicas")
    n = len(items)
    start = replica * n // replicas
    return start, list(items[start:(replica + 1) * n // replicas])


def gather_micro_dp(local: list, group, replicas: int) -> list:
    """Concatenate every replica's results (in replica order) on each member."""
    if group is None:
        return list(local)
    out: list = [None] * replicas
    dist.all_gather_object(out, local, group=group)
    return [x for part in out for x in part]
