"""GPU allocation across the sets of one placement, solved exactly with OR-Tools CP-SAT.

Each set picks one of its feasible sizes (one-hot booleans); its stage seconds come from the
cached set tables. Objective (the paper's d_cost): the sum over stages of the
slowest set's stage time. Capacity: the sets' GPUs add up to the cluster or less (sizes
are powers of two below a node and whole nodes above, so this also packs into nodes).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ortools.sat.python import cp_model

from hybridflow.errors import UserError


@dataclass(frozen=True)
class Instance:
    capacity: int
    sizes: tuple[tuple[int, ...], ...]  # per set: allowed GPU counts
    costs: tuple[tuple[tuple[float, ...], ...], ...]  # per set, per size: stage seconds

    def __post_init__(self) -> None:
        assert self.capacity > 0 and self.sizes and len(self.sizes) == len(self.costs)
        for sizes, costs in zip(self.sizes, self.costs):
            assert sizes and len(sizes) == len(costs), "every set needs >= 1 costed size"
        assert len({len(c) for costs in self.costs for c in costs}) == 1

    @property
    def n_stages(self) -> int:
        return len(self.costs[0][0])

    def objective(self, choice: tuple[int, ...]) -> float:
        return sum(
            max(self.costs[s][i][k] for s, i in enumerate(choice)) for k in range(self.n_stages)
        )

    def gpus(self, choice: tuple[int, ...]) -> int:
        return sum(self.sizes[s][i] for s, i in enumerate(choice))


@dataclass(frozen=True)
class Config:
    time_limit_s: float = 20.0
    workers: int = 1  # the machine's 2 cores are shared
    scale: float = 1e6  # seconds -> integer microseconds

    def __post_init__(self) -> None:
        assert self.time_limit_s > 0 and self.workers >= 1 and self.scale > 0


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # index into each set's sizes
    gpus: tuple[int, ...]
    objective: float  # seconds, evaluated in floating point
    optimal: bool


def _solution(inst: Instance, choice: tuple[int, ...], optimal: bool) -> Solution:
    return Solution(
        choice,
        tuple(inst.sizes[s][i] for s, i in enumerate(choice)),
        inst.objective(choice),
        optimal,
    )


def greedy(inst: Instance) -> Solution | None:
    """Start every set at its smallest size; give GPUs where they cut d_cost the most."""
    choice = [0] * len(inst.sizes)
    if inst.gpus(tuple(choice)) > inst.capacity:
        return None
    while True:
        best, best_obj = None, inst.objective(tuple(choice))
        for s in range(len(choice)):
            for i in range(choice[s] + 1, len(inst.sizes[s])):
                trial = tuple(choice[:s] + [i] + choice[s + 1 :])
                if inst.gpus(trial) <= inst.capacity and inst.objective(trial) < best_obj - 1e-12:
                    best, best_obj = trial, inst.objective(trial)
        if best is None:
            return _solution(inst, tuple(choice), False)
        choice = list(best)


def brute_force(inst: Instance) -> Solution | None:
    """Every allocation; for tests and small instances."""
    best: tuple[int, ...] | None = None
    for choice in itertools.product(*(range(len(s)) for s in inst.sizes)):
        if inst.gpus(choice) <= inst.capacity and (
            best is None or inst.objective(choice) < inst.objective(best)
        ):
            best = choice
    return None if best is None else _solution(inst, best, True)


MAX_TICKS = 2**53 // 64  # CP-SAT's integer domain, with room for sums of several stages


class AllocationModel:
    """CP-SAT model of one Instance; one _add_<family>() per constraint family.

    Each set's size is a one-hot choice of booleans, so every stage bound and the capacity
    are linear in them: CP-SAT's LP relaxation then bounds the objective well (about six
    times faster proofs than AddElement tables on 6-model jobs)."""

    def __init__(self, inst: Instance, config: Config = Config(), cutoff: float = math.inf) -> None:
        self.inst, self.config, self.cutoff = inst, config, cutoff
        self.model = cp_model.CpModel()
        self.pick = [
            [self.model.NewBoolVar(f"set{k}_size{i}") for i in range(len(s))]
            for k, s in enumerate(inst.sizes)
        ]
        top = self._int_max()  # one pass over every cost, not one per stage variable
        self.stage = [
            self.model.NewIntVar(self._stage_floor(st), top, f"stage_{st}")
            for st in range(inst.n_stages)
        ]
        self._add_choice()
        self._add_capacity()
        self._add_stage_max()
        self._add_cutoff()
        self._add_objective()

    def _int(self, seconds: float) -> int:
        ticks = int(round(seconds * self.config.scale))
        if ticks > MAX_TICKS:
            raise UserError(
                f"a predicted stage takes {seconds:.3g} s, beyond what the planner's "
                f"allocation search represents ({MAX_TICKS / self.config.scale:.3g} s): "
                f"the job is too large for any cluster"
            )
        return ticks

    def _int_max(self) -> int:
        return max(self._int(c) for costs in self.inst.costs for cs in costs for c in cs)

    def _stage_floor(self, st: int) -> int:
        """No stage beats the slowest set's fastest size (a redundant bound)."""
        return max(min(self._int(c[st]) for c in costs) for costs in self.inst.costs)

    def _add_choice(self) -> None:
        """Each set takes exactly one of its sizes."""
        for picks in self.pick:
            self.model.AddExactlyOne(picks)

    def _add_capacity(self) -> None:
        self.model.Add(
            sum(
                n * b
                for sizes, picks in zip(self.inst.sizes, self.pick)
                for n, b in zip(sizes, picks)
            )
            <= self.inst.capacity
        )

    def _add_stage_max(self) -> None:
        """A stage lasts as long as its slowest set."""
        for st, var in enumerate(self.stage):
            for costs, picks in zip(self.inst.costs, self.pick):
                self.model.Add(var >= sum(self._int(c[st]) * b for c, b in zip(costs, picks)))

    def _add_cutoff(self) -> None:
        """Only allocations that may beat `cutoff` seconds: each stage's integer time is
        within half a unit of its seconds, so no better allocation is cut off (exact)."""
        if math.isfinite(self.cutoff):
            limit = math.floor(self.cutoff * self.config.scale) + self.inst.n_stages
            self.model.Add(sum(self.stage) <= limit)

    def _add_objective(self) -> None:
        self.model.Minimize(sum(self.stage))

    def _add_hint(self, hint: Solution) -> None:
        for picks, i in zip(self.pick, hint.choice):
            for j, b in enumerate(picks):
                self.model.AddHint(b, j == i)

    def solve(self, hint: Solution | None = None) -> Solution | None:
        if hint is not None:
            self._add_hint(hint)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = self.config.time_limit_s
        solver.parameters.num_workers = self.config.workers
        status = solver.Solve(self.model)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None
        choice = tuple(
            next(i for i, b in enumerate(picks) if solver.Value(b)) for picks in self.pick
        )
        return _solution(self.inst, choice, status == cp_model.OPTIMAL)


def solve(inst: Instance, config: Config = Config(), cutoff: float = math.inf) -> Solution | None:
    """The optimal allocation, or None if none fits (or, with a cutoff, none is faster
    than `cutoff` seconds)."""
    hint = greedy(inst)
    if hint is None:
        return None
    return AllocationModel(inst, config, cutoff).solve(hint)
