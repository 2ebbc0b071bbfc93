"""Run a function on N fresh local processes (ranks), optionally in one torch.distributed
world: what the profiler measures with, and what tests and benchmarks of the engines use.

Processes are spawned (not forked) so each starts with a clean torch and its own thread count,
as the executor's ranks do. Each rank returns a picklable result; the caller gets them in rank
order, or a RuntimeError naming the rank that failed.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` ("" : every interface of this node) to rendezvous on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _entry(
    fn: Callable,
    rank: int,
    world: int,
    payload: Any,
    backend: str | None,
    threads: int,
    port: int,
    results: Any,
) -> None:
    try:
        torch.set_num_threads(threads)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
        )
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        if backend:
            torch.distributed.init_process_group(backend, rank=rank, world_size=world)
        results.put((rank, True, fn(rank, world, payload)))
        if backend:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[[int, int, Any], Any],
    world: int,
    payload: Any = None,
    backend: str | None = None,
    threads: int = 1,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world, payload)`` on `world` spawned processes; results in rank order."""
    assert world >= 1 and threads >= 1
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})  # children inherit the environment at spawn time
    try:
        procs = [
            ctx.Process(
                target=_entry,
                daemon=True,
                args=(fn, r, world, payload, backend, threads, port, results),
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return _collect(procs, results, world, timeout_s)


def _collect(procs: list, results: Any, world: int, timeout_s: float) -> list[Any]:
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ranks timed out after {timeout_s:.0f} s") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [out[r] for r in range(world)]
