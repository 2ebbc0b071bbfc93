"""Parallel layouts -> megatron-core process groups, one set per role.

megatron-core 0.16.1 keeps its groups in ``parallel_state`` module globals, and many paths
(schedules, optimizer, clip-grad, layers) read them even when a ``pg_collection`` is given.
Colocated roles share one process (and one torch.distributed world) with different
layouts, so each role builds its groups once through ``initialize_model_parallel`` and keeps
a snapshot of all ``parallel_state`` globals plus its own RNG tracker. :func:`RoleGroups.active`
swaps the snapshot in around every call on that role and restores the previous one after.

megatron makes about seventeen groups per layout, many over the same ranks (tp and mp when
pp = 1, dp and dp-cp, ...), and each gloo group holds three threads per process. Groups over
the same ranks are interchangeable (a process runs one SPMD call at a time, issuing its
collectives in the same order on every rank), so :func:`build_role_groups` makes one group
per distinct rank list and every role reuses it: a set of colocated roles holds a handful of
groups rather than seventeen per role (on a 2-core host the idle gloo threads of 4 roles
slowed tensor-parallel calls measurably).

Rank order is megatron's default ``tp-cp-ep-dp-pp``: global rank
``= tp_rank + tp * (dp_rank + dp * pp_rank)`` (TP groups are consecutive ranks).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridflow.executor.engines import cuda_bridge
from hybridflow.layout import LayoutError, ParallelLayout


def _state_names() -> list[str]:
    from megatron.core import parallel_state as ps

    return [
        n
        for n in vars(ps)
        if n.startswith("_") and n[1:2].isupper() and not callable(getattr(ps, n))
    ]


class WorldWatch:
    """Whether torch.distributed's default group changed since the last look: a process
    that left its world and joined a new one (hybridflow.executor.profiler.rank_pool) must drop what
    it keeps of the old one."""

    def __init__(self) -> None:
        self._seen: Any = None

    def changed(self) -> bool:
        now = torch.distributed.group.WORLD
        if now is self._seen:
            return False
        self._seen = now
        return True


_lock = threading.RLock()
_pristine: dict[str, Any] | None = None
_shared_groups: dict[tuple, Any] = {}  # (ranks, backend, timeout) -> group
_shared_world = WorldWatch()  # the default group that `_shared_groups` belong to


def _shared_new_group(original):
    """torch's ``new_group`` returning one group per (ranks, backend, timeout); the cache
    evolves alike on every rank since every rank makes the same calls in order."""

    def new_group(
        ranks=None,
        timeout=None,
        backend=None,
        pg_options=None,
        use_local_synchronization=False,
        group_desc=None,
        **extra: Any,
    ) -> Any:
        kwargs = dict(
            ranks=ranks,
            timeout=timeout,
            backend=backend,
            pg_options=pg_options,
            use_local_synchronization=use_local_synchronization,
            group_desc=group_desc,
            **extra,
        )
        if ranks is None or pg_options is not None or use_local_synchronization or extra:
            return original(**kwargs)
        if _shared_world.changed():
            _shared_groups.clear()  # a new world (re-initialised torch.distributed)
        key = (tuple(ranks), backend, timeout)
        if key not in _shared_groups:
            _shared_groups[key] = original(**kwargs)
        return _shared_groups[key]

    return new_group


@contextlib.contextmanager
def shared_new_groups() -> Iterator[None]:
    """``torch.distributed.new_group`` returning the shared group of its ranks (and backend,
    timeout) while inside. megatron's groups (built per role) and vLLM's (~10 per engine,
    kept after the engine shuts down) are made through it, so colocated roles and engines
    started one after another in a process reuse them instead of piling up idle threads."""
    with _lock:
        original = torch.distributed.new_group
        torch.distributed.new_group = _shared_new_group(original)
        try:
            yield
        finally:
            torch.distributed.new_group = original


def _snapshot() -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    return {n: getattr(ps, n) for n in _state_names()}


def _restore(state: dict[str, Any]) -> None:
    from megatron.core import parallel_state as ps

    for n, v in state.items():
        setattr(ps, n, dict(v) if isinstance(v, dict) else v)


@dataclass
class RoleGroups:
    """The megatron process groups of one role in this process."""

    role: str
    layout: ParallelLayout
    rank: int
    state: dict[str, Any] = field(repr=False)
    rng_tracker: Any = field(repr=False)

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank).pp

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank).dp

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank).tp

    def group(self, kind: str) -> torch.distributed.ProcessGroup:
        names = {
            "tp": "_TENSOR_MODEL_PARALLEL_GROUP",
            "pp": "_PIPELINE_MODEL_PARALLEL_GROUP",
            "dp": "_DATA_PARALLEL_GROUP",
            "mp": "_MODEL_PARALLEL_GROUP",
        }
        return self.state[names[kind]]

    def ranks(self, kind: str) -> list[int]:
        """Global ranks of this rank's `kind` group (tp, pp or dp)."""
        names = {
            "tp": "_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS",
            "pp": "_PIPELINE_GLOBAL_RANKS",
            "dp": "_DATA_PARALLEL_GLOBAL_RANKS",
        }
        return list(self.state[names[kind]])

    @contextlib.contextmanager
    def active(self) -> Iterator[RoleGroups]:
        """Make this role's groups and RNG tracker megatron's current ones."""
        with _lock:
            outer, outer_tracker = _snapshot(), cuda_bridge.current_rng_tracker()
            _restore(self.state)
            cuda_bridge.use_rng_tracker(self.rng_tracker)
            try:
                with cuda_bridge.active():
                    yield self
            finally:
                self.state = _snapshot()  # lazily created buffers stay with the role
                _restore(outer)
                cuda_bridge.use_rng_tracker(outer_tracker)


def build_role_groups(role: str, layout: ParallelLayout, seed: int = 1234) -> RoleGroups:
    """Create `role`'s groups. Collective: every rank of the world calls it, in the same order."""
    global _pristine
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before building groups")
    world = torch.distributed.get_world_size()
    if layout.world_size != world:
        raise LayoutError(
            f"role {role!r}: layout {layout} needs {layout.world_size} ranks, "
            f"the worker group has {world}"
        )
    with _lock:
        if _pristine is None:
            _pristine = _snapshot()
        outer = _snapshot()
        _restore(_pristine)
        try:
            with shared_new_groups(), cuda_bridge.active():
                ps.initialize_model_parallel(
                    tensor_model_parallel_size=layout.tp,
                    pipeline_model_parallel_size=layout.pp,
                    virtual_pipeline_model_parallel_size=layout.vpp,
                    create_gloo_process_groups=False,
                )
            state = _snapshot()
        finally:
            _restore(outer)
    rank = torch.distributed.get_rank()
    tracker = cuda_bridge.new_rng_tracker()
    cuda_bridge.seed_tracker(tracker, seed, tp_rank=layout.coords(rank).tp)
    return RoleGroups(role=role, layout=layout, rank=rank, state=state, rng_tracker=tracker)
