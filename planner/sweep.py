"""`hybridflow sweep`: the best plan at every GPU count, and the smallest count that is enough.

For each count (1, 2, 4 below one node, then whole nodes) the planner's best plan, its
placement category, predicted throughput, iteration time and peak memory; the scaling
efficiency against the smallest feasible count; GPU-hours per 1,000 steps; and the standard
placements' throughput for comparison. The planner is called once per count and keeps its
per-(model, GPU count) layout tables between calls, so counts share their work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hybridflow.errors import UserError
from hybridflow.plan import Plan
from hybridflow.planner.asynchronous import AsyncSearch
from hybridflow.planner.search import Candidate, Placement, Planner, plan_job, standard_placements
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import Profile


class SweepError(UserError):
    """A sweep that cannot be run as asked (bad range or target)."""


@dataclass(frozen=True)
class Target:
    """What 'enough GPUs' means: a throughput, or S steps within H hours (or both)."""

    tokens_per_s: float | None = None
    steps: int | None = None
    deadline_hours: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) != (self.deadline_hours is None):
            raise SweepError("--steps and --deadline-hours go together")
        if self.tokens_per_s is not None and not self.tokens_per_s > 0:
            raise SweepError(f"--target-tokens-per-s must be positive, got {self.tokens_per_s}")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps <= 0):
            raise SweepError(f"--steps must be a positive integer, got {self.steps}")
        if self.deadline_hours is not None and not self.deadline_hours > 0:
            raise SweepError(f"--deadline-hours must be positive, got {self.deadline_hours}")

    @property
    def given(self) -> bool:
        return self.tokens_per_s is not None or self.steps is not None

    def met(self, tokens_per_s: float, iteration_s: float) -> bool:
        ok = self.given
        if self.tokens_per_s is not None:
            ok = ok and tokens_per_s >= self.tokens_per_s
        if self.steps is not None:
            assert self.deadline_hours is not None  # given with steps (__post_init__)
            ok = ok and self.steps * iteration_s <= self.deadline_hours * 3600.0
        return ok

    def describe(self) -> str:
        parts = []
        if self.tokens_per_s is not None:
            parts.append(f">= {self.tokens_per_s:,.0f} tokens/s")
        if self.steps is not None:
            parts.append(f"{self.steps:,} steps within {self.deadline_hours:g} h")
        return " and ".join(parts) or "none"


@dataclass(frozen=True)
class Point:
    """What the planner says at one GPU count: its best plan (a plan dict) and the
    throughput of each standard placement; plan None with the planner's reason if none fits."""

    gpus: int
    plan: dict | None
    standard: dict[str, float | None] = field(default_factory=dict)
    reason: str = ""

    def __post_init__(self) -> None:
        if self.plan is None and not self.reason:
            raise SweepError(f"{self.gpus} GPUs: an infeasible point needs the planner's reason")


@dataclass(frozen=True)
class Row:
    gpus: int
    feasible: bool
    category: str = ""
    tokens_per_s: float = 0.0
    iteration_s: float = math.inf
    peak_memory_gib: float = 0.0
    scaling_efficiency: float = 0.0
    gpu_hours_per_1k_steps: float = math.inf
    meets_target: bool = False
    standard: dict[str, float | None] = field(default_factory=dict)
    sets: str = ""
    reason: str = ""
    plan: dict | None = None


@dataclass(frozen=True)
class SweepResult:
    rows: tuple[Row, ...]
    target: Target
    job: dict
    gpu: str
    gpus_per_node: int

    @property
    def smallest_meeting_target(self) -> Row | None:
        return next((r for r in self.rows if r.meets_target), None)

    @property
    def best_throughput(self) -> Row | None:
        feasible = [r for r in self.rows if r.feasible]
        return max(feasible, key=lambda r: r.tokens_per_s) if feasible else None


def parse_range(text: str) -> tuple[int, int]:
    """'8:256' -> (8, 256); a single number is a one-count range."""
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        raise SweepError(f"--gpus must be LO:HI GPU counts, got {text!r}") from None
    if len(parts) > 2 or lo <= 0 or hi < lo:
        raise SweepError(f"--gpus must be LO:HI with 0 < LO <= HI, got {text!r}")
    return lo, hi


def gpu_counts(lo: int, hi: int, gpus_per_node: int) -> list[int]:
    """Counts a cluster can have in [lo, hi]: 1, 2, 4, ... below one node, then whole nodes."""
    if gpus_per_node <= 0:
        raise SweepError(f"--gpus-per-node must be positive, got {gpus_per_node}")
    below = [c for c in (2**k for k in range(gpus_per_node.bit_length())) if c < gpus_per_node]
    nodes = range(gpus_per_node, hi + 1, gpus_per_node)
    counts = [c for c in [*below, *nodes] if lo <= c <= hi]
    if not counts:
        raise SweepError(
            f"no cluster size in {lo}:{hi} with {gpus_per_node} GPUs per node "
            f"(1, 2, 4 below one node, then whole nodes)"
        )
    return counts


def category(plan: dict) -> str:
    """The placement category of a plan, named as search.standard_layouts names them:
    colocated (one set), split (actor+reference | the rest), separate (one set per model);
    an asynchronous plan is async (a rollout set beside its training sets)."""
    if plan.get("pipeline", {}).get("mode") == "async":
        return ASYNC_LINE
    sets = [tuple(s["models"]) for s in plan["sets"]]
    if len(sets) == 1:
        return "colocated"
    if all(len(s) == 1 for s in sets):
        return "separate"
    if len(sets) == 2 and any(sorted(s) == ["actor", "reference"] for s in sets):
        return "split"
    return f"other ({len(sets)} sets)"


def _sets_text(plan: dict) -> str:
    return " | ".join(f"{'+'.join(s['models'])}:{s['gpus']}" for s in plan["sets"])


def _peak(plan: dict) -> float:
    peaks = plan["predicted"].get("peak_memory_gib") or {}
    return max(peaks.values()) if peaks else 0.0


def rows_from_points(points: Sequence[Point], target: Target) -> list[Row]:
    """Rows with the derived columns; efficiency is per GPU against the smallest feasible."""
    base = next((p for p in points if p.plan is not None), None)
    rows = []
    for p in points:
        if p.plan is None:
            rows.append(Row(p.gpus, False, standard=dict(p.standard), reason=p.reason))
            continue
        pred = p.plan["predicted"]
        tps, it = float(pred["tokens_per_s"]), float(pred["iteration_s"])
        assert base is not None and base.plan is not None  # p has a plan: base is the first
        base_tps = float(base.plan["predicted"]["tokens_per_s"])
        eff = (tps / p.gpus) / (base_tps / base.gpus)
        rows.append(
            Row(
                p.gpus,
                True,
                category(p.plan),
                tps,
                it,
                _peak(p.plan),
                eff,
                p.gpus * it * 1000 / 3600.0,
                target.met(tps, it),
                dict(p.standard),
                _sets_text(p.plan),
                plan=p.plan,
            )
        )
    return rows


def run_sweep(
    counts: Sequence[int],
    plan_at: Callable[[int], Point],
    target: Target,
    job: dict,
    gpu: str,
    gpus_per_node: int,
) -> SweepResult:
    """Ask `plan_at` at every count, in increasing order, and derive the columns."""
    points = [plan_at(c) for c in sorted(set(counts))]
    return SweepResult(tuple(rows_from_points(points, target)), target, job, gpu, gpus_per_node)


def planner_points(
    gpu: str, job: Job, profile: Profile, gpus_per_node: int
) -> Callable[[int], Point]:
    """`plan_at(count)` backed by one Planner: its best plan (synchronous or asynchronous,
    the faster), the standard placements and the best asynchronous plan (the `async` line).
    The Planner keeps its per-(role, GPUs) and per-(set, GPUs) layout tables, so every count
    of the sweep reuses what the smaller counts built."""
    shared = MemoPlanner(job, profile, gpus_per_node)
    search = AsyncSearch(shared, staleness=1)

    def plan_at(gpus: int) -> Point:
        cluster = Cluster.from_gpus(gpu, gpus, gpus_per_node)
        standard: dict[str, float | None] = {
            name: float(p.to_dict()["predicted"]["tokens_per_s"])
            for name, p in standard_placements(cluster, job, profile, planner=shared).items()
        }
        asynchronous = search.plan(cluster)
        standard[ASYNC_LINE] = None if asynchronous is None else _tokens_per_s(asynchronous)
        try:
            best = plan_job(cluster, job, profile, top=1, planner=shared)[0]
        except DoesNotFit as e:  # names the smallest GPU count that fits
            if asynchronous is None:
                return Point(gpus, None, standard, reason=str(e))
            best = asynchronous
        if asynchronous is not None and _tokens_per_s(asynchronous) > _tokens_per_s(best):
            best = asynchronous
        return Point(gpus, best.to_dict(), standard)

    return plan_at


ASYNC_LINE = "async"  # the best asynchronous plan's line of a sweep


def _tokens_per_s(plan: Plan) -> float:
    return float(plan.prediction["tokens_per_s"])


class MemoPlanner(Planner):
    """A Planner that solves each (placement, GPU count) once: the best plan's search and
    the standard placements at one count ask CP-SAT the same questions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._solved: dict[tuple[Placement, int], Candidate | None] = {}

    def solve_placement(self, placement: Placement, capacity: int) -> Candidate | None:
        key = (placement, capacity)
        if key not in self._solved:
            self._solved[key] = super().solve_placement(placement, capacity)
        return self._solved[key]
