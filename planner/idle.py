"""Why a plan leaves GPUs idle, from the planner's own tables.

A set takes one of the sizes of `tables.set_sizes` (a power of two that divides a node, or
whole nodes), so the GPUs a plan uses need not add up to the cluster. For each set this
module takes the next size up the set could have: whether it fits in what the idle GPUs add,
whether the set fits in memory there (`Tables.best_set`), and, if so, the predicted iteration
with that set grown and the rest unchanged, stage by stage against the plan's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridflow.plan import PlacedSet, Plan
from hybridflow.planner.search import Planner
from hybridflow.planner.tables import set_sizes
from hybridflow.simulator.predict import predict_plan
from hybridflow.vocab import STAGES

MAX_TRIED = 16  # larger sizes predicted per set beyond the next one (a bound on the work)
SAME = 0.005  # relative difference under which two seconds count as the same


@dataclass(frozen=True)
class Growth:
    """One set of a plan grown to a larger size, the others unchanged."""

    roles: tuple[str, ...]
    gpus: int  # its size in the plan
    next_gpus: int | None  # the next size up it may take on the cluster (None: no larger)
    reach: int  # the most GPUs it could have with the idle ones added
    iteration_s: float | None = None  # predicted with it at next_gpus (None: not tried, no fit)
    stages: dict[str, float] = field(default_factory=dict)  # those seconds by stage
    fits_memory: bool = True  # False: no layout of the set fits on next_gpus
    further: tuple[int, float] | None = None  # the fastest larger size within reach, seconds
    tried_to: int = 0  # the largest size `further` looked at (MAX_TRIED bounds the look)

    @property
    def name(self) -> str:
        return "+".join(self.roles)

    @property
    def within_reach(self) -> bool:
        return self.next_gpus is not None and self.next_gpus <= self.reach


def idle_gpus(plan: Plan) -> int:
    return plan.cluster.n_gpus - plan.gpus


def size_rule(gpus_per_node: int) -> str:
    """The sizes a set may take, in words: '1, 2, 4 GPUs within a node or whole nodes of 8'."""
    small = set_sizes(gpus_per_node, gpus_per_node - 1)
    within = f"{', '.join(map(str, small))} GPUs within a node or " if small else ""
    return f"{within}whole nodes of {gpus_per_node}"


def _iteration(plan: Plan) -> float:
    return float(plan.prediction["iteration_s"])


def _stages(plan: Plan) -> dict[str, float]:
    stages = plan.prediction.get("stages", {})
    return {str(st): float(stages.get(st, 0.0)) for st in STAGES}


def grown(planner: Planner, plan: Plan, index: int, gpus: int) -> Plan | None:
    """The plan with set `index` on `gpus` GPUs in its best layouts there, predicted; None
    if the set does not fit in memory on that many."""
    placed = plan.sets[index]
    choice = planner.tables.best_set(placed.models, gpus)
    if choice is None:
        return None
    sets = list(plan.sets)
    sets[index] = PlacedSet(placed.models, gpus, dict(choice.layouts))
    alt = Plan(plan.cluster, plan.job, tuple(sets))
    return alt.with_prediction(predict_plan(alt, planner.profile, planner.scheme).to_dict())


def growth(planner: Planner, plan: Plan, index: int) -> Growth:
    """Set `index` at its next size up, and the fastest of the larger sizes within reach."""
    placed = plan.sets[index]
    reach = placed.gpus + idle_gpus(plan)
    larger = [n for n in set_sizes(planner.gpn, plan.cluster.n_gpus) if n > placed.gpus]
    g = Growth(placed.models, placed.gpus, larger[0] if larger else None, reach)
    if not g.within_reach:
        return g
    assert g.next_gpus is not None  # within reach
    alt = grown(planner, plan, index, g.next_gpus)
    if alt is None:
        return Growth(g.roles, g.gpus, g.next_gpus, reach, fits_memory=False)
    tried = [(n, grown(planner, plan, index, n)) for n in larger[1 : 1 + MAX_TRIED] if n <= reach]
    times = [(n, _iteration(p)) for n, p in tried if p is not None]
    further = min(times, key=lambda t: t[1]) if times else None
    top = max((n for n, _ in tried), default=0)
    return Growth(
        g.roles, g.gpus, g.next_gpus, reach, _iteration(alt), _stages(alt), True, further, top
    )


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds:.3g} s"


def _faster(seconds: float, than: float) -> bool:
    return seconds < than * (1 - SAME)


def _why(g: Growth, plan: Plan, faster: bool) -> str:
    """The stages that change the verdict: those faster with the set grown if it is faster,
    else those slower, or why none gets faster."""
    mine = _stages(plan)
    sign = -1.0 if faster else 1.0
    moved = [
        f"{st} {_s(t)} vs {_s(mine[st])}"
        for st, t in g.stages.items()
        if sign * (t - mine[st]) > max(1e-3, SAME * mine[st])
    ]
    if moved:
        return ("faster in " if faster else "slower in ") + ", ".join(moved)
    if faster:
        return "a little faster in every stage"
    if len(plan.sets) > 1:
        return "the other sets bound every stage it would speed up"
    return "no stage gets faster"


def _detail(g: Growth, plan: Plan) -> str:
    idle, now = idle_gpus(plan), _iteration(plan)
    if g.next_gpus is None:
        return f"{g.name} has no larger size on {plan.cluster.n_gpus} GPUs"
    head = f"the next size up for {g.name} is {g.next_gpus} GPUs"
    if not g.within_reach:
        return f"{head}, {g.next_gpus - g.gpus} more than its {g.gpus}, but only {idle} are idle"
    if not g.fits_memory or g.iteration_s is None:
        return f"{head}, on which it does not fit in memory"
    faster = _faster(g.iteration_s, now)
    verdict = "is faster" if faster else "is no faster"
    text = f"{head} and {verdict}: {_s(g.iteration_s)} vs {_s(now)} ({_why(g, plan, faster)})"
    if g.further is not None:
        n, t = g.further
        if _faster(t, now):
            text += f"; at {n} GPUs it is faster: {_s(t)}"
        else:
            text += f", nor is any size up to {g.tried_to} GPUs (fastest {_s(t)}, at {n})"
    return text


def idle_reason(planner: Planner, plan: Plan) -> str | None:
    """'8 of 64 GPUs idle: ...' with the reason from each set's next size up; None when the
    plan uses every GPU of its cluster."""
    idle = idle_gpus(plan)
    if idle <= 0:
        return None
    if plan.predicted is None:
        plan = plan.with_prediction(predict_plan(plan, planner.profile, planner.scheme).to_dict())
    growths = [growth(planner, plan, i) for i in range(len(plan.sets))]
    now = _iteration(plan)
    faster = any(
        g.iteration_s is not None
        and _faster(g.iteration_s, now)
        or g.further is not None
        and _faster(g.further[1], now)
        for g in growths
    )
    verdict = (
        "a plan growing a set into them is predicted faster"
        if faster
        else ("no faster plan uses them")
    )
    details = "; ".join(_detail(g, plan) for g in growths)
    return (
        f"{idle} of {plan.cluster.n_gpus} GPUs idle: {verdict} "
        f"(set sizes are {size_rule(planner.gpn)}; {details})"
    )


__all__ = ["Growth", "growth", "grown", "idle_gpus", "idle_reason", "size_rule"]
