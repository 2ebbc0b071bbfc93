"""One set of long-lived rank processes for all of `hybridflow profile`'s worker groups.

Starting a rank costs far more than most measurements on a small host: a Ray actor, torch,
megatron-core and vLLM are imported in each process (about 20 s of one core), and the calls
tables need worker groups of every set size k (1, 2, 4) plus n one-rank sets at once. So n
processes are started once and import all of it together (both cores busy), and each worker
group is a new torch.distributed world over k of them (WorkerGroup(actors=...)): the group
of 1 rank, then of 2, then of 4, then n groups of one rank each, instead of 11 processes
started and importing one group after another (it took the profile from about 7 to about 4
minutes on a 2-core host: profiles/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from hybridflow.executor.controller.worker_group import WorkerGroup
from hybridflow.executor.profiler.calls_worker import ProfileWorker


class RankPool:
    """n ProfileWorker processes on one resource pool; `group(ranks)` makes a worker group
    of some of them, `release(group)` ends its world and keeps its processes."""

    def __init__(self, cluster: Any, n: int, name: str = "profile-ranks") -> None:
        self.cluster, self.name = cluster, name
        self.pool = cluster.create_pool(name, n)
        self._cls = ProfileWorker
        first = WorkerGroup(cluster, self.pool, ProfileWorker, name=name)
        self.actors = list(first.actors)
        with self.lent([first]):
            first.run(None, "preload")

    def group(self, ranks: Sequence[int], name: str) -> Any:
        """A worker group whose rank i is process ranks[i] of this pool."""
        return WorkerGroup(
            self.cluster, self.pool, self._cls, name=name, actors=[self.actors[r] for r in ranks]
        )

    @contextlib.contextmanager
    def lent(self, groups: list[Any]) -> Iterator[None]:
        """Release every group in `groups` (a list the block may still add to) when the
        block ends. A group that broke raises then, unless the block is already raising:
        its error is the one to see."""
        try:
            yield
        except BaseException:
            for g in groups:
                self.release(g, check=False)
            raise
        for g in groups:
            self.release(g)

    def release(self, group: Any, check: bool = True) -> None:
        """Shut `group`'s vLLM engine, drop its roles and end its world. A group that
        broke raises here unless `check` is off."""
        broken = group.broken
        if not broken:
            group.run(None, "close_engine")
            group.run(None, "drop_roles")
        group.shutdown(kill=False)
        if broken and check:
            raise RuntimeError(f"profiling worker group {group.name!r} failed: {broken}")

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.cluster.remove_pool(self.pool.name)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
