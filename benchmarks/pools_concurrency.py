"""Two resource pools run concurrently: wall time of two concurrent calls vs their sum.

Two worker groups, each on its own pool, each holding one tiny model. A train step is timed
on each group alone, then both are submitted together (futures) and waited on. If pools run
concurrently, the concurrent wall time is near the longer of the two, well under their sum.
Prints the numbers; asserts nothing about time. On a CPU-only machine ranks are processes
on shared cores, so use pools no larger than the core count to see the overlap.

Run:  .venv/bin/python benchmarks/pools_concurrency.py [--devices-per-pool 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from executor.batch import Batch  # noqa: E402
from executor.cluster import Cluster, ClusterConfig  # noqa: E402
from executor.parallel import ParallelLayout  # noqa: E402
from executor.train_engine import EngineConfig, lm_loss  # noqa: E402
from executor.worker_group import WorkerGroup  # noqa: E402


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
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="hf-bench-pools-"))
    n = args.devices_per_pool
    with Cluster.start(ClusterConfig(devices=2 * n)) as cluster:
        groups = [WorkerGroup(cluster, cluster.create_pool(name, n)) for name in ("a", "b")]
        for g in groups:
            g.add_role("m", args.model, ParallelLayout(dp=n), EngineConfig(micro_batch_size=4))
        batch = _batch(args.rows, args.seq)
        for g in groups:  # warm-up
            g.run("m", "train_step", batch, lm_loss)
        rows = []
        for _ in range(args.repeat):
            alone = [_timed([g.call("m", "train_step", batch, lm_loss)]) for g in groups]
            start = time.perf_counter()
            futures = [g.call("m", "train_step", batch, lm_loss) for g in groups]
            _timed(futures)
            both = time.perf_counter() - start
            rows.append((alone[0], alone[1], both))
        for g in groups:
            g.shutdown()
    print(f"two pools x {n} device(s), {args.model}, train step on {args.rows}x{args.seq} "
          f"tokens, {os.cpu_count()} CPU cores")
    print(f"{'pool a alone':>13} {'pool b alone':>13} {'sum':>8} {'concurrent':>11} {'ratio':>6}")
    for a, b, both in rows:
        print(f"{a:13.3f} {b:13.3f} {a + b:8.3f} {both:11.3f} {both / (a + b):6.2f}")


if __name__ == "__main__":
    main()
