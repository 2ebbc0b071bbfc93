"""Synchronous against asynchronous: the best plan of each pipeline, and which one to run.

`--pipeline sync` plans as the paper does (planner.search), `async` plans a rollout set
beside the training sets (planner.asynchronous), `auto` both; the faster prediction wins,
a tie goes to the synchronous plan (no staleness, one set of weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridflow.errors import UserError
from hybridflow.pipeline import ASYNC, SYNC
from hybridflow.plan import Plan
from hybridflow.planner.asynchronous import AsyncSearch
from hybridflow.planner.search import Planner
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.costs import DoesNotFit

AUTO = "auto"
CHOICES = (SYNC, ASYNC, AUTO)


@dataclass(frozen=True)
class PipelineChoice:
    """The best synchronous plans (best first) and the best asynchronous plan, as asked."""

    mode: str
    sync: tuple[Plan, ...] = ()
    asynchronous: Plan | None = None

    def __post_init__(self) -> None:
        assert self.mode in CHOICES and (self.sync or self.asynchronous is not None)

    @property
    def async_wins(self) -> bool:
        if self.asynchronous is None:
            return False
        if not self.sync:
            return True
        return _step(self.asynchronous) < _step(self.sync[0])

    @property
    def best(self) -> Plan:
        if self.async_wins:
            assert self.asynchronous is not None
            return self.asynchronous
        return self.sync[0]

    def plans(self, top: int) -> list[Plan]:
        """The `top` best: the synchronous ranking with the asynchronous plan in its place."""
        ranked = sorted(
            [*self.sync, *([self.asynchronous] if self.asynchronous is not None else [])],
            key=lambda p: (_step(p), p.asynchronous),
        )
        return ranked[:top]

    def reason(self) -> str:
        """Which pipeline was chosen and why, in the asynchronous step's two terms."""
        if self.mode != AUTO:
            how = "asynchronously" if self.mode == ASYNC else "synchronously"
            return f"planned {how} (--pipeline {self.mode})"
        if self.asynchronous is None:
            return "chose synchronous: no asynchronous plan fits in memory"
        a = self.asynchronous.prediction["pipeline"]
        terms = (
            f"max(produce {a['produce_s']:.2f} s, consume {a['consume_s']:.2f} s) + exposed "
            f"sync {a['exposed_sync_s']:.2f} s = {a['step_s']:.2f} s ({a['bound']}-bound)"
            if a["staleness"] >= 1
            else f"produce {a['produce_s']:.2f} s + consume {a['consume_s']:.2f} s + sync "
            f"{a['exposed_sync_s']:.2f} s = {a['step_s']:.2f} s (staleness 0)"
        )
        if not self.sync:
            return f"chose asynchronous: no synchronous plan fits; its step is {terms}"
        s = _step(self.sync[0])
        if self.async_wins:
            return (
                f"chose asynchronous: its step {terms} beats the synchronous iteration "
                f"{s:.2f} s ({s / a['step_s']:.2f}x)"
            )
        return (
            f"chose synchronous: its iteration {s:.2f} s is no slower than the asynchronous "
            f"step {terms}"
        )


def _step(plan: Plan) -> float:
    return float(plan.prediction["iteration_s"])


def plan_pipelines(
    planner: Planner, cluster: Cluster, mode: str = AUTO, staleness: int = 1, top: int = 1
) -> PipelineChoice:
    """The best plans of the pipelines `mode` asks for; DoesNotFit if none fits."""
    if mode not in CHOICES:
        raise UserError(f"--pipeline must be one of {', '.join(CHOICES)}, got {mode!r}")
    search = AsyncSearch(planner, staleness)  # checks the staleness before any planning
    sync: tuple[Plan, ...] = ()
    error: DoesNotFit | None = None
    if mode != ASYNC:
        try:
            sync = tuple(planner.plan(cluster, top))
        except DoesNotFit as e:
            error = e
    asynchronous = search.plan(cluster) if mode != SYNC else None
    if not sync and asynchronous is None:
        if error is not None:
            raise error
        raise DoesNotFit(
            f"no asynchronous plan fits in memory on {cluster.n_gpus} "
            f"{planner.profile.name} GPUs (a rollout set and the training sets beside it)"
        )
    return PipelineChoice(mode, sync, asynchronous)
