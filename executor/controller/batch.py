"""A named-tensor batch: the unit the controller moves between worker groups.

Every tensor and non-tensor field shares the leading (batch) dimension. Non-tensor fields are
numpy object arrays (strings, dicts, ragged lists); ``meta`` holds batch-wide values (e.g. the
temperature used) and is carried along by every operation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class BatchError(ValueError):
    """An operation that does not fit the batch's fields or sizes."""


def _as_object_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    non_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tensors = dict(self.tensors)
        self.non_tensors = {k: _as_object_array(v) for k, v in self.non_tensors.items()}
        self.meta = dict(self.meta)
        for k, v in self.tensors.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                raise BatchError(f"tensor field {k!r} must be a tensor with a batch dimension")
        sizes = {k: len(v) for k, v in [*self.tensors.items(), *self.non_tensors.items()]}
        if len(set(sizes.values())) > 1:
            raise BatchError(f"batch fields differ in batch size: {sizes}")
        overlap = set(self.tensors) & set(self.non_tensors)
        if overlap:
            raise BatchError(f"fields {sorted(overlap)} are both tensor and non-tensor")

    # ---- access ----------------------------------------------------------------------
    def __len__(self) -> int:
        for v in [*self.tensors.values(), *self.non_tensors.values()]:
            return len(v)
        return 0

    def __getitem__(self, key: str) -> Any:
        if key in self.tensors:
            return self.tensors[key]
        if key in self.non_tensors:
            return self.non_tensors[key]
        raise KeyError(f"batch has no field {key!r} (fields: {sorted(self.keys())})")

    def __contains__(self, key: object) -> bool:
        return key in self.tensors or key in self.non_tensors

    def keys(self) -> list[str]:
        return [*self.tensors, *self.non_tensors]

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    # ---- operations ------------------------------------------------------------------
    def slice(self, start: int, stop: int) -> Batch:
        return Batch(
            {k: v[start:stop] for k, v in self.tensors.items()},
            {k: v[start:stop] for k, v in self.non_tensors.items()},
            self.meta,
        )

    def index(self, idx: Sequence[int] | torch.Tensor | np.ndarray) -> Batch:
        idx_np = np.asarray(idx, dtype=np.int64)
        idx_t = torch.as_tensor(idx_np)
        return Batch(
            {k: v[idx_t.to(v.device)] for k, v in self.tensors.items()},
            {k: v[idx_np] for k, v in self.non_tensors.items()},
            self.meta,
        )

    def split(self, parts: int) -> list[Batch]:
        """`parts` equal consecutive chunks (the batch size must divide evenly)."""
        if not isinstance(parts, int) or parts < 1:
            raise BatchError(f"split needs a positive number of parts, got {parts!r}")
        if len(self) % parts:
            raise BatchError(f"batch of {len(self)} does not split into {parts} equal parts")
        size = len(self) // parts
        return [self.slice(i * size, (i + 1) * size) for i in range(parts)]

    def chunks_of(self, size: int) -> list[Batch]:
        if size < 1 or len(self) % size:
            raise BatchError(f"batch of {len(self)} does not split into chunks of {size}")
        return self.split(len(self) // size)

    @staticmethod
    def concat(batches: Iterable[Batch]) -> Batch:
        batches = list(batches)
        if not batches:
            raise BatchError("concat of no batches")
        keys = [(sorted(b.tensors), sorted(b.non_tensors)) for b in batches]
        if any(k != keys[0] for k in keys):
            raise BatchError(
                f"concat of batches with different fields: {keys[0]} vs "
                f"{next(k for k in keys if k != keys[0])}"
            )
        meta: dict[str, Any] = {}
        for b in batches:
            meta.update(b.meta)
        return Batch(
            {k: torch.cat([b.tensors[k] for b in batches]) for k in batches[0].tensors},
            {
                k: np.concatenate([b.non_tensors[k] for b in batches])
                for k in batches[0].non_tensors
            },
            meta,
        )

    def union(self, other: Batch) -> Batch:
        """Fields of both; a field in both must hold equal values."""
        if len(self) != len(other) and self.keys() and other.keys():
            raise BatchError(f"union of batches of size {len(self)} and {len(other)}")
        for k in set(self.tensors) & set(other.tensors):
            if not torch.equal(self.tensors[k], other.tensors[k]):
                raise BatchError(f"union: field {k!r} differs between the batches")
        for k in set(self.non_tensors) & set(other.non_tensors):
            if not np.array_equal(self.non_tensors[k], other.non_tensors[k]):
                raise BatchError(f"union: field {k!r} differs between the batches")
        return Batch(
            {**self.tensors, **other.tensors},
            {**self.non_tensors, **other.non_tensors},
            {**self.meta, **other.meta},
        )

    def select(
        self, keys: Iterable[str] | None = None, meta_keys: Iterable[str] | None = None
    ) -> Batch:
        """Only the named fields (tensor or not) and, if given, the named meta entries."""
        keys = self.keys() if keys is None else list(keys)
        missing = [k for k in keys if k not in self]
        if missing:
            raise BatchError(f"select: batch has no fields {missing}")
        meta = self.meta if meta_keys is None else {k: self.meta[k] for k in meta_keys}
        return Batch(
            {k: v for k, v in self.tensors.items() if k in keys},
            {k: v for k, v in self.non_tensors.items() if k in keys},
            meta,
        )

    def repeat(self, times: int, interleave: bool = True) -> Batch:
        """Each row `times` times: interleaved (a a b b) or tiled (a b a b)."""
        if not isinstance(times, int) or times < 1:
            raise BatchError(f"repeat needs a positive count, got {times!r}")
        if interleave:
            tensors = {k: v.repeat_interleave(times, dim=0) for k, v in self.tensors.items()}
            others = {k: np.repeat(v, times) for k, v in self.non_tensors.items()}
        else:
            tensors = {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in self.tensors.items()}
            others = {k: np.tile(v, times) for k, v in self.non_tensors.items()}
        return Batch(tensors, others, self.meta)

    def with_fields(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        non_tensors: Mapping[str, Any] | None = None,
        **meta: Any,
    ) -> Batch:
        """A copy with fields added or replaced."""
        return Batch(
            {**self.tensors, **(tensors or {})},
            {**self.non_tensors, **(non_tensors or {})},
            {**self.meta, **meta},
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {k: v.to(device) for k, v in self.tensors.items()}, self.non_tensors, self.meta
        )

    def equals(self, other: Batch) -> bool:
        return (
            sorted(self.tensors) == sorted(other.tensors)
            and sorted(self.non_tensors) == sorted(other.non_tensors)
            and all(torch.equal(v, other.tensors[k]) for k, v in self.tensors.items())
            and all(np.array_equal(v, other.non_tensors[k]) for k, v in self.non_tensors.items())
            and self.meta == other.meta
        )
