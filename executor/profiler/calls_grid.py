"""What the per-call measurements share: the grid of sizes, the layouts a set of k devices
allows, the batches the controller would send, the recorder that times a worker group's
calls, and the engine settings and losses of a run's roles."""

from __future__ import annotations

import statistics
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.controller.worker_group import WorkerGroup
from hybridflow.executor.engines.train_engine import EngineConfig
from hybridflow.executor.rl import algorithms as alg
from hybridflow.executor.rl.losses import ActorLoss, CriticLoss
from hybridflow.executor.rl.runtime import engine_config
from hybridflow.executor.run.config import RunConfig
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.model import load_model


@dataclass(frozen=True)
class CallsGrid:
    model: str = "tiny"
    group_sizes: tuple[int, ...] = (1, 2, 4)
    sequences: tuple[int, ...] = (4, 8, 16, 32)  # per DP rank (forward, train step)
    gen_sequences: tuple[int, ...] = (8, 32)  # per generation replica
    prompt_len: int = 16
    response_len: int = 8
    repeats: int = 4  # rounds of the forward and train calls
    gen_repeats: int = 3  # rounds of the generate calls (each one reshards too)
    sweeps: int = 1  # passes over every worker group, the rounds split among them
    micro_batch_per_rank: int = 4  # the optimizer step before each generate call
    concurrency: bool = True  # time calls of one-rank sets running at once (sharing)

    def __post_init__(self) -> None:
        spec = load_model(self.model)
        for name in ("group_sizes", "sequences", "gen_sequences"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or v <= 0 for v in vals):
                raise ValueError(f"calls grid {name} must be positive integers: {vals}")
        if min(self.prompt_len, self.response_len, self.repeats, self.gen_repeats, self.sweeps) < 1:
            raise ValueError("prompt_len, response_len, repeats and sweeps must be >= 1")
        if self.prompt_len + self.response_len > spec.max_position:
            raise ValueError(f"model {self.model!r} holds {spec.max_position} positions")

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    def per_sweep(self, rounds: int) -> int:
        """Rounds of a call in each sweep: `rounds` split among the sweeps (at least 1)."""
        return -(-rounds // self.sweeps)


def default_grid(quick: bool, model: str = "tiny", sweeps: int = 1) -> CallsGrid:
    if quick:
        return CallsGrid(
            model,
            sequences=(4, 16, 32),
            gen_sequences=(8, 32),
            repeats=2,
            gen_repeats=1,
            sweeps=sweeps,
        )
    return CallsGrid(model, sweeps=sweeps)


def _pow2(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def train_layouts(spec: ModelSpec, k: int) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) of every layout of k devices the model allows (the planner's choices)."""
    return [
        (t, p, k // (t * p))
        for t in _pow2(k)
        if spec.heads % t == 0 and spec.kv_heads % t == 0
        for p in range(1, spec.layers + 1)
        if spec.layers % p == 0 and k % (t * p) == 0
    ]


def generation_configs(spec: ModelSpec, k: int) -> list[tuple[int, int]]:
    """(training tp, generation tp) covering each (generation tp, micro-DP) of k devices
    once: generation pp is 1, so micro-DP = tp / tg (pp > 1 layouts share these). Ordered
    by generation tp, so that layouts whose vLLM engines are alike follow each other."""
    return sorted(
        (
            (t, g)
            for t, p, _ in train_layouts(spec, k)
            if p == 1
            for g in _pow2(t)
            if spec.heads % g == 0
        ),
        key=lambda c: (c[1], c[0]),
    )


# ---- batches as the controller builds them ------------------------------------------------
def sequence_batch(n: int, grid: CallsGrid, vocab: int, seed: int = 0) -> Batch:
    """n sequences with every field the prepare and train calls read."""
    g = torch.Generator().manual_seed(seed)
    P, R = grid.prompt_len, grid.response_len
    ids = torch.randint(4, vocab, (n, P + R), generator=g)
    resp = torch.ones(n, R, dtype=torch.long)
    small = torch.randn(n, R, generator=g) * 0.1
    return Batch(
        {
            "input_ids": ids,
            "attention_mask": torch.ones(n, P + R, dtype=torch.long),
            "responses": ids[:, P:],
            "response_mask": resp,
            "old_log_probs": small - 2.0,
            "ref_log_probs": small - 2.0,
            "advantages": small,
            "returns": small,
            "values": small,
        },
        meta={"prompt_len": P},
    )


Name = TypeVar("Name", bound=Hashable)


@dataclass
class Recorder:
    """Times calls on a worker group: controller wall and each rank's own seconds."""

    group: WorkerGroup
    repeats: int

    def _once(self, role: str, method: str, args: tuple) -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        self.group.run(role, method, *args)
        wall = time.perf_counter() - t0
        ranks = [c[-1] for c in self.group.run(None, "take_seconds")]
        slowest = max(ranks, key=lambda c: c["seconds"])
        return wall, {k: max(c.get(k, 0.0) for c in ranks) for k in slowest}

    def rounds(
        self, calls: Sequence[tuple[Name, str, str, tuple]]
    ) -> dict[Name, tuple[float, dict[str, float]]]:
        """{name: (wall, the slowest rank's own seconds and parts)} of each (name, role,
        method, args): a warm-up round through the whole list (lazy set-up, and the first
        calls of each size after a vLLM engine starts, which had come out up to a third
        slower), then `repeats` rounds, so that a burst of other load lands in one round of
        every call rather than in all rounds of a few; the mean over rounds."""
        for _, role, method, args in calls:
            self._once(role, method, args)
        got: dict[Name, list[tuple[float, dict[str, float]]]] = {}
        for _ in range(self.repeats):
            for name, role, method, args in calls:
                got.setdefault(name, []).append(self._once(role, method, args))
        return {
            name: (
                statistics.fmean(w for w, _ in runs),
                {
                    k: statistics.fmean(o.get(k, 0.0) for _, o in runs)
                    for k in set().union(*(o for _, o in runs))
                },
            )
            for name, runs in got.items()
        }


def role_engine_config(value_head: bool) -> EngineConfig:
    """The engine settings of a run's actor (LM) or critic (value head)."""
    return engine_config("critic" if value_head else "actor", RunConfig())


def role_loss(grid: CallsGrid, value: bool) -> ActorLoss | CriticLoss:
    """The loss a run's actor (LM) or critic (value head) trains with."""
    if value:
        return CriticLoss(alg.RLConfig(algorithm="ppo"), grid.prompt_len)
    return ActorLoss(alg.RLConfig(algorithm="ppo"), grid.prompt_len)
