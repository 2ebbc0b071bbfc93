"""A homogeneous GPU cluster: GPU kind (the name of a profile), nodes, GPUs per node."""

from __future__ import annotations

from dataclasses import dataclass

from hybridflow.errors import UserError


class ClusterError(UserError):
    """A cluster description that cannot exist."""


# no cluster has more GPUs (the largest have about 2**17); beyond it a plan is no answer
MAX_GPUS = 2**20


def _positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ClusterError(f"{what} must be a positive integer, got {value!r}")
    if value > MAX_GPUS:
        raise ClusterError(
            f"{what} must be at most {MAX_GPUS:,} (2**20, more GPUs than any cluster has), "
            f"got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Cluster:
    gpu: str
    nodes: int
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.gpu, str) or not self.gpu:
            raise ClusterError(f"cluster: GPU kind must be a non-empty name, got {self.gpu!r}")
        _positive_int("cluster: nodes", self.nodes)
        _positive_int("cluster: gpus_per_node", self.gpus_per_node)
        _positive_int(
            f"cluster: nodes x gpus_per_node = {self.nodes} x {self.gpus_per_node}", self.n_gpus
        )

    @property
    def n_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def from_gpus(cls, gpu: str, gpus: int, gpus_per_node: int = 8) -> Cluster:
        """`gpus` devices: up to one node, or a whole number of nodes."""
        _positive_int("--gpus", gpus)
        _positive_int("--gpus-per-node", gpus_per_node)
        if gpus <= gpus_per_node:
            return cls(gpu, 1, gpus)
        if gpus % gpus_per_node:
            raise ClusterError(
                f"{gpus} GPUs is more than one node but not a whole number of "
                f"{gpus_per_node}-GPU nodes (use {gpus // gpus_per_node * gpus_per_node} "
                f"or {(gpus // gpus_per_node + 1) * gpus_per_node})"
            )
        return cls(gpu, gpus // gpus_per_node, gpus_per_node)

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node}

    @classmethod
    def from_dict(cls, d: object) -> Cluster:
        if not isinstance(d, dict) or set(d) - {"gpu", "nodes", "gpus_per_node"} or "gpu" not in d:
            raise ClusterError(f"cluster: expected {{gpu, nodes, gpus_per_node}}, got {d!r}")
        return cls(d["gpu"], d.get("nodes", 1), d.get("gpus_per_node", 8))

    def group_bandwidth(self, intra: float, inter: float, span: int) -> float:
        """Bandwidth of a group whose ranks lie within `span` consecutive devices."""
        return intra if span <= self.gpus_per_node else inter
