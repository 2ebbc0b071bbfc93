"""The plan schema planner and executor share: sets of colocated roles, GPUs per set, each
role's layouts, and the prediction.

plan.json (keys version, cluster, job, models, sets[{models, gpus, layouts, memory}],
predicted, pipeline) is the one thing the executor reads from the planner. "pipeline"
(hybridflow.pipeline) is {"mode": "sync"} when absent, and written only for an asynchronous
plan ({"mode": "async", "staleness": k}): there the actor only trains and a set of the role
"rollout" (layout generate {pp, tp, dp}) generates. A set's "memory" holds each
trained role's MemorySettings; a plan without them gets verl's megatron defaults. "models"
(each role's parameters, KV bytes per token, layers) is derived from the job and only
written. Plan.from_dict and Plan.load validate it once; everything after them (simulate, the
exports, the executor) takes the typed Plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from hybridflow.errors import UserError, unreadable
from hybridflow.layout import GenLayout, LayoutError, ParallelLayout, RolloutLayout
from hybridflow.memory import DEFAULT, MemorySettings
from hybridflow.pipeline import SYNCHRONOUS, Pipeline, check_sets
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.model_info import model_summary
from hybridflow.vocab import ROLLOUT, TRAINED_ROLES, VALUE_ROLES, layout_kinds

AnyLayout = ParallelLayout | GenLayout | RolloutLayout

VERSION = 1


@dataclass(frozen=True)
class PlacedSet:
    models: tuple[str, ...]
    gpus: int
    layouts: Mapping[str, Mapping[str, AnyLayout]]
    memory: Mapping[str, MemorySettings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(str(m) for m in self.models))
        if not self.models or len(set(self.models)) != len(self.models):
            raise LayoutError(
                f"set: models must be a non-empty list of distinct roles, got {list(self.models)}"
            )
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus <= 0:
            raise LayoutError(
                f"set {list(self.models)}: gpus must be a positive integer, got {self.gpus!r}"
            )
        if set(self.layouts) != set(self.models):
            raise LayoutError(
                f"set {list(self.models)}: layouts must name exactly its models, "
                f"got {sorted(self.layouts)}"
            )
        frozen = {}
        for role in self.models:
            lay = dict(self.layouts[role])
            self._check_kinds(role, lay)
            main = lay.get("train") or lay.get("infer") or lay["generate"]
            main.check(self.gpus)
            if "generate" in lay and role != ROLLOUT:
                gen, train = lay["generate"], lay["train"]
                assert isinstance(gen, GenLayout) and isinstance(train, ParallelLayout)
                gen.check(self.gpus, train)
            frozen[role] = MappingProxyType(lay)
        object.__setattr__(self, "layouts", MappingProxyType(frozen))
        wrong = sorted(r for r in self.memory if r not in self.models or r not in TRAINED_ROLES)
        if wrong:
            raise LayoutError(
                f"set {list(self.models)}: memory settings are for its trained roles only, "
                f"got {', '.join(wrong)}"
            )
        object.__setattr__(self, "memory", MappingProxyType(dict(self.memory)))

    def _check_kinds(self, role: str, lay: dict) -> None:
        """The layouts of each role; the actor's with or without generate (the plan's
        pipeline decides: hybridflow.pipeline.check_sets)."""
        kinds = (set(layout_kinds(role)), set(layout_kinds(role, asynchronous=True)))
        if set(lay) not in kinds:
            raise LayoutError(
                f"set {list(self.models)}: {role} needs layouts "
                f"{', '.join(layout_kinds(role))}, got {', '.join(lay) or 'none'}"
                + (" (a rollout set only generates)" if role == ROLLOUT else "")
            )
        want = RolloutLayout if role == ROLLOUT else GenLayout
        if "generate" in lay and not isinstance(lay["generate"], want):
            raise LayoutError(
                f"set {list(self.models)}: the generate layout of {role} must be "
                f"{'{pp, tp, dp}' if role == ROLLOUT else '{pp, tp, micro_dp}'}"
            )

    def settings(self, role: str) -> MemorySettings:
        """The role's memory settings (verl's defaults where the plan gives none)."""
        return self.memory.get(role, DEFAULT)

    def resolved(self, seq_len: int) -> PlacedSet:
        """With every trained role's settings present and their token budget filled in."""
        mem = {r: self.settings(r).resolved(seq_len) for r in self.models if r in TRAINED_ROLES}
        return PlacedSet(self.models, self.gpus, self.layouts, mem)

    def layout(self, role: str) -> ParallelLayout:
        """The role's train/infer layout."""
        lay = self.layouts[role]
        main = lay.get("train") or lay["infer"]
        assert isinstance(main, ParallelLayout), f"{role}: not a train/infer layout"
        return main

    def rollout(self) -> RolloutLayout:
        """A rollout set's engine layout."""
        lay = self.layouts[ROLLOUT]["generate"]
        assert isinstance(lay, RolloutLayout), "not a rollout set"
        return lay

    def generation(self) -> GenLayout:
        gen = self.layouts["actor"]["generate"]
        assert isinstance(gen, GenLayout), "actor: not a generation layout"
        return gen

    def to_dict(self) -> dict:
        d: dict = {
            "models": list(self.models),
            "gpus": self.gpus,
            "layouts": {
                r: {k: v.to_dict() for k, v in self.layouts[r].items()} for r in self.models
            },
        }
        if self.memory:
            d["memory"] = {r: self.memory[r].to_dict() for r in self.models if r in self.memory}
        return d

    @classmethod
    def from_dict(cls, d: object) -> PlacedSet:
        if not isinstance(d, dict) or not {"models", "gpus", "layouts"} <= set(d) <= {
            "models",
            "gpus",
            "layouts",
            "memory",
        }:
            raise LayoutError(
                f"set: expected keys models, gpus, layouts (memory optional), got {d!r}"
            )
        if not isinstance(d["models"], list) or not isinstance(d["layouts"], dict):
            raise LayoutError("set: models must be a list and layouts a mapping")
        mem = d.get("memory", {})
        if not isinstance(mem, dict):
            raise LayoutError("set: memory must map trained roles to their settings")
        layouts = {}
        for role, lay in d["layouts"].items():
            if not isinstance(lay, dict):
                raise LayoutError(f"set: layouts of {role} must be a mapping")
            layouts[role] = {k: _parse_layout(role, k, v) for k, v in lay.items()}
        settings = {r: MemorySettings.from_dict(v) for r, v in mem.items()}
        return cls(tuple(d["models"]), d["gpus"], layouts, settings)


def _parse_layout(role: str, kind: str, d: object) -> AnyLayout:
    if kind != "generate":
        return ParallelLayout.from_dict(d)
    return RolloutLayout.from_dict(d) if role == ROLLOUT else GenLayout.from_dict(d)


def models_summary(job: Job) -> dict[str, dict]:
    """Each GPU role's parameters (total, active), KV bytes per token, layers and notes."""
    return {r: model_summary(job.spec(r), value_head=r in VALUE_ROLES) for r in job.gpu_roles}


class PlanError(UserError):
    """A plan file or plan that is malformed or impossible."""


@dataclass(frozen=True)
class Plan:
    cluster: Cluster
    job: Job
    sets: tuple[PlacedSet, ...]
    predicted: dict | None = None
    version: int = VERSION
    pipeline: Pipeline = SYNCHRONOUS

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise PlanError(f"plan: version {self.version!r} is not supported (expected {VERSION})")
        if not self.sets:
            raise PlanError("plan: no sets")
        if not isinstance(self.pipeline, Pipeline):
            raise PlanError(f"plan: pipeline must be a Pipeline, got {self.pipeline!r}")
        placed = [r for s in self.sets for r in s.models]
        dup = sorted({r for r in placed if placed.count(r) > 1})
        if dup:
            raise PlanError(f"plan: sets overlap: {', '.join(dup)} placed more than once")
        rules = [r for r in placed if self.job.is_rule(r)]
        if rules:
            raise PlanError(
                f"plan: {', '.join(rules)} {'is a rule' if len(rules) == 1 else 'are rules'}"
                f" (a function on the controller's CPU, no GPUs): leave "
                f"{'it' if len(rules) == 1 else 'them'} out of the sets"
            )
        check_sets(self.pipeline, self.sets, self.job.spec("actor"))
        missing = [r for r in self.job.gpu_roles if r not in placed]
        extra = [r for r in placed if r not in self.job.roles and r != ROLLOUT]
        if missing or extra:
            raise PlanError(
                f"plan: sets must place exactly the {self.job.algorithm} roles "
                f"{', '.join(self.job.gpu_roles)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(extra)}" if extra else "")
            )
        used = sum(s.gpus for s in self.sets)
        if used > self.cluster.n_gpus:
            raise PlanError(f"plan: sets use {used} GPUs but the cluster has {self.cluster.n_gpus}")
        resolved = tuple(s.resolved(self.job.seq_len) for s in self.sets)
        object.__setattr__(self, "sets", resolved)

    @property
    def gpus(self) -> int:
        return sum(s.gpus for s in self.sets)

    @property
    def asynchronous(self) -> bool:
        return self.pipeline.asynchronous

    @property
    def rollout_set(self) -> PlacedSet:
        """An asynchronous plan's rollout set."""
        assert self.asynchronous, "a synchronous plan has no rollout set"
        return self.set_of(ROLLOUT)

    @property
    def training_sets(self) -> tuple[PlacedSet, ...]:
        """Every set but the rollout set (all of a synchronous plan's)."""
        return tuple(s for s in self.sets if ROLLOUT not in s.models)

    def set_of(self, role: str) -> PlacedSet:
        return next(s for s in self.sets if role in s.models)

    @property
    def prediction(self) -> dict:
        """`predicted` of a plan that has one (every plan the planner returns)."""
        assert self.predicted is not None, "the plan has no prediction"
        return self.predicted

    def with_prediction(self, predicted: dict) -> Plan:
        return Plan(self.cluster, self.job, self.sets, predicted, self.version, self.pipeline)

    def to_dict(self) -> dict:
        d = {
            "version": self.version,
            "cluster": self.cluster.to_dict(),
            "job": self.job.to_dict(),
            "models": models_summary(self.job),
            "sets": [s.to_dict() for s in self.sets],
        }
        if self.asynchronous:  # a synchronous plan keeps the file it always had
            d["pipeline"] = self.pipeline.to_dict()
        if self.predicted is not None:
            d["predicted"] = self.predicted
        return d

    @classmethod
    def from_dict(cls, d: object) -> Plan:
        if not isinstance(d, dict):
            raise PlanError("plan: expected a JSON object")
        allowed = {"version", "cluster", "job", "models", "sets", "predicted", "pipeline"}
        if set(d) - allowed or not {"version", "cluster", "job", "sets"} <= set(d):
            raise PlanError(
                f"plan: expected keys {', '.join(sorted(allowed))} "
                f"(models, predicted, pipeline optional), got {', '.join(sorted(d))}"
            )
        if not isinstance(d["sets"], list):
            raise PlanError("plan: sets must be a list")
        predicted = d.get("predicted")
        if predicted is not None and not isinstance(predicted, dict):
            raise PlanError("plan: predicted must be an object")
        return cls(
            Cluster.from_dict(d["cluster"]),
            Job.from_dict(d["job"]),
            tuple(PlacedSet.from_dict(s) for s in d["sets"]),
            predicted,
            d["version"],
            Pipeline.from_dict(d["pipeline"]) if "pipeline" in d else SYNCHRONOUS,
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {str(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON: {e}") from None
        except OSError as e:
            raise unreadable("plan file", path, e) from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            e.args = (f"plan file {str(path)!r}: {e}",)
            raise

    def save(self, path: str | Path) -> None:
        try:
            Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        except OSError as e:
            raise unreadable("cannot write the plan file", path, e) from None
