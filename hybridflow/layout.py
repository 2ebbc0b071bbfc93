"""Parallel layouts: one model's degrees for one stage kind, and the rank order, in one place.

A :class:`ParallelLayout` (pp, tp, dp; ep for experts, vpp for interleaved pipelines) is
what the simulator costs, the planner searches, the plan file holds and the executor builds
its megatron-core groups from. Ranks follow megatron's order, TP innermost, then DP, then PP
(``RANK_ORDER``): global rank = tp + TP * (dp + DP * pp). Expert-parallel ranks are
data-parallel ranks (megatron's rule: ep divides dp), tp devices apart. Context parallelism
(cp) splits each sequence over cp ranks between TP and DP (megatron's tp-cp-dp-pp): they hold
the same weights and see one sequence together. Pipelines may be uneven (``pipeline_split``):
megatron-core takes the first and last stage's layer counts.

A :class:`GenLayout` is the actor's generation layout inside its training layout (the
3D-HybridEngine): pp * tp * micro_dp equals the training pp * tp; the training dp replicates it.
Or, decoupled, one generation group over several training replicas (GenLayout.decoupled).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from hybridflow.errors import UserError

RANK_ORDER = ("tp", "cp", "dp", "pp")  # innermost (consecutive ranks) first


class LayoutError(UserError):
    """Parallel degrees that do not fit the model, the devices or each other."""


class Coords(NamedTuple):
    """A rank's place in its layout."""

    pp: int
    dp: int
    tp: int


def _degrees(owner: str, **degrees: object) -> None:
    for name, v in degrees.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise LayoutError(f"{owner}: {name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class ParallelLayout:
    """Training or inference layout: pipeline, tensor and data parallel degrees, the expert
    parallel degree of a mixture-of-experts model (1 for dense models; the actor generates
    with the same expert split) and megatron's virtual pipeline chunks per rank."""

    pp: int = 1
    tp: int = 1
    dp: int = 1
    ep: int = 1
    vpp: int | None = None
    cp: int = 1

    def __post_init__(self) -> None:
        _degrees("layout", pp=self.pp, tp=self.tp, dp=self.dp, ep=self.ep, cp=self.cp)
        if self.dp % self.ep:
            raise LayoutError(f"layout: expert parallel ep={self.ep} must divide dp={self.dp}")
        if self.vpp is not None and (
            isinstance(self.vpp, bool)
            or not isinstance(self.vpp, int)
            or self.vpp < 2
            or self.pp < 2
        ):
            raise LayoutError(
                f"layout: vpp must be None or >= 2 with pp >= 2, got vpp={self.vpp!r}, pp={self.pp}"
            )

    # ---- sizes ---------------------------------------------------------------------
    @property
    def n_gpus(self) -> int:
        return self.pp * self.tp * self.cp * self.dp

    world_size = n_gpus  # the executor's name: the ranks of the role's worker group

    @property
    def model_parallel(self) -> int:
        return self.pp * self.tp

    def size(self, dim: str) -> int:
        return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}[dim]

    # ---- the rank order ------------------------------------------------------------
    def stride(self, dim: str) -> int:
        """Ranks between two neighbours along `dim` (tp 1, cp tp, dp tp * cp, pp tp * cp * dp)."""
        out = 1
        for d in RANK_ORDER:
            if d == dim:
                return out
            out *= self.size(d)
        raise ValueError(f"unknown parallel dimension {dim!r}")

    def span(self, dim: str) -> int:
        """Consecutive devices one group along `dim` lies within."""
        return self.stride(dim) * self.size(dim)

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.n_gpus:
            raise LayoutError(f"rank {rank} outside a layout of {self.n_gpus} ranks")
        return Coords(*(rank // self.stride(d) % self.size(d) for d in ("pp", "dp", "tp")))

    def cp_rank(self, rank: int) -> int:
        """A rank's place in its context-parallel group (0 when cp is 1)."""
        return rank // self.stride("cp") % self.cp

    def rank_of(self, pp: int, dp: int, tp: int, cp: int = 0) -> int:
        return (
            tp * self.stride("tp")
            + cp * self.stride("cp")
            + dp * self.stride("dp")
            + pp * self.stride("pp")
        )

    # ---- checks --------------------------------------------------------------------
    def check(self, n_gpus: int) -> None:
        if self.n_gpus != n_gpus:
            raise LayoutError(
                f"layout pp={self.pp} tp={self.tp}{f' cp={self.cp}' if self.cp > 1 else ''} "
                f"dp={self.dp} uses {self.n_gpus} "
                f"GPUs, but its set has {n_gpus}"
            )

    def check_model(self, layers: int, heads: int, kv_heads: int, vocab: int) -> None:
        """What megatron-core needs of the model: whole layers per pipeline chunk, whole KV
        heads and vocabulary rows per TP rank."""
        chunks = self.pp * (self.vpp or 1)
        if layers % chunks:
            raise LayoutError(
                f"{layers} layers do not split over pp={self.pp}"
                f"{f' x vpp={self.vpp}' if self.vpp else ''}"
            )
        if heads % self.tp or kv_heads % self.tp:
            raise LayoutError(f"tp={self.tp} must divide heads {heads} and kv_heads {kv_heads}")
        if vocab % self.tp:
            raise LayoutError(f"tp={self.tp} must divide the vocabulary {vocab}")

    # ---- plan files ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """{pp, tp, cp, dp}, and ep when it is not 1 (plans of dense models keep no ep)."""
        d = {"pp": self.pp, "tp": self.tp, "cp": self.cp, "dp": self.dp}
        if self.ep != 1:
            d["ep"] = self.ep
        return d

    @classmethod
    def from_dict(cls, d: object) -> ParallelLayout:
        keys = {"pp", "tp", "dp", "cp", "ep"}
        if not isinstance(d, dict) or not {"pp", "tp", "dp"} <= set(d) <= keys:
            raise LayoutError(f"layout: expected {{pp, tp, dp}} and optionally cp, ep, got {d!r}")
        return cls(d["pp"], d["tp"], d["dp"], d.get("ep", 1), cp=d.get("cp", 1))

    def __str__(self) -> str:
        vpp = f"xVPP{self.vpp}" if self.vpp else ""
        cp = f"xCP{self.cp}" if self.cp != 1 else ""
        ep = f"xEP{self.ep}" if self.ep != 1 else ""
        return f"TP{self.tp}{cp}xPP{self.pp}{vpp}xDP{self.dp}{ep}"


@dataclass(frozen=True)
class GenLayout:
    """The actor's generation layout inside its training layout (3D-HybridEngine):
    pp·tp·micro_dp equals the training pp·tp; the training dp replicates it."""

    pp: int
    tp: int
    micro_dp: int

    def __post_init__(self) -> None:
        _degrees("generation layout", pp=self.pp, tp=self.tp, micro_dp=self.micro_dp)

    @property
    def model_parallel(self) -> int:
        return self.pp * self.tp

    def check(self, n_gpus: int, train: ParallelLayout | None = None) -> None:
        size = self.pp * self.tp * self.micro_dp
        if n_gpus % size:
            raise LayoutError(
                f"generation layout pp={self.pp} tp={self.tp} micro_dp="
                f"{self.micro_dp} does not divide the set's {n_gpus} GPUs"
            )
        if train is None:
            return
        train.check(n_gpus)
        if self.decoupled(train):
            return
        if size != train.model_parallel:
            raise LayoutError(
                f"generation pp*tp*micro_dp = {size} must equal the training "
                f"pp*tp = {train.model_parallel} (or, with micro_dp 1, tp a multiple of the "
                f"training tp and pp*tp a multiple of the training pp*tp)"
            )
        if train.tp % self.tp or train.pp % self.pp:
            raise LayoutError(
                f"generation tp={self.tp}, pp={self.pp} must divide training "
                f"tp={train.tp}, pp={train.pp}"
            )

    def decoupled(self, train: ParallelLayout) -> bool:
        """A generation model-parallel group larger than the training one (NeMo-RL's
        rollout tp above the training tp x pp): one generation replica spans several
        training replicas, its tp a multiple of the training tp, its stages whole training
        stages. The 3D-HybridEngine's nesting does not hold: a general resharding builds
        it (simulator/reshard.py)."""
        return (
            self.micro_dp == 1
            and self.model_parallel > train.model_parallel
            and self.model_parallel % train.model_parallel == 0
            and self.tp % train.tp == 0
            and train.pp % self.pp == 0
        )

    def to_dict(self) -> dict:
        return {"pp": self.pp, "tp": self.tp, "micro_dp": self.micro_dp}

    @classmethod
    def from_dict(cls, d: object) -> GenLayout:
        if not isinstance(d, dict) or set(d) != {"pp", "tp", "micro_dp"}:
            raise LayoutError(f"generation layout: expected {{pp, tp, micro_dp}}, got {d!r}")
        return cls(d["pp"], d["tp"], d["micro_dp"])


@dataclass(frozen=True)
class RolloutLayout:
    """The generation layout of an asynchronous plan's rollout set: dp engine replicas, each
    pp x tp GPUs (vLLM's pipeline and tensor parallel degrees); pp * tp * dp is the set."""

    pp: int
    tp: int
    dp: int

    def __post_init__(self) -> None:
        _degrees("rollout layout", pp=self.pp, tp=self.tp, dp=self.dp)

    @property
    def model_parallel(self) -> int:
        return self.pp * self.tp

    @property
    def n_gpus(self) -> int:
        return self.pp * self.tp * self.dp

    def check(self, n_gpus: int) -> None:
        if self.n_gpus != n_gpus:
            raise LayoutError(
                f"rollout layout pp={self.pp} tp={self.tp} dp={self.dp} uses {self.n_gpus} "
                f"GPUs, but its set has {n_gpus}"
            )

    def engine(self) -> tuple[ParallelLayout, GenLayout]:
        """The engines as the generation model costs them: dp replicas of one pp x tp group
        (a training-shaped layout with no training behind it, and its generation layout)."""
        return ParallelLayout(self.pp, self.tp, self.dp), GenLayout(self.pp, self.tp, 1)

    def to_dict(self) -> dict:
        return {"pp": self.pp, "tp": self.tp, "dp": self.dp}

    @classmethod
    def from_dict(cls, d: object) -> RolloutLayout:
        if not isinstance(d, dict) or set(d) != {"pp", "tp", "dp"}:
            raise LayoutError(f"rollout layout: expected {{pp, tp, dp}}, got {d!r}")
        return cls(d["pp"], d["tp"], d["dp"])


def check_model_fits(
    layers: int, heads: int, kv_heads: int, pp: int, tp: int, replicate_kv: bool = False
) -> None:
    """Megatron/vLLM-style sharding: at least one layer per stage (stages may be uneven),
    whole heads per TP rank and whole KV heads, or (vLLM, `replicate_kv`) a tp that a KV
    head's copies fill evenly: kv_heads divides tp."""
    if pp > layers:
        raise LayoutError(f"pp={pp} exceeds the model's {layers} layers")
    if heads % tp:
        raise LayoutError(f"tp={tp} does not divide the model's {heads} heads")
    if kv_heads % tp and not (replicate_kv and tp % kv_heads == 0):
        raise LayoutError(
            f"tp={tp} does not divide the model's {kv_heads} KV heads"
            + (" (nor do they divide it)" if replicate_kv else "")
        )


@functools.lru_cache(maxsize=4096)
def pipeline_split(
    layers: int, pp: int, first_extra: float = 0.0, last_extra: float = 0.0
) -> tuple[int, ...]:
    """Layers per pipeline stage: the middle stages equal (megatron-core's
    decoder_first/last_pipeline_num_layers), the first and last stage chosen so that the
    slowest stage is fastest, where the first stage also does `first_extra` and the last
    `last_extra` layers' worth of work (embedding, LM head and loss). Even when that ties."""
    if pp == 1:
        return (layers,)
    best: tuple[float, int, tuple[int, ...]] | None = None
    mids = range(0, 1) if pp == 2 else range(1, layers // (pp - 2) + 1)
    for mid in mids:
        rest = layers - mid * (pp - 2)
        for first in range(1, rest):
            split = (first,) + (mid,) * (pp - 2) + (rest - first,)
            slowest = max(first + first_extra, mid if pp > 2 else 0, rest - first + last_extra)
            spread = max(split) - min(split)
            if best is None or (slowest, spread) < best[:2]:
                best = (slowest, spread, split)
    if best is None:
        raise LayoutError(f"{layers} layers cannot fill pp={pp} stages")
    return best[2]
