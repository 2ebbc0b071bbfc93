"""Parallel layouts of one model for one stage kind; each checks its own arithmetic."""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """Parallel degrees that do not fit the model or the devices."""


def _degrees(owner: str, **degrees: object) -> None:
    for name, v in degrees.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise LayoutError(f"{owner}: {name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class TrainLayout:
    """Training or inference layout: pipeline, tensor and data parallel degrees, and the
    expert parallel degree of a mixture-of-experts model (Megatron's rule: its ep ranks are
    data-parallel ranks, so ep divides dp; 1 for dense models). The actor generates with the
    same expert split."""
    pp: int
    tp: int
    dp: int
    ep: int = 1

    def __post_init__(self) -> None:
        _degrees("layout", pp=self.pp, tp=self.tp, dp=self.dp, ep=self.ep)
        if self.dp % self.ep:
            raise LayoutError(f"layout: expert parallel ep={self.ep} must divide dp={self.dp}")

    @property
    def n_gpus(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def model_parallel(self) -> int:
        return self.pp * self.tp

    def check(self, n_gpus: int) -> None:
        if self.n_gpus != n_gpus:
            raise LayoutError(f"layout pp={self.pp} tp={self.tp} dp={self.dp} uses {self.n_gpus} "
                              f"GPUs, but its set has {n_gpus}")

    def to_dict(self) -> dict:
        """{pp, tp, dp}, and ep when it is not 1 (plans of dense models stay as they were)."""
        d = {"pp": self.pp, "tp": self.tp, "dp": self.dp}
        if self.ep != 1:
            d["ep"] = self.ep
        return d

    @classmethod
    def from_dict(cls, d: object) -> "TrainLayout":
        if not isinstance(d, dict) or not {"pp", "tp", "dp"} <= set(d) <= {"pp", "tp", "dp", "ep"}:
            raise LayoutError(f"layout: expected {{pp, tp, dp}} and optionally ep, got {d!r}")
        return cls(d["pp"], d["tp"], d["dp"], d.get("ep", 1))


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

    def check(self, n_gpus: int, train: TrainLayout | None = None) -> None:
        size = self.pp * self.tp * self.micro_dp
        if n_gpus % size:
            raise LayoutError(f"generation layout pp={self.pp} tp={self.tp} micro_dp="
                              f"{self.micro_dp} does not divide the set's {n_gpus} GPUs")
        if train is None:
            return
        train.check(n_gpus)
        if size != train.model_parallel:
            raise LayoutError(f"generation pp*tp*micro_dp = {size} must equal the training "
                              f"pp*tp = {train.model_parallel}")
        if train.tp % self.tp or train.pp % self.pp:
            raise LayoutError(f"generation tp={self.tp}, pp={self.pp} must divide training "
                              f"tp={train.tp}, pp={train.pp}")

    def to_dict(self) -> dict:
        return {"pp": self.pp, "tp": self.tp, "micro_dp": self.micro_dp}

    @classmethod
    def from_dict(cls, d: object) -> "GenLayout":
        if not isinstance(d, dict) or set(d) != {"pp", "tp", "micro_dp"}:
            raise LayoutError(f"generation layout: expected {{pp, tp, micro_dp}}, got {d!r}")
        return cls(d["pp"], d["tp"], d["micro_dp"])


def check_model_fits(layers: int, heads: int, kv_heads: int, pp: int, tp: int) -> None:
    """Megatron/vLLM-style sharding: whole layers per stage, whole KV heads per TP rank."""
    if layers % pp:
        raise LayoutError(f"pp={pp} does not divide the model's {layers} layers")
    if heads % tp or kv_heads % tp:
        raise LayoutError(f"tp={tp} does not divide the model's {heads} heads and "
                          f"{kv_heads} KV heads")
