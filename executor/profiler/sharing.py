"""How ranks that share a host's cores slow each other down, measured interleaved.

One world of N processes (one thread each, as the executor's ranks) repeats rounds: in a
round the first k ranks run the same fixed piece of work at once (small matmuls and the
Python around them, the mix of the executor's per-call work on a small model) while the
others wait at a barrier; k cycles through the counts asked for, round after round. The
factor at k is the median, over rounds, of the k ranks' mean seconds over the seconds of the
neighbouring one-rank rounds: other load on the machine that comes and goes then weighs on
both sides of each ratio alike, as it would not if each count were timed in its own block.
Factors never decrease with more ranks (a dip is noise and is lifted to the count below).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from hybridflow.executor.spawn import run_ranks


@dataclass(frozen=True)
class SharingGrid:
    world: int
    counts: tuple[int, ...]  # concurrent ranks to time (1 included)
    rounds: int = 9
    work_s: float = 0.05  # about this long alone

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"sharing needs at least one rank, got {self.world!r}")
        if 1 not in self.counts or min(self.counts) < 1 or max(self.counts) > self.world:
            raise ValueError(
                f"sharing counts must include 1 and lie in 1..{self.world}: {self.counts}"
            )
        if self.rounds < 1 or not self.work_s > 0:
            raise ValueError("rounds and work_s must be positive")


def _unit(a: torch.Tensor, b: torch.Tensor, reps: int) -> None:
    for _ in range(reps):
        c = a @ b
        c = torch.nn.functional.silu(c) + 1.0
        float(c[0, 0])


def _calibrate(a: torch.Tensor, b: torch.Tensor, work_s: float) -> int:
    _unit(a, b, 10)
    t0 = time.perf_counter()
    _unit(a, b, 50)
    per = (time.perf_counter() - t0) / 50
    return max(1, int(work_s / max(per, 1e-7)))


def _rank_sharing(rank: int, world: int, grid: SharingGrid) -> list[tuple[int, float]]:
    """(concurrent ranks, seconds) of this rank's timed rounds."""
    dist = torch.distributed
    a, b = torch.randn(64, 352), torch.randn(352, 128)
    reps = torch.tensor([_calibrate(a, b, grid.work_s)])
    if world > 1:
        dist.broadcast(reps, src=0)  # the same work everywhere
    out = []
    for _ in range(grid.rounds):
        for k in grid.counts:
            if world > 1:
                dist.barrier()
            if rank < k:
                t0 = time.perf_counter()
                _unit(a, b, int(reps))
                out.append((k, time.perf_counter() - t0))
            if world > 1:
                dist.barrier()
    return out


def factors(per_rank: list[list[tuple[int, float]]], counts: tuple[int, ...]) -> dict[int, float]:
    """{k: slowdown}: per round, the mean seconds at k over the same round's one-rank
    seconds; the median over rounds (1 -> 1.0)."""
    rounds = len(per_rank[0]) // sum(1 for _ in counts if _ >= 1) if per_rank[0] else 0
    alone = [s for k, s in per_rank[0] if k == 1]
    out = {1: 1.0}
    for k in counts:
        if k == 1:
            continue
        at_k = [[s for kk, s in rows if kk == k] for rows in per_rank[:k]]
        ratios = [
            statistics.fmean(r[i] for r in at_k) / alone[i] for i in range(min(rounds, len(alone)))
        ]
        out[k] = max(1.0, statistics.median(ratios))
    # more busy ranks never run faster: a dip is noise (other load in those rounds)
    for a, b in zip(sorted(out), sorted(out)[1:]):
        out[b] = max(out[b], out[a])
    return out


def measure_sharing(grid: SharingGrid, threads: int = 1) -> dict[int, float]:
    """{concurrent ranks: slowdown factor} on this host."""

    per_rank = run_ranks(
        _rank_sharing, grid.world, grid, backend="gloo" if grid.world > 1 else None, threads=threads
    )
    return factors(per_rank, grid.counts)
