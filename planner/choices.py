"""What the planner's tables hold: a role's candidate layouts, the actor's generation
options, a set's best choice, and the Pareto pruning that keeps them short (exact)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TypeAlias

from hybridflow.layout import GenLayout, ParallelLayout
from hybridflow.memory import DEFAULT, MemorySettings

Stages: TypeAlias = tuple[float, ...]  # seconds in STAGES order, one per stage


@dataclass(frozen=True)
class Candidate:
    """One role's train/infer layout on n GPUs."""

    layout: ParallelLayout
    resident: float
    transient: float
    stages: Stages
    settings: MemorySettings = DEFAULT
    gen_resident: float = 0.0  # what the actor holds while generating (its weights if offloaded)

    @property
    def total(self) -> float:
        return sum(self.stages)


@dataclass(frozen=True)
class GenOption:
    layout: GenLayout
    extra: float  # generation weights beyond the training shard, bytes per GPU
    swap: float  # transient bytes while resharding beyond the training shard
    reshard_s: float


@dataclass(frozen=True)
class SetChoice:
    """The best layouts of a set's roles on n GPUs and the set's stage seconds."""

    layouts: tuple[tuple[str, dict], ...]  # (role, {kind: layout})
    stages: Stages
    peak_bytes: float
    memory: tuple[tuple[str, MemorySettings], ...] = ()  # trained roles' settings

    @property
    def total(self) -> float:
        return sum(self.stages)


@dataclass(frozen=True)
class _Partial:
    """The non-actor roles of a set chosen so far."""

    resident: float
    transient: float
    stages: Stages
    layouts: tuple[tuple[str, dict], ...]
    memory: tuple[tuple[str, MemorySettings], ...] = ()

    @property
    def total(self) -> float:
        return sum(self.stages)


def _per_layout(cands: list[Candidate]) -> list[Candidate]:
    """Of each layout's candidates, those not dominated in time, resident, transient and
    generation-time bytes by another of the same layout (exact: generation depends on the
    layout and the bytes left free)."""

    def key(c: Candidate) -> tuple[float, ...]:
        return (c.total, c.resident, c.transient, c.gen_resident)

    keep = []
    for c in cands:
        same = (
            o
            for o in cands
            if o is not c and o.layout == c.layout and o.settings.fsdp == c.settings.fsdp
        )
        if not any(all(a <= b for a, b in zip(key(o), key(c))) and key(o) != key(c) for o in same):
            keep.append(c)
    return keep


def _pareto(cands: list) -> list:
    """Drop candidates that need no less memory and no less time than another. Kept
    candidates' (resident, transient) front is a staircase: the rightmost step at or left
    of a candidate's resident bytes has the least transient bytes there."""
    keep: list = []
    front_r: list[float] = []  # ascending resident
    front_t: list[float] = []  # descending transient
    for c in sorted(cands, key=lambda c: (c.total, c.resident, c.transient)):
        i = bisect.bisect_right(front_r, c.resident)
        if i and front_t[i - 1] <= c.transient:
            continue
        keep.append(c)
        j = i
        while j < len(front_r) and front_t[j] >= c.transient:
            j += 1
        front_r[i:j], front_t[i:j] = [c.resident], [c.transient]
    return keep
