"""The single controller's dispatch cost: a Ray round trip to every worker of a pool.

One actor per device (as the executor's worker groups place them); timed: a no-op call to all
of them (the fixed cost of each stage the controller dispatches), and the same call carrying a
numpy array to each (the controller's data transfer rate). Ray is started and shut down here.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hybridflow.executor.controller.cluster import Cluster, ClusterConfig


@dataclass(frozen=True)
class DispatchGrid:
    devices: int
    sizes: tuple[int, ...] = (1 << 10, 1 << 20, 1 << 24)  # bytes sent to each actor
    repeats: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"dispatch needs at least one device, got {self.devices!r}")
        if not self.sizes or any(s <= 0 for s in self.sizes) or self.repeats < 1:
            raise ValueError("dispatch sizes and repeats must be positive")


class _Worker:
    def noop(self) -> int:
        return 0

    def take(self, data: np.ndarray) -> int:
        return int(data.nbytes)


def _median_call(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_dispatch(grid: DispatchGrid) -> dict:
    """{"actors": N, "call_s": s, "transfer": [{bytes, seconds}]}: medians over repeats."""
    with Cluster.start(ClusterConfig(devices=grid.devices)) as cluster:
        pool = cluster.create_pool("profile-dispatch", grid.devices)
        cls = ray.remote(num_cpus=0)(_Worker)
        actors = [
            cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pool.placement_group, placement_group_bundle_index=i
                )
            ).remote()
            for i in range(grid.devices)
        ]
        ray.get([a.noop.remote() for a in actors])  # all started
        call = _median_call(lambda: ray.get([a.noop.remote() for a in actors]), grid.repeats)
        transfer = []
        for nbytes in grid.sizes:
            data = np.ones(nbytes, dtype=np.uint8)
            ref = lambda: ray.get([a.take.remote(data) for a in actors])  # noqa: E731
            transfer.append({"bytes": nbytes, "seconds": _median_call(ref, grid.repeats)})
        for a in actors:
            ray.kill(a)
    return {"actors": grid.devices, "call_s": call, "transfer": transfer}
