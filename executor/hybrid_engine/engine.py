"""The 3D-HybridEngine (paper §5): the actor trains in layout (p, t, d) and generates in
(pg=1, tg, dg, d) in the same processes, dg = p·t/tg.

Ranks follow megatron's order (TP fastest, then DP, then PP); who groups with whom is
executor.hybrid_engine.reshard_plan. Three resharding schemes, one interface (Table 2):
- ``hybridengine``: generation TP groups strided at t/tg inside each training TP group,
  micro-DP groups consecutive; every rank's training shard lies inside its generation shard,
  so one all-gather per micro-DP group builds the generation weights.
- ``hybridengine-v``: consecutive generation groups; each rank gathers the whole model from
  its model-parallel group (p·t ranks), then keeps its generation shard.
- ``allgather``: every rank gathers the whole model from all p·t·d ranks (each DP replica
  contributes 1/d of its shard, as ZeRO-3 partitions would), then keeps its shard.
Replicated tensors (norms) are not part of Table 2: with p > 1 each rank gathers the other
stages' norms over its pipeline group; counted separately.

Every scheme builds the generation shard the same way, only the gather group differs: the
all-gather is point-to-point messages, one per tensor (fc1: per gate/up half), each received
straight into its place in a generation buffer when it belongs to this rank's generation
shard and is contiguous there (row-split tensors and the parts a scheme gathers beyond the
generation shard land in a scratch buffer); then the own shard and the row-split parts are
copied in. Buffers and messages are planned once and reused. (gloo's all_gather would
receive into a fresh staging buffer and copy out; on a CPU, first touching fresh pages costs
more than the copy, and the merge into the generation layout would be another copy.)
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridflow.executor.engines import weights as W
from hybridflow.executor.engines.vllm_engine import Completion, SamplingConfig, VllmEngine
from hybridflow.executor.hybrid_engine.reshard_plan import (
    ReshardError,
    ReshardPlan,
    ReshardStats,
    gather_micro_dp,
    split_micro_dp,
)
from hybridflow.simulator.architecture import ModelSpec

_GROUPS: dict[tuple[int, tuple[int, ...]], object] = {}  # process groups made so far


_NORM_TAG = 1 << 20  # message tag of the norms; the sharded tensors' tags count from 0


def _messages(
    shapes: dict[str, tuple[int, ...]], names: Sequence[str], d: int, k: int
) -> list[tuple[str, int, int]]:
    """What the holder of piece k of d of a training shard sends each peer: (name, begin,
    end) in the flattened tensors, in tag order. d > 1 (allgather) splits every tensor in
    d pieces, as ZeRO-3 partitions parameters; fc1 is split between gate and up, which lie
    apart in the generation shard."""
    out = []
    for n in names:
        numel = math.prod(shapes[n])
        piece = -(-numel // d)
        lo, hi = min(k * piece, numel), min((k + 1) * piece, numel)
        half = numel // 2 if W.split_kind(n) == "fc1" else numel
        for a, e in ((max(lo, 0), min(hi, half)), (max(lo, half), min(hi, numel))):
            if a < e:
                out.append((n, a, e))
    return out


@dataclass
class _Transfer:
    """One rank's buffers and the messages that fill them: built once, reused."""

    gen: torch.Tensor  # generation shard, megatron layout; the norms of every stage last
    scratch: torch.Tensor  # received parts not placed in `gen` as they arrive
    gen_views: W.StateDict
    recvs: list  # P2POp: irecv of each message of the gather group
    sends: list[tuple[int, int, str, int, int]]  # peer, tag, name, begin, end
    norm_ops: list  # P2POp: the norms over the pipeline group
    own_norms: list[tuple[torch.Tensor, str]]  # place in `gen`, name in the training shard
    own: list[tuple[torch.Tensor, str]]  # the same for the own shard (if in the generation one)
    fills: list[tuple[torch.Tensor, torch.Tensor]]  # place in `gen`, part in `scratch`
    received: int  # numel received, sharded tensors
    replicated: int  # numel received, norms


class HybridEngine:
    """One rank's actor in both layouts. Create on every rank together (makes subgroups).

    ``engine_factory(gen_tp_groups)`` builds the generation engine (a VllmEngine); None
    runs the resharding only (tests of weights and bytes, benchmarks).

    ``keep_buffers``: keep the receive and generation buffers between switches (reused,
    overwritten by each to_generation()). On a CPU a fresh buffer costs a page fault per
    4 KiB page, more than the copy into it, and vLLM's own weights stay resident anyway;
    False frees them in to_training() (GPU with vLLM sleep)."""

    def __init__(
        self,
        spec: ModelSpec,
        plan: ReshardPlan,
        engine_factory: Callable[[list[list[int]]], VllmEngine] | None = None,
        dtype: torch.dtype = torch.float32,
        keep_buffers: bool = True,
    ):
        if dist.get_world_size() != plan.train.n_gpus:
            raise ReshardError(
                f"layout needs {plan.train.n_gpus} ranks, world has {dist.get_world_size()}"
            )
        W.check_tp(spec, plan.train.tp)
        W.stage_layers(spec, plan.train.pp, 0)
        self.spec, self.plan, self.dtype = spec, plan, dtype
        self.keep_buffers = keep_buffers
        self.rank = dist.get_rank()
        me = plan.train.coords(self.rank)
        self.stage, self.tp_rank, self.dp_rank = me.pp, me.tp, me.dp
        self._full_shapes = W.megatron_shapes(spec)
        self._templates: dict[tuple[int, int, bool], tuple] = {}
        self._groups = {
            kind: self._subgroup(getattr(plan, f"{kind}_groups")())
            for kind in ("gather", "micro_dp", "pipeline")
        }
        self.gen_tp_rank = plan.gen_tp_rank(self.rank)
        self._xfer: _Transfer | None = None
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

    # ---- layouts --------------------------------------------------------------------
    def _template(
        self, s: int, r: int, sharded: bool = True
    ) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        """Shapes and (sorted) names of training shard (stage s, TP rank r); cached."""
        key = (s, r, sharded)
        if key not in self._templates:
            t = self.plan.train.tp
            shapes = {
                n: W.shard_shape(n, shape, t)
                for n, shape in W.stage_state(
                    self._full_shapes, self.spec, self.plan.train.pp, s
                ).items()
            }
            names = sorted(n for n in shapes if (W.split_kind(n) != "replicated") == sharded)
            self._templates[key] = (shapes, names, sum(math.prod(shapes[n]) for n in names))
        return self._templates[key][:2]

    def _numel(self, s: int, r: int, sharded: bool = True) -> int:
        self._template(s, r, sharded)
        return self._templates[(s, r, sharded)][2]

    def _gen_layout(
        self,
    ) -> tuple[list[tuple[str, int, tuple[int, ...]]], list[tuple[int, int]], int]:
        """(name, offset, shape) of every generation tensor (TP tg, all stages: pg = 1),
        the norms region of each stage (contiguous: one message each), total numel."""
        p, tg = self.plan.train.pp, self.plan.tg
        entries, off = [], 0
        for s in range(p):
            for n in self._template(s, 0)[1]:
                shape = W.shard_shape(n, self._full_shapes[n], tg)
                entries.append((n, off, shape))
                off += math.prod(shape)
        slots = []
        for s in range(p):
            shapes, names = self._template(s, 0, sharded=False)
            slots.append((off, self._numel(s, 0, sharded=False)))
            for n in names:
                entries.append((n, off, shapes[n]))
                off += math.prod(shapes[n])
        return entries, slots, off

    def _stage_tp(self, rank: int) -> tuple[int, int]:
        """(pipeline stage, training TP rank) of a rank: which training shard it holds."""
        c = self.plan.train.coords(rank)
        return c.pp, c.tp

    def _part(self, r: int) -> int | None:
        """Which part of this rank's generation shard training TP rank r's shard is."""
        step = self.plan.train.tp // self.plan.tg
        i = r - self.gen_tp_rank * step
        return i if 0 <= i < step else None

    def _transfer(self) -> _Transfer:
        """Buffers and messages, built on first use. The same for every scheme: only the
        gather group differs."""
        if self._xfer is not None:
            return self._xfer
        entries, norm_slots, numel = self._gen_layout()
        gen = torch.empty(numel, dtype=self.dtype)
        gen_views = {n: gen[o : o + math.prod(sh)].view(sh) for n, o, sh in entries}
        members = self._groups["gather"][0]
        shards = list(dict.fromkeys(self._stage_tp(m) for m in members))
        offsets = [0]
        for s, r in shards:
            offsets.append(offsets[-1] + self._numel(s, r))
        scratch = torch.empty(offsets[-1], dtype=self.dtype)
        region = {
            sr: W.flat_views(scratch, o, *self._template(*sr)) for sr, o in zip(shards, offsets)
        }
        recvs, received = self._receives(gen_views, region)
        d = self.plan.train.dp if self.plan.scheme == "allgather" else 1
        sends = [
            (m, tag, *msg)
            for m in members
            if m != self.rank
            for tag, msg in enumerate(
                _messages(
                    *self._template(self.stage, self.tp_rank), d, self.dp_rank if d > 1 else 0
                )
            )
        ]
        own, fills = self._copies(shards, gen_views, region)
        norm_ops, replicated = self._norm_ops(gen, norm_slots)
        own_norms = [(gen_views[n], n) for n in self._template(self.stage, 0, False)[1]]
        self._xfer = _Transfer(
            gen,
            scratch,
            gen_views,
            recvs,
            sends,
            norm_ops,
            own_norms,
            own,
            fills,
            received,
            replicated,
        )
        return self._xfer

    def _copies(
        self,
        shards: list[tuple[int, int]],
        gen_views: W.StateDict,
        region: dict[tuple[int, int], W.StateDict],
    ) -> tuple[list, list]:
        """Where the own shard goes in the generation buffer (copied in whole), and the
        row-split parts received into scratch that are copied into place after the gather."""
        own, fills = [], []
        for s, r in shards:
            i, step = self._part(r), self.plan.train.tp // self.plan.tg
            if i is None:
                continue
            for n in self._template(s, r)[1]:
                at = W.part_view(gen_views[n], W.split_kind(n), i, step)
                if (s, r) == (self.stage, self.tp_rank):
                    own.append((at, n))
                elif W.split_kind(n) == "row":
                    fills.append((at, region[(s, r)][n]))
        return own, fills

    def _receives(
        self, gen_views: W.StateDict, region: dict[tuple[int, int], W.StateDict]
    ) -> tuple[list, int]:
        """An irecv per message from every other member of the gather group: straight into
        place in the generation buffer when the part is this rank's and contiguous there,
        else into the shard's region of the scratch buffer (whole shards; pages where
        nothing lands are never touched). Other DP replicas' pieces of the own shard
        (allgather, d > 1) go to scratch too: the own shard is copied in whole."""
        members, group = self._groups["gather"]
        d = self.plan.train.dp if self.plan.scheme == "allgather" else 1
        step = self.plan.train.tp // self.plan.tg
        ops, received = [], 0
        for m in members:
            c = self.plan.train.coords(m)
            s, r, k = c.pp, c.tp, c.dp
            if m == self.rank:
                continue
            i = self._part(r) if (s, r) != (self.stage, self.tp_rank) else None
            for tag, (n, a, e) in enumerate(_messages(*self._template(s, r), d, k if d > 1 else 0)):
                dst = (
                    None
                    if i is None
                    else W.part_slice(gen_views[n], W.split_kind(n), i, step, a, e)
                )
                dst = region[(s, r)][n].view(-1)[a:e] if dst is None else dst
                ops.append(dist.P2POp(dist.irecv, dst, m, group, tag))
                received += e - a
        return ops, received

    def _norm_ops(self, gen: torch.Tensor, slots: list[tuple[int, int]]) -> tuple[list, int]:
        """Each stage sends its norms (its region of `gen`) to the other stages."""
        members, group = self._groups["pipeline"]  # ordered by stage
        if group is None:
            return [], 0
        o, n = slots[self.stage]
        ops = [
            dist.P2POp(dist.isend, gen[o : o + n], m, group, _NORM_TAG)
            for m in members
            if m != self.rank
        ]
        ops += [
            dist.P2POp(dist.irecv, gen[a : a + b], m, group, _NORM_TAG)
            for m, (a, b) in zip(members, slots)
            if m != self.rank
        ]
        return ops, sum(b for s, (_, b) in enumerate(slots) if s != self.stage)

    # ---- the three phases -----------------------------------------------------------
    def to_generation(self, train_shard: W.StateDict) -> ReshardStats:
        """Build the generation weights from this rank's training shard (megatron names,
        global layer indices) and load them into the engine in place.

        The generation shard (``gen_shard``, megatron layout, TP degree tg; valid until the
        next call) is built the same way by every scheme: one all-gather over the scheme's
        group, each message received into place, then the own and the row-split parts
        copied in. hybridengine received exactly its generation shard; the other schemes
        received the whole model and use the same part of it."""
        dist.barrier()
        t0 = time.perf_counter()
        x = self._transfer()
        for at, n in x.own_norms:
            at.copy_(train_shard[n])
        flat = {
            n: train_shard[n].detach().to(self.dtype).reshape(-1)
            for n in dict.fromkeys(n for _, _, n, _, _ in x.sends)
        }
        group = self._groups["gather"][1]
        sends = [
            dist.P2POp(dist.isend, flat[n][a:e], peer, group, tag) for peer, tag, n, a, e in x.sends
        ]
        works = [
            w for ops in (x.recvs + sends, x.norm_ops) if ops for w in dist.batch_isend_irecv(ops)
        ]
        for w in works:
            w.wait()
        t1 = time.perf_counter()
        for at, n in x.own:  # after: copying while messages fly competes with gloo's threads
            at.copy_(train_shard[n].reshape(at.shape))
        for at, part in x.fills:
            at.copy_(part)
        self.gen_shard = dict(x.gen_views)
        t2 = time.perf_counter()
        if self.engine is not None:
            self.engine.wake()
            self.engine.load_sharded(W.megatron_to_vllm(self.gen_shard, self.spec, self.plan.tg))
        t3 = time.perf_counter()
        dist.barrier()
        item = x.gen.element_size()
        return ReshardStats(
            time.perf_counter() - t0,
            x.received * item,
            x.replicated * item,
            gather_seconds=t1 - t0,
            assemble_seconds=t2 - t1,
            load_seconds=t3 - t2,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        ids: Sequence[int] | None = None,
    ) -> list[Completion]:
        """3D_ALL_MICRO_DP: `prompts` are this DP replica's (the same on all its ranks);
        each generation replica takes its part, the results are gathered back so every rank
        of the DP replica returns all completions, in prompt order. `ids`: each prompt's
        index in the whole batch, which seeds its sampling (so samples do not depend on the
        placement); default: the index among `prompts`."""
        if self.engine is None or self.gen_shard is None:
            raise ReshardError("generate() needs an engine and to_generation() first")
        members, group = self._groups["micro_dp"]
        offset, mine = split_micro_dp(prompts, members.index(self.rank), len(members))
        ids = list(range(len(prompts))) if ids is None else list(ids)
        local = [
            Completion(c.prompt_index + offset, c.sample, c.token_ids, c.logprobs)
            for c in self.engine.generate(mine, sampling, ids[offset : offset + len(mine)])
        ]
        return gather_micro_dp(local, group, len(members))

    def to_training(self) -> None:
        """Drop the generation weights and free the KV cache (GPU: vLLM sleep); with
        keep_buffers=False also the receive and generation buffers."""
        self.gen_shard = None
        if self.engine is not None:
            self.engine.free_cache()
        if not self.keep_buffers:
            self._xfer = None
            gc.collect()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
