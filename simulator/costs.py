"""Named terms of a prediction (seconds or bytes) and the collective-communication model."""

from __future__ import annotations

from dataclasses import dataclass

from hybridflow.errors import UserError
from hybridflow.simulator.profile import Profile, interpolate

GIB = 2**30


class DoesNotFit(UserError):
    """A model, layout or set that does not fit in device memory."""


@dataclass(frozen=True)
class Term:
    name: str
    value: float  # seconds (Cost) or bytes (Memory)
    source: str = "roofline"  # measured | roofline | formula

    def __post_init__(self) -> None:
        assert self.value >= 0, f"negative term {self.name}={self.value}"


@dataclass(frozen=True)
class Cost:
    """Seconds as a sum of named terms."""

    terms: tuple[Term, ...] = ()

    @property
    def seconds(self) -> float:
        return sum(t.value for t in self.terms)

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.terms:
            out[t.name] = out.get(t.name, 0.0) + t.value
        return out

    def sources(self) -> dict[str, str]:
        return {t.name: t.source for t in self.terms}

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.terms + other.terms)


def cost(*terms: tuple[str, float, str] | tuple[str, float]) -> Cost:
    """Cost from (name, seconds[, source]) tuples, dropping zero terms."""
    return Cost(tuple(Term(*t) for t in terms if t[1] > 0))


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU as a sum of named terms."""

    terms: tuple[Term, ...] = ()

    @property
    def bytes(self) -> float:
        return sum(t.value for t in self.terms)

    @property
    def gib(self) -> float:
        return self.bytes / GIB

    def as_dict(self) -> dict[str, float]:
        return {t.name: t.value for t in self.terms}

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.terms + other.terms)


def memory(**named: float) -> Memory:
    return Memory(tuple(Term(k, float(v), "formula") for k, v in named.items() if v > 0))


# ---- collectives (alpha-beta ring model, or a measured table) --------------------------
_STEPS = {
    "all_reduce": lambda r: 2 * (r - 1),
    "all_gather": lambda r: r - 1,
    "broadcast": lambda r: r - 1,
    "p2p": lambda r: 1,
}
_VOLUME = {
    "all_reduce": lambda r: 2 * (r - 1) / r,
    "all_gather": lambda r: (r - 1) / r,
    "broadcast": lambda r: 1.0,
    "p2p": lambda r: 1.0,
}


def collective(
    profile: Profile, op: str, nbytes: float, ranks: int, intra: bool
) -> tuple[float, str]:
    """Seconds for one collective of `nbytes` (the full buffer; for all_gather the gathered
    output) over `ranks` devices, inside one node (`intra`) or across nodes."""
    if ranks <= 1 and op != "p2p" or nbytes <= 0:
        return 0.0, "roofline"
    table = profile.measured.collective(op)
    rows = tuple((b, s) for r, b, s in table if r == ranks)
    if rows and intra:
        return interpolate(rows, nbytes), "measured"
    bw = profile.intra_node_bandwidth if intra else profile.inter_node_bandwidth
    steps = _STEPS[op](max(ranks, 2))
    seconds = steps * profile.comm_latency_s + _VOLUME[op](max(ranks, 2)) * nbytes / (
        bw * profile.eff_communication
    )
    return seconds, "roofline"
