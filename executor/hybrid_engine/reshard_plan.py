"""Who groups with whom when the 3D-HybridEngine moves the actor from its training layout
(p, t, d) to its generation layout (pg=1, tg, dg, d), dg = p·t/tg (paper §5, Table 2), and
how the 3D_ALL_MICRO_DP protocol splits prompts over a micro-DP group and gathers results.

Ranks follow megatron's order (TP fastest, then DP, then PP). Per scheme:
- ``hybridengine``: generation TP groups strided at t/tg inside each training TP group,
  micro-DP groups consecutive; every rank's training shard lies inside its generation shard,
  so one all-gather per micro-DP group builds the generation weights.
- ``hybridengine-v``: consecutive generation groups; each rank gathers the whole model from
  its model-parallel group (p·t ranks).
- ``allgather``: every rank gathers the whole model from all p·t·d ranks.
The moving itself is hybridflow.executor.hybrid_engine.engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

from hybridflow.layout import GenLayout, LayoutError, ParallelLayout
from hybridflow.simulator.reshard import SCHEMES, ReshardError


@dataclass(frozen=True)
class ReshardPlan:
    """Who groups with whom for one (training layout, generation TP, scheme)."""

    train: ParallelLayout
    tg: int
    scheme: str = "hybridengine"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ReshardError(
                f"unknown resharding scheme {self.scheme!r}: choose one of {', '.join(SCHEMES)}"
            )
        mp = self.train.pp * self.train.tp
        if not isinstance(self.tg, int) or self.tg < 1 or self.train.tp % self.tg:
            raise ReshardError(
                f"generation tp={self.tg} must divide the training "
                f"tp={self.train.tp} (generation pp is 1)"
            )
        try:
            GenLayout(1, self.tg, max(mp // self.tg, 1)).check(self.train.n_gpus, self.train)
        except LayoutError as e:
            raise ReshardError(str(e)) from None

    @property
    def gen(self) -> GenLayout:
        return GenLayout(1, self.tg, self.train.pp * self.train.tp // self.tg)

    def rank(self, s: int, r: int, k: int) -> int:
        """Global rank of pipeline stage s, training TP rank r, DP replica k."""
        return self.train.rank_of(pp=s, dp=k, tp=r)

    def _mp(self, k: int, idx: int) -> int:
        """Global rank of model-parallel index idx = r + t·s in DP replica k."""
        return self.rank(idx // self.train.tp, idx % self.train.tp, k)

    def gen_tp_groups(self) -> list[list[int]]:
        """Generation TP groups (global ranks ordered by generation TP rank)."""
        p, t, d, tg = self.train.pp, self.train.tp, self.train.dp, self.tg
        if self.scheme == "hybridengine":
            step = t // tg
            return [
                [self.rank(s, i + m * step, k) for m in range(tg)]
                for k in range(d)
                for s in range(p)
                for i in range(step)
            ]
        return [
            [self._mp(k, c * tg + m) for m in range(tg)]
            for k in range(d)
            for c in range(p * t // tg)
        ]

    def micro_dp_groups(self) -> list[list[int]]:
        """Ranks with the same generation TP rank in one DP replica, one per replica,
        ordered by replica: the groups 3D_ALL_MICRO_DP splits prompts over."""
        p, t, d, tg = self.train.pp, self.train.tp, self.train.dp, self.tg
        if self.scheme == "hybridengine":
            step = t // tg
            return [
                [self.rank(s, j * step + i, k) for s in range(p) for i in range(step)]
                for k in range(d)
                for j in range(tg)
            ]
        return [
            [self._mp(k, idx) for idx in range(j, p * t, tg)] for k in range(d) for j in range(tg)
        ]

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
    gather_seconds: float = 0.0  # the all-gathers, messages received into place
    assemble_seconds: float = 0.0  # own shard and row-split parts into the generation shard
    load_seconds: float = 0.0  # conversion to vLLM and in-place reload


# ---- 3D_ALL_MICRO_DP transfer protocol --------------------------------------------------
def split_micro_dp(items: Sequence, replica: int, replicas: int) -> tuple[int, list]:
    """Replica `replica`'s contiguous part of `items` (sizes differ by at most one) and
    the index of its first item."""
    if not 0 <= replica < replicas:
        raise ReshardError(f"replica {replica} out of range for {replicas} replicas")
    n = len(items)
    start = replica * n // replicas
    return start, list(items[start : (replica + 1) * n // replicas])


def gather_micro_dp(local: list, group, replicas: int) -> list:
    """Concatenate every replica's results (in replica order) on each member."""
    if group is None:
        return list(local)
    out: list = [None] * replicas
    dist.all_gather_object(out, local, group=group)
    return [x for part in out for x in part]
