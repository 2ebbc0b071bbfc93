"""Two resource pools run concurrently: wall time of two concurrent calls vs their sum.

Two worker groups, each on its own pool, each holding one tiny model. A train step is timed
on each group alone, then both are submitted together (futures) and waited on. If pools run
concurrently, the concurrent wall time is near the longer of the two, well under their sum.
Prints the numbers; asserts nothing about time. On a CPU-only machine ranks are processes
on shared cores, so use pools no larger than the core count to see the overlap.

Two workloads are timed: a 1 s wait on every rank (shows the controller overlaps the pools
whatever the cores are doing) and a real train step (overlaps only as far as free cores allow).

Run:  .venv/bin/python benchmarks/pools_concurrency.py [--devices-per-pool 1] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybridflow.executor.controller.batch import Batch  # noqa: E402
from hybridflow.executor.controller.cluster import Cluster, ClusterConfig  # noqa: E402
from hybridflow.executor.controller.protocols import ONE_TO_ALL, register  # noqa: E402
from hybridflow.executor.controller.worker import Worker  # noqa: E402
from hybridflow.executor.controller.worker_group import WorkerGroup  # noqa: E402
from hybridflow.executor.engines.train_engine import EngineConfig, lm_loss  # noqa: E402
from hybridflow.layout import ParallelLayout  # noqa: E402


class WaitingWorker(Worker):
    @register(dispatch_mode=ONE_TO_ALL)
    def wait(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def _batch(rows: int, seq: int) -> Batch:
    ids = torch.randint(0, 512, (rows, seq), generator=torch.Generator().manual_seed(0))
    return Batch({"input_ids": ids})


def _timed(futures: list) -> float:
    start = time.perf_counter()
    for f in futures:
        f.result()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices-per-pool", type=int, default=1)
    ap.add_argument("--model", default="tiny-4l")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.devices_per_pool
    with Cluster.start(ClusterConfig(devices=2 * n)) as cluster:
        groups = [
            WorkerGroup(cluster, cluster.create_pool(name, n), worker_cls=WaitingWorker)
            for name in ("a", "b")
        ]
        for g in groups:
            g.add_role("m", args.model, ParallelLayout(dp=n), EngineConfig(micro_batch_size=4))
        batch = _batch(args.rows, args.seq)
        for g in groups:  # warm-up
            g.run("m", "train_step", batch, lm_loss)
        waits = _measure(groups, args.repeat, None, "wait", 1.0)
        steps = _measure(groups, args.repeat, "m", "train_step", batch, lm_loss)
        for g in groups:
            g.shutdown()
    print(f"two pools x {n} device(s), {os.cpu_count()} CPU cores")
    _report("1 s wait on every rank", waits)
    _report(f"{args.model} train step on {args.rows}x{args.seq} tokens", steps)


def _measure(
    groups: list, repeat: int, role: str | None, method: str, *args: object
) -> list[tuple[float, float, float]]:
    rows = []
    for _ in range(repeat):
        alone = [_timed([g.call(role, method, *args)]) for g in groups]
        start = time.perf_counter()
        _timed([g.call(role, method, *args) for g in groups])
        rows.append((alone[0], alone[1], time.perf_counter() - start))
    return rows


def _report(title: str, rows: list[tuple[float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"{'pool a alone':>13} {'pool b alone':>13} {'sum':>8} {'concurrent':>11} {'ratio':>6}")
    for a, b, both in rows:
        print(f"{a:13.3f} {b:13.3f} {a + b:8.3f} {both:11.3f} {both / (a + b):6.2f}")
    ratios = sorted(both / (a + b) for a, b, both in rows)
    print(
        f"median concurrent/sum: {ratios[len(ratios) // 2]:.2f} "
        f"(load average {os.getloadavg()[0]:.1f}: other work on the cores skews it)"
    )


if __name__ == "__main__":
    main()
