"""The plan: sets of colocated roles, GPUs per set, layouts, and the prediction.

plan.json is the only thing the executor reads from the planner; its keys are fixed
(issue 2): version, cluster, job, sets[{models, gpus, layouts}], predicted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from simulator.cluster import Cluster
from simulator.job import Job
from simulator.placement import PlacedSet

VERSION = 1


class PlanError(ValueError):
    """A plan file or plan that is malformed or impossible."""


@dataclass(frozen=True)
class Plan:
    cluster: Cluster
    job: Job
    sets: tuple[PlacedSet, ...]
    predicted: dict | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise PlanError(f"plan: version {self.version!r} is not supported (expected {VERSION})")
        if not self.sets:
            raise PlanError("plan: no sets")
        placed = [r for s in self.sets for r in s.models]
        dup = sorted({r for r in placed if placed.count(r) > 1})
        if dup:
            raise PlanError(f"plan: sets overlap: {', '.join(dup)} placed more than once")
        rules = [r for r in placed if self.job.is_rule(r)]
        if rules:
            raise PlanError(f"plan: {', '.join(rules)} {'is a rule' if len(rules) == 1 else 'are rules'}"
                            f" (a function on the controller's CPU, no GPUs): leave "
                            f"{'it' if len(rules) == 1 else 'them'} out of the sets")
        missing = [r for r in self.job.gpu_roles if r not in placed]
        extra = [r for r in placed if r not in self.job.roles]
        if missing or extra:
            raise PlanError(f"plan: sets must place exactly the {self.job.algorithm} roles "
                            f"{', '.join(self.job.gpu_roles)}" + (f"; missing {', '.join(missing)}" if missing else "")
                            + (f"; unknown {', '.join(extra)}" if extra else ""))
        used = sum(s.gpus for s in self.sets)
        if used > self.cluster.n_gpus:
            raise PlanError(f"plan: sets use {used} GPUs but the cluster has {self.cluster.n_gpus}")

    @property
    def gpus(self) -> int:
        return sum(s.gpus for s in self.sets)

    def set_of(self, role: str) -> PlacedSet:
        return next(s for s in self.sets if role in s.models)

    def with_prediction(self, predicted: dict) -> "Plan":
        return Plan(self.cluster, self.job, self.sets, predicted, self.version)

    def to_dict(self) -> dict:
        d = {"version": self.version, "cluster": self.cluster.to_dict(),
             "job": self.job.to_dict(), "sets": [s.to_dict() for s in self.sets]}
        if self.predicted is not None:
            d["predicted"] = self.predicted
        return d

    @classmethod
    def from_dict(cls, d: object) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError("plan: expected a JSON object")
        allowed = {"version", "cluster", "job", "sets", "predicted"}
        if set(d) - allowed or not {"version", "cluster", "job", "sets"} <= set(d):
            raise PlanError(f"plan: expected keys {', '.join(sorted(allowed))} "
                            f"(predicted optional), got {', '.join(sorted(d))}")
        if not isinstance(d["sets"], list):
            raise PlanError("plan: sets must be a list")
        predicted = d.get("predicted")
        if predicted is not None and not isinstance(predicted, dict):
            raise PlanError("plan: predicted must be an object")
        return cls(Cluster.from_dict(d["cluster"]), Job.from_dict(d["job"]),
                   tuple(PlacedSet.from_dict(s) for s in d["sets"]), predicted, d["version"])

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {str(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            e.args = (f"plan file {str(path)!r}: {e}",)
            raise

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
