"""The per-rank process of a worker group: one torch.distributed world, several roles.

A Worker is one rank of an SPMD program (one Ray actor per device). It joins the group's
torch.distributed world (gloo on CPU, NCCL on GPU) with the environment torchrun would set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and holds
several roles (colocated models), each with its own layout, megatron groups and engine.

Extending a worker
------------------
Subclass :class:`Worker` and add methods decorated with ``@register(dispatch_mode=...)``
(see :mod:`executor.controller.protocols`; new modes are added with ``register_mode``).
Pass the subclass as ``worker_cls`` to :class:`executor.controller.worker_group.WorkerGroup`.
Inside a method:

* ``self.rank``, ``self.world_size``, ``self.local_rank`` and ``os.environ`` (torchrun's
  variables, set before the process group is created);
* ``self.roles[name]`` -> :class:`RoleState` with ``.groups`` (a
  :class:`executor.engines.groups.RoleGroups`: ``tp_rank``/``pp_rank``/``dp_rank``,
  ``group("tp"|"pp"|"dp")``, ``ranks("tp"|"pp"|"dp")``, ``active()`` to run megatron code
  under that role's groups) and ``.engine`` (a :class:`executor.engines.train_engine.TrainEngine`
  with ``named_local_parameters()``);
* a method called for one role receives the role name as its first argument (the controller
  passes it: ``group.call("actor", "my_method", batch)``).

Example (the generation engine)::

    class ActorRolloutWorker(Worker):
        @register(dispatch_mode="3D_ALL_MICRO_DP")
        def generate(self, role: str, prompts: Batch) -> Batch: ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.controller.protocols import DP_COMPUTE, MEGATRON_3D, ONE_TO_ALL, register
from hybridflow.executor.engines import timers
from hybridflow.executor.engines.groups import RoleGroups, build_role_groups
from hybridflow.executor.engines.train_engine import EngineConfig, TrainEngine
from hybridflow.executor.spawn import free_port
from hybridflow.layout import ParallelLayout
from hybridflow.simulator.model import load_model


@dataclass
class RoleState:
    name: str
    groups: RoleGroups
    engine: TrainEngine


class Worker:
    """One rank. Constructed by the WorkerGroup inside a Ray actor."""

    def __init__(self, rank: int, world_size: int, group_name: str = "group") -> None:
        torch.set_num_threads(1)  # first: ranks share the cores
        self.rank, self.world_size, self.group_name = rank, world_size, group_name
        self.local_rank = 0
        self.roles: dict[str, RoleState] = {}

    # ---- set-up (called by the WorkerGroup) ------------------------------------------
    def node_address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port("")

    def rejoin(self, rank: int, world_size: int, group_name: str) -> None:
        """Become `rank` of a new world of `world_size` (init_distributed follows); this
        process must hold no role and be out of its previous world (shutdown)."""
        if self.roles or torch.distributed.is_initialized():
            raise RuntimeError(
                f"rank {self.rank} of {self.group_name!r} still holds roles "
                f"{sorted(self.roles)} or a world; shut it down first"
            )
        self.rank, self.world_size, self.group_name = rank, world_size, group_name

    def init_distributed(
        self, master_addr: str, master_port: int, local_rank: int, timeout_s: float = 600.0
    ) -> None:
        self.local_rank = local_rank
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(local_rank),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES shows this actor its GPU only
        torch.distributed.init_process_group(
            "nccl" if gpu else "gloo",
            init_method="env://",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )

    def add_role(
        self, role: str, model: str, layout: ParallelLayout, engine_config: EngineConfig
    ) -> None:
        """Build `role`'s groups and engine (collective: all ranks, same order)."""
        if role in self.roles:
            raise ValueError(f"role {role!r} already exists on rank {self.rank}")
        groups = build_role_groups(role, layout, seed=engine_config.seed)
        engine = TrainEngine(role, load_model(model), groups, engine_config)
        self.roles[role] = RoleState(role, groups, engine)

    def role(self, name: str) -> RoleState:
        try:
            return self.roles[name]
        except KeyError:
            raise ValueError(
                f"rank {self.rank} holds no role {name!r} (roles: {sorted(self.roles)})"
            ) from None

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def take_timers(self) -> dict[str, float]:
        """This rank's timed seconds since the last take (not itself registered: untimed)."""
        return timers.take()

    # ---- role methods ----------------------------------------------------------------
    @register(dispatch_mode=ONE_TO_ALL)
    def role_info(self, role: str) -> dict[str, Any]:
        g = self.role(role).groups
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "pp_rank": g.pp_rank,
            "tp_rank": g.tp_rank,
            "dp_rank": g.dp_rank,
            "tp_ranks": g.ranks("tp"),
            "pp_ranks": g.ranks("pp"),
            "dp_ranks": g.ranks("dp"),
            "tp_group_size": torch.distributed.get_world_size(g.group("tp")),
            "dp_group_size": torch.distributed.get_world_size(g.group("dp")),
        }

    @register(dispatch_mode=MEGATRON_3D)
    def forward(self, role: str, batch: Batch, key: str = "output") -> Batch | None:
        """Log-probs (LM head) or values (value head) [b, s] as field `key`."""
        out = self.role(role).engine.forward(batch)
        if out is None or not self.role(role).engine.is_output_rank:
            return None
        return Batch({key: out}, meta=batch.meta)

    @register(dispatch_mode=MEGATRON_3D)
    def train_step(self, role: str, batch: Batch, loss_fn: Any) -> Batch | None:
        """Metrics (a one-row non-tensor Batch) from each DP output rank."""
        metrics = self.role(role).engine.train_step(batch, loss_fn)
        return (
            Batch(non_tensors={k: [v] for k, v in metrics.items()})
            if self.role(role).engine.is_output_rank
            else None
        )

    @register(dispatch_mode=ONE_TO_ALL)
    def local_state(self, role: str) -> dict[str, Any]:
        g = self.role(role).groups
        return {
            "pp_rank": g.pp_rank,
            "tp_rank": g.tp_rank,
            "dp_rank": g.dp_rank,
            "params": self.role(role).engine.local_state(),
        }

    @register(dispatch_mode=ONE_TO_ALL)
    def load_full_megatron_state(self, role: str, state: dict[str, torch.Tensor]) -> None:
        self.role(role).engine.load_full_megatron_state(state)

    @register(dispatch_mode=ONE_TO_ALL)
    def load_state(self, role: str, hf_state: dict[str, torch.Tensor]) -> None:
        self.role(role).engine.load_state(hf_state)

    @register(dispatch_mode=DP_COMPUTE)
    def ping(self, role: str | None = None) -> int:
        return self.rank
