"""A worker group: one Ray actor per device of a resource pool, driven as one SPMD program.

``group.call(role, method, *args)`` splits the arguments by the method's transfer protocol,
sends one call per rank and returns a :class:`CallFuture` at once; ``.result()`` collects.
Ray runs the calls of one actor in submission order, so calls on one group (pool) run in
order and calls on different groups run concurrently. A rank that dies makes ``result()``
raise :class:`WorkerDiedError` naming the group, role and rank instead of waiting forever
on the ranks still blocked in a collective.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hybridflow.errors import HybridflowError, RunStopped, UserError
from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.controller.cluster import Cluster, ResourcePool
from hybridflow.executor.controller.protocols import CallContext, dispatch_mode_of, get_mode
from hybridflow.executor.controller.worker import Worker
from hybridflow.layout import ParallelLayout


class WorkerGroupError(HybridflowError, RuntimeError):
    """A worker group call that failed on some rank (the cause chained)."""


class WorkerDiedError(WorkerGroupError, RunStopped):
    """A rank's process died."""


class WorkerInputError(WorkerGroupError, UserError):
    """A call a rank refused as bad input (e.g. a checkpoint of another plan)."""


class CallFuture:
    """The pending result of one group call."""

    def __init__(
        self,
        group: WorkerGroup,
        role: str | None,
        method: str,
        refs: list[ray.ObjectRef],
        ctx: CallContext,
        mode: str,
    ) -> None:
        self.group, self.role, self.method, self.refs = group, role, method, refs
        self.ctx, self.mode = ctx, mode
        self._rank_of = {ref: r for r, ref in enumerate(refs)}

    def done(self) -> bool:
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)

    def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        outputs: dict[int, Any] = {}
        pending = list(self.refs)
        while pending:
            wait_s = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            for ref in ready:
                outputs[self._rank_of[ref]] = self._get(ref)
            if deadline is not None and time.monotonic() >= deadline and pending:
                raise TimeoutError(
                    f"{self._what()}: ranks "
                    f"{sorted(self._rank_of[r] for r in pending)} not done "
                    f"after {timeout} s"
                )
        return get_mode(self.mode).collect(self.ctx, [outputs[r] for r in range(len(self.refs))])

    def _what(self, rank: int | None = None) -> str:
        role = f" role {self.role!r}" if self.role else ""
        where = f" rank {rank}" if rank is not None else ""
        return f"worker group {self.group.name!r}{role}{where} ({self.method})"

    def _get(self, ref: ray.ObjectRef) -> Any:
        rank = self._rank_of[ref]
        try:
            return ray.get(ref)
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            self.group.broken = f"rank {rank} died"
            raise WorkerDiedError(
                f"{self._what(rank)}: the worker process died "
                f"({type(e).__name__}); the group is stopped"
            ) from None
        except RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            kind = WorkerInputError if isinstance(cause, UserError) else WorkerGroupError
            raise kind(f"{self._what(rank)} failed: {type(cause).__name__}: {cause}") from cause


class WorkerGroup:
    """Ray actors, one per device of `pool`, forming one torch.distributed world."""

    def __init__(
        self,
        cluster: Cluster,
        pool: ResourcePool,
        worker_cls: type = Worker,
        name: str | None = None,
        actors: Sequence[Any] | None = None,
    ) -> None:
        """One new actor per device of `pool`; or, given `actors` (of `worker_cls`, alive,
        out of any world: ``shutdown(kill=False)``), those processes as ranks 0.. of a new
        world, with what they imported and built kept."""
        self.cluster, self.pool = cluster, pool
        self.name = name or pool.name
        self.worker_cls = worker_cls
        self.layouts: dict[str, ParallelLayout] = {}
        self.broken: str | None = None
        if actors is None:
            self.actors = self._start_actors()
        else:
            self.actors = list(actors)
            ray.get(
                [a.rejoin.remote(i, len(self.actors), self.name) for i, a in enumerate(self.actors)]
            )
        self._init_distributed()

    def _start_actors(self) -> list[Any]:
        opts: dict[str, Any] = {"num_cpus": 0}
        if self.pool.resource == "GPU":
            opts["num_gpus"] = 1
        else:
            opts["resources"] = {self.pool.resource: 1}
        remote_cls = ray.remote(self.worker_cls)
        return [
            remote_cls.options(
                **opts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pool.placement_group, placement_group_bundle_index=i
                ),
            ).remote(i, self.pool.devices, self.name)
            for i in range(self.pool.devices)
        ]

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def _init_distributed(self) -> None:
        nodes = self._raw("node_address")
        port = ray.get(self.actors[0].free_port.remote())
        local = [nodes[:r].count(nodes[r]) for r in range(len(nodes))]
        refs = [
            a.init_distributed.remote(nodes[0], port, local[r]) for r, a in enumerate(self.actors)
        ]
        CallFuture(
            self, None, "init_distributed", refs, CallContext(self.world_size, None), "ONE_TO_ALL"
        ).result()

    def _raw(self, method: str) -> list[Any]:
        refs = [getattr(a, method).remote() for a in self.actors]
        return CallFuture(
            self, None, method, refs, CallContext(self.world_size, None), "ONE_TO_ALL"
        ).result()

    # ---- roles -------------------------------------------------------------------------
    def add_role(self, role: str, model: str, layout: ParallelLayout, engine_config: Any) -> None:
        """Build a role (model + groups + engine) on every rank; blocks until built."""
        if role in self.layouts:
            raise ValueError(f"worker group {self.name!r} already holds role {role!r}")
        if layout.world_size != self.world_size:
            raise ValueError(
                f"role {role!r}: layout {layout} needs {layout.world_size} "
                f"devices, pool {self.pool.name!r} has {self.world_size}"
            )
        self.layouts[role] = layout
        try:
            self.call(
                None, "add_role", role, model, layout, engine_config, _ctx_layout=layout
            ).result()
        except Exception:
            self.layouts.pop(role, None)
            raise

    # ---- calls -------------------------------------------------------------------------
    def call(
        self, role: str | None, method: str, *args: Any, _ctx_layout: Any = None, **kwargs: Any
    ) -> CallFuture:
        """Call `method` on every rank by its protocol; `role` is passed as first argument
        (as a plain name: a vocabulary Role arrives as its value)."""
        role = None if role is None else str(role)
        if self.broken:
            raise WorkerDiedError(f"worker group {self.name!r} is stopped: {self.broken}")
        mode = dispatch_mode_of(self.worker_cls, method) or "ONE_TO_ALL"
        if role is not None and role not in self.layouts:
            raise ValueError(
                f"worker group {self.name!r} holds no role {role!r} (roles: {sorted(self.layouts)})"
            )
        layout = self.layouts.get(role) if role is not None else _ctx_layout
        ctx = CallContext(self.world_size, layout)
        per_rank = get_mode(mode).dispatch(ctx, args, kwargs)
        if len(per_rank) != self.world_size:
            raise WorkerGroupError(
                f"dispatch mode {mode} gave {len(per_rank)} calls for {self.world_size} ranks"
            )
        per_rank = _put_large(per_rank)
        lead = (role,) if role is not None else ()
        refs = [
            getattr(actor, method).remote(*lead, *a, **k)
            for actor, (a, k) in zip(self.actors, per_rank)
        ]
        return CallFuture(self, role, method, refs, ctx, mode)

    def run(self, role: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
        """``call(...).result()``."""
        return self.call(role, method, *args, **kwargs).result()

    def take_timers(self) -> dict[str, float]:
        """Each timed piece of work's seconds since the last take (executor.engines.timers),
        the slowest rank's."""
        out: dict[str, float] = {}
        for timed in self._raw("take_timers"):
            for k, v in timed.items():
                out[k] = max(out.get(k, 0.0), v)
        return out

    def shutdown(self, kill: bool = True) -> None:
        """Close the process groups (if the group is healthy) and end every actor; with
        kill=False the actors stay alive, out of any world, for another WorkerGroup."""
        if not ray.is_initialized():
            return
        if not self.broken:
            refs = [a.shutdown.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=10)
        for a in self.actors if kill else ():
            ray.kill(a, no_restart=True)
        self.broken = self.broken or "shut down"


def _put_large(per_rank: Sequence[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Put each distinct Batch argument into the object store once (shared by its ranks)."""
    cache: dict[int, ray.ObjectRef] = {}

    def ref(v: Any) -> Any:
        if not isinstance(v, Batch):
            return v
        if id(v) not in cache:
            cache[id(v)] = ray.put(v)
        return cache[id(v)]

    return [(tuple(ref(v) for v in a), {k: ref(v) for k, v in kw.items()}) for a, kw in per_rank]


def metrics_of(result: Batch) -> dict[str, float]:
    """The metrics dict of a ``train_step`` result (equal on every DP rank)."""
    return {k: float(v[0]) for k, v in result.non_tensors.items()}
