"""Collective latency and bandwidth through torch.distributed, with the executor's backend.

One world of N ranks is spawned; groups of the first g ranks (g = 2 .. N) time all-reduce,
all-gather and broadcast over message sizes, and ranks 0 and 1 time point-to-point. Units of
`bytes`: all_reduce and broadcast, the buffer on each rank; all_gather, the gathered output
(each rank contributes bytes / ranks); p2p, the message sent one way.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridflow.executor.spawn import run_ranks

OPS = ("all_reduce", "all_gather", "broadcast", "p2p")


@dataclass(frozen=True)
class CollectiveGrid:
    world: int
    sizes: tuple[int, ...]  # message sizes in bytes
    repeats: int = 5
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 2:
            raise ValueError(f"collectives need at least 2 ranks, got {self.world}")
        if not self.sizes or any(not isinstance(s, int) or s <= 0 for s in self.sizes):
            raise ValueError(f"collective sizes must be positive byte counts: {self.sizes}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    @property
    def group_sizes(self) -> tuple[int, ...]:
        sizes, g = [], 2
        while g < self.world:
            sizes.append(g)
            g *= 2
        return tuple(sizes + [self.world])


def default_grid(world: int, quick: bool, gpu: bool) -> CollectiveGrid:
    if gpu:
        sizes = (1 << 16, 1 << 22, 1 << 28) if quick else tuple(1 << e for e in range(12, 31, 3))
        return CollectiveGrid(world, sizes, repeats=5 if quick else 10, dtype="bfloat16")
    sizes = (1 << 12, 1 << 18, 1 << 22) if quick else tuple(1 << e for e in range(10, 25, 2))
    return CollectiveGrid(world, sizes, repeats=3 if quick else 5)


def _elements(nbytes: int, dtype: torch.dtype, multiple: int) -> int:
    size = torch.finfo(dtype).bits // 8
    return max(multiple, (nbytes // size) // multiple * multiple)


def _timed(fn, group, repeats: int) -> float:
    """Median over repeats of the slowest rank's seconds (all ranks start together)."""
    fn()
    samples = []
    for _ in range(repeats):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=_dev())
        dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group)
        samples.append(float(took.item()))
    return statistics.median(samples)


def _dev() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _group_rows(grid: CollectiveGrid, g: int, group, rank: int) -> list[dict]:
    dtype = getattr(torch, grid.dtype)
    rows = []
    for nbytes in grid.sizes:
        n = _elements(nbytes, dtype, g)
        buf = torch.ones(n, dtype=dtype, device=_dev())
        shard = torch.ones(n // g, dtype=dtype, device=_dev())
        fns = {
            "all_reduce": lambda: dist.all_reduce(buf, group=group),
            "all_gather": lambda: _all_gather(buf, shard, group=group),
            "broadcast": lambda: dist.broadcast(buf, src=0, group=group),
        }
        for op, fn in fns.items():
            seconds = _timed(fn, group, grid.repeats)
            rows.append({"op": op, "ranks": g, "bytes": n * buf.element_size(), "seconds": seconds})
    return rows


def _p2p_rows(grid: CollectiveGrid, group, rank: int) -> list[dict]:
    dtype = getattr(torch, grid.dtype)
    rows = []
    for nbytes in grid.sizes:
        buf = torch.ones(_elements(nbytes, dtype, 1), dtype=dtype, device=_dev())

        def ping_pong() -> None:
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)

        seconds = _timed(ping_pong, group, grid.repeats) / 2
        rows.append(
            {"op": "p2p", "ranks": 2, "bytes": buf.numel() * buf.element_size(), "seconds": seconds}
        )
    return rows


def _rank_collectives(rank: int, world: int, grid: CollectiveGrid) -> list[dict]:
    rows: list[dict] = []
    for g in grid.group_sizes:
        group = dist.new_group(list(range(g)))  # every rank must take part in new_group
        if rank < g:
            rows += _group_rows(grid, g, group, rank)
            if g == 2:
                rows += _p2p_rows(grid, group, rank)
        dist.barrier()
    return rows


def measure_collectives(
    grid: CollectiveGrid, backend: str, threads: int = 1
) -> dict[str, list[dict]]:
    """{op: [{ranks, bytes, seconds}, ...]} for op in all_reduce, all_gather, broadcast, p2p."""

    rows = run_ranks(_rank_collectives, grid.world, grid, backend=backend, threads=threads)[0]
    return {
        op: [{k: r[k] for k in ("ranks", "bytes", "seconds")} for r in rows if r["op"] == op]
        for op in OPS
    }
