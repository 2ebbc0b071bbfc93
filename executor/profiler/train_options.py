"""What activation recompute and the distributed optimizer cost on this machine.

One train step of the profile's model on `ranks` data-parallel ranks (megatron-core over
gloo, as the executor trains) with each memory setting, against the plan's default
(hybridflow.memory.DEFAULT: the distributed optimizer, no recompute). Every setting's engine
is built first; the timed steps then take turns, so a slow phase of the host falls on every
setting alike. Written to the profile under ``extra.train_options`` (the simulator does not
read it).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

from hybridflow.memory import DEFAULT, MemorySettings
from hybridflow.simulator.model import load_model

SETTINGS: dict[str, MemorySettings] = {
    "default": DEFAULT,
    "no_distributed_optimizer": replace(DEFAULT, distributed_optimizer=False),
    "recompute_selective": replace(DEFAULT, recompute="selective"),
    "recompute_full": replace(DEFAULT, recompute="full"),
}


@dataclass(frozen=True)
class TrainOptionsGrid:
    model: str = "tiny"
    ranks: int = 2  # data-parallel ranks (the distributed optimizer shards over them)
    sequences: int = 8  # per step, over the ranks
    seq_len: int = 128
    micro_batch: int = 2  # sequences per micro-batch
    repeats: int = 5  # timed steps per setting (after one untimed)

    def __post_init__(self) -> None:
        load_model(self.model)
        if self.ranks < 1 or self.repeats < 1 or self.micro_batch < 1:
            raise ValueError("ranks, repeats and micro_batch must be >= 1")
        if self.sequences % self.ranks or self.sequences // self.ranks < 1:
            raise ValueError(f"{self.sequences} sequences do not split over {self.ranks} ranks")


def default_grid(quick: bool, model: str, devices: int) -> TrainOptionsGrid:
    return TrainOptionsGrid(model=model, ranks=min(devices, 4), repeats=3 if quick else 5)


def _step_seconds(rank: int, world: int, grid: TrainOptionsGrid) -> dict[str, list[float]]:
    import torch

    from hybridflow.executor.controller.batch import Batch
    from hybridflow.executor.engines.groups import build_role_groups
    from hybridflow.executor.engines.train_engine import EngineConfig, TrainEngine, lm_loss
    from hybridflow.layout import ParallelLayout

    spec = load_model(grid.model)
    per_rank = grid.sequences // grid.ranks
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, spec.vocab, (per_rank, grid.seq_len), generator=gen)
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    engines = {}
    for name, s in SETTINGS.items():
        cfg = EngineConfig(
            micro_batch_size=min(grid.micro_batch, per_rank),
            use_distributed_optimizer=s.distributed_optimizer,
            recompute=s.recompute,
        )
        groups = build_role_groups(name, ParallelLayout(dp=world))
        engines[name] = TrainEngine(name, spec, groups, cfg)
        engines[name].train_step(batch, lm_loss)  # untimed: first-call allocations
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(grid.repeats):
        for name, engine in engines.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            engine.train_step(batch, lm_loss)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def measure_train_options(grid: TrainOptionsGrid, threads: int = 1) -> list[dict]:
    """One row per setting: its median train-step seconds (the slowest rank's each step)
    and that relative to the default's."""
    from hybridflow.executor.spawn import run_ranks

    per_rank = run_ranks(_step_seconds, grid.ranks, grid, backend="gloo", threads=threads)
    step = {
        name: statistics.median(max(r[name][i] for r in per_rank) for i in range(grid.repeats))
        for name in SETTINGS
    }
    return [
        {
            "setting": name,
            "distributed_optimizer": s.distributed_optimizer,
            "recompute": s.recompute,
            "model": grid.model,
            "ranks": grid.ranks,
            "tokens_per_rank": grid.sequences // grid.ranks * grid.seq_len,
            "step_s": round(step[name], 5),
            "relative": round(step[name] / step["default"], 4),
        }
        for name, s in SETTINGS.items()
    ]
