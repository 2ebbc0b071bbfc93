"""A set of colocated roles on a number of GPUs, with each role's layouts."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from simulator.job import TRAINED_ROLES
from simulator.layout import GenLayout, LayoutError, TrainLayout


def layout_kinds(role: str) -> tuple[str, ...]:
    """The layouts a role needs: the actor trains and generates, critics train (and infer
    with the same layout), the others only infer."""
    if role == "actor":
        return ("train", "generate")
    return ("train",) if role in TRAINED_ROLES else ("infer",)


@dataclass(frozen=True)
class PlacedSet:
    models: tuple[str, ...]
    gpus: int
    layouts: Mapping[str, Mapping[str, TrainLayout | GenLayout]]

    def __post_init__(self) -> None:
        if not self.models or len(set(self.models)) != len(self.models):
            raise LayoutError(f"set: models must be a non-empty list of distinct roles, got "
                              f"{list(self.models)}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus <= 0:
            raise LayoutError(f"set {list(self.models)}: gpus must be a positive integer, got {self.gpus!r}")
        if set(self.layouts) != set(self.models):
            raise LayoutError(f"set {list(self.models)}: layouts must name exactly its models, "
                              f"got {sorted(self.layouts)}")
        frozen = {}
        for role in self.models:
            lay = dict(self.layouts[role])
            if set(lay) != set(layout_kinds(role)):
                raise LayoutError(f"set {list(self.models)}: {role} needs layouts "
                                  f"{', '.join(layout_kinds(role))}, got {', '.join(lay) or 'none'}")
            main = lay.get("train") or lay["infer"]
            main.check(self.gpus)
            if "generate" in lay:
                lay["generate"].check(self.gpus, lay["train"])
            frozen[role] = MappingProxyType(lay)
        object.__setattr__(self, "layouts", MappingProxyType(frozen))

    def layout(self, role: str) -> TrainLayout:
        """The role's train/infer layout."""
        lay = self.layouts[role]
        return lay.get("train") or lay["infer"]

    def generation(self) -> GenLayout:
        return self.layouts["actor"]["generate"]

    def to_dict(self) -> dict:
        return {"models": list(self.models), "gpus": self.gpus,
                "layouts": {r: {k: v.to_dict() for k, v in self.layouts[r].items()}
                            for r in self.models}}

    @classmethod
    def from_dict(cls, d: object) -> "PlacedSet":
        if not isinstance(d, dict) or set(d) != {"models", "gpus", "layouts"}:
            raise LayoutError(f"set: expected keys models, gpus, layouts, got {d!r}")
        if not isinstance(d["models"], list) or not isinstance(d["layouts"], dict):
            raise LayoutError("set: models must be a list and layouts a mapping")
        layouts = {}
        for role, lay in d["layouts"].items():
            if not isinstance(lay, dict):
                raise LayoutError(f"set: layouts of {role} must be a mapping")
            layouts[role] = {k: (GenLayout.from_dict(v) if k == "generate" else TrainLayout.from_dict(v))
                             for k, v in lay.items()}
        return cls(tuple(d["models"]), d["gpus"], layouts)
