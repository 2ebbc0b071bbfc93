"""Operator timings: matmul, attention and elementwise ops over a grid of shapes.

Each table is measured by one rank alone and by k ranks at once (each rank one process with
the executor's thread count), so the simulator can see how ranks that share a host's cores slow
each other down. Times are medians of repeated runs after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hybridflow.executor.spawn import run_ranks


@dataclass(frozen=True)
class OpGrid:
    """Shapes to time. matmul: (m, n, k) = (tokens, out, in); attention: (batch, heads, seq,
    head_dim); elementwise: element counts."""

    matmul: tuple[tuple[int, int, int], ...]
    attention: tuple[tuple[int, int, int, int], ...]
    elementwise: tuple[int, ...]
    dtype: str = "float32"
    min_time_s: float = 0.02  # time each shape at least this long (after one warm-up)

    def __post_init__(self) -> None:
        for name in ("matmul", "attention", "elementwise"):
            rows = getattr(self, name)
            flat = [v for r in rows for v in (r if isinstance(r, tuple) else (r,))]
            if not rows or any(not isinstance(v, int) or v <= 0 for v in flat):
                raise ValueError(f"op grid {name} must be non-empty positive integers: {rows}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"op grid dtype must be float32, bfloat16 or float16: {self.dtype}")
        if not self.min_time_s > 0:
            raise ValueError(f"min_time_s must be positive, got {self.min_time_s}")


def default_grid(quick: bool, gpu: bool) -> OpGrid:
    """CPU grids around the tiny models' shapes; GPU grids around 7B-70B shapes."""
    if gpu:
        dims: tuple[int, ...] = (1024, 4096, 8192) if quick else (1024, 2048, 4096, 8192, 16384)
        tokens: tuple[int, ...] = (256, 4096) if quick else (64, 256, 1024, 4096, 16384)
        attention = (
            ((1, 32, 512, 128), (8, 32, 2048, 128))
            if quick
            else tuple((b, 32, s, 128) for b in (1, 8) for s in (256, 1024, 4096))
        )
        return OpGrid(
            tuple((m, n, k) for m in tokens for n in dims for k in dims),
            attention,
            (1 << 20, 1 << 24, 1 << 27),
            dtype="bfloat16",
            min_time_s=0.01,
        )
    dims = (128, 512) if quick else (128, 352, 512, 1024)
    tokens = (16, 256) if quick else (16, 64, 256, 1024)
    attention = (
        ((1, 4, 64, 32), (4, 4, 256, 32))
        if quick
        else tuple((b, 4, s, 32) for b in (1, 4) for s in (32, 128, 512))
    )
    elementwise = (1 << 14, 1 << 20) if quick else (1 << 12, 1 << 16, 1 << 20, 1 << 22)
    return OpGrid(
        tuple((m, n, k) for m in tokens for n in dims for k in dims),
        attention,
        elementwise,
        min_time_s=0.01 if quick else 0.03,
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], min_time_s: float, blocks: int = 3) -> float:
    """Seconds per call: the median over `blocks` back-to-back loops, each at least
    `min_time_s` long, of the loop's mean. Loops (not single calls) so that time lost to
    other processes sharing the cores is counted."""
    fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    once = max(time.perf_counter() - t0, 1e-7)
    count = max(1, min(10_000, int(min_time_s / once)))
    means = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        _sync()
        means.append((time.perf_counter() - t0) / count)
    return statistics.median(means)


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def matmul_table(grid: OpGrid, before: Callable[[], None] = lambda: None) -> list[dict]:
    dev, dtype = _device(), getattr(torch, grid.dtype)
    rows = []
    for m, n, k in grid.matmul:
        a = torch.randn(m, k, device=dev, dtype=dtype)
        b = torch.randn(k, n, device=dev, dtype=dtype)
        before()
        rows.append({"m": m, "n": n, "k": k, "seconds": time_call(lambda: a @ b, grid.min_time_s)})
    return rows


def attention_table(grid: OpGrid, before: Callable[[], None] = lambda: None) -> list[dict]:
    """Causal scaled-dot-product attention, forward, over (batch, heads, seq, head_dim)."""
    dev, dtype = _device(), getattr(torch, grid.dtype)
    rows = []
    for b, h, s, d in grid.attention:
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype) for _ in range(3))
        before()
        t = time_call(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), grid.min_time_s
        )
        rows.append({"batch": b, "heads": h, "seq": s, "head_dim": d, "seconds": t})
    return rows


def elementwise_table(grid: OpGrid, before: Callable[[], None] = lambda: None) -> list[dict]:
    """add (reads 2, writes 1), silu (reads 1, writes 1), rms_norm (reads 1, writes 1)."""
    dev, dtype = _device(), getattr(torch, grid.dtype)
    size = torch.finfo(dtype).bits // 8
    rows = []
    for n in grid.elementwise:
        x, y = torch.randn(n, device=dev, dtype=dtype), torch.randn(n, device=dev, dtype=dtype)
        x2 = x.view(-1, 128) if n % 128 == 0 else x.view(1, -1)
        ops = {
            "add": (lambda: x + y, 3),
            "silu": (lambda: F.silu(x), 2),
            "rms_norm": (lambda: F.rms_norm(x2, (x2.shape[-1],)), 2),
        }
        for op, (fn, touches) in ops.items():
            before()
            rows.append(
                {
                    "op": op,
                    "elements": n,
                    "bytes": touches * n * size,
                    "seconds": time_call(fn, grid.min_time_s),
                }
            )
    return rows


@dataclass(frozen=True)
class OpTables:
    matmul: list[dict] = field(default_factory=list)
    attention: list[dict] = field(default_factory=list)
    elementwise: list[dict] = field(default_factory=list)


def measure_ops(grid: OpGrid, before: Callable[[], None] = lambda: None) -> OpTables:
    """All three tables on this process; `before` runs ahead of each timing (e.g. a barrier)."""
    return OpTables(
        matmul_table(grid, before), attention_table(grid, before), elementwise_table(grid, before)
    )


def _rank_ops(rank: int, world: int, grid: OpGrid) -> OpTables:
    barrier = torch.distributed.barrier if world > 1 else (lambda: None)
    return measure_ops(grid, barrier)


def measure_ops_concurrent(grid: OpGrid, ranks: int, threads: int = 1) -> OpTables:
    """Each table as seen by one of `ranks` processes timing the same shapes at the same time;
    seconds are the mean over ranks."""

    backend = "gloo" if ranks > 1 else None
    per_rank: list[OpTables] = run_ranks(_rank_ops, ranks, grid, backend=backend, threads=threads)

    def mean(name: str) -> list[dict]:
        tables = [getattr(t, name) for t in per_rank]
        return [
            dict(row, seconds=statistics.fmean(t[i]["seconds"] for t in tables))
            for i, row in enumerate(tables[0])
        ]

    return OpTables(mean("matmul"), mean("attention"), mean("elementwise"))


def slowdown(alone: OpTables, shared: OpTables) -> float:
    """Median ratio of shared to alone seconds over every timed shape."""
    ratios = [
        s["seconds"] / a["seconds"]
        for name in ("matmul", "attention", "elementwise")
        for a, s in zip(getattr(alone, name), getattr(shared, name))
        if a["seconds"] > 0
    ]
    return statistics.median(ratios)
