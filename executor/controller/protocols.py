"""Transfer protocols: how the controller splits a call's input over ranks and collects outputs.

A worker method declares its protocol with ``@register(dispatch_mode=...)``. A mode is a
pair of functions kept in an open table (:data:`MODES`); other modules add modes with
:func:`register_mode`. The table holds the paper's ONE_TO_ALL, ALL_TO_ALL, DP_COMPUTE,
MEGATRON_3D (3D_PROTO) and the generation engine's 3D_ALL_MICRO_DP.

* ``dispatch(ctx, args, kwargs) -> [(args, kwargs) per rank]``
* ``collect(ctx, outputs: [output per rank]) -> result``

``ctx`` (:class:`CallContext`) tells the functions the world size and the layout of the role
the call is about. Splitting applies to :class:`Batch` arguments; other arguments go to every
rank unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.engines import timers
from hybridflow.layout import ParallelLayout


class ProtocolError(ValueError):
    """A call whose arguments do not fit its dispatch mode."""


@dataclass(frozen=True)
class CallContext:
    world_size: int
    layout: ParallelLayout | None  # the role's layout; None for calls not about one role

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ProtocolError(f"world size must be positive, got {self.world_size}")
        if self.layout is not None and self.layout.world_size != self.world_size:
            raise ProtocolError(f"layout {self.layout} does not cover {self.world_size} ranks")

    def need_layout(self, mode: str) -> ParallelLayout:
        if self.layout is None:
            raise ProtocolError(f"dispatch mode {mode} needs a role (its layout)")
        return self.layout


Dispatched = list[tuple[tuple, dict]]
DispatchFn = Callable[[CallContext, tuple, dict], Dispatched]
CollectFn = Callable[[CallContext, list], Any]


@dataclass(frozen=True)
class Mode:
    name: str
    dispatch: DispatchFn
    collect: CollectFn


MODES: dict[str, Mode] = {}


def register_mode(name: str, dispatch: DispatchFn, collect: CollectFn) -> Mode:
    if name in MODES:
        raise ProtocolError(f"dispatch mode {name!r} is already registered")
    MODES[name] = Mode(name, dispatch, collect)
    return MODES[name]


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ProtocolError(f"unknown dispatch mode {name!r} (known: {sorted(MODES)})") from None


DISPATCH_ATTR = "_hybridflow_dispatch_mode"


def register(dispatch_mode: str = "ONE_TO_ALL") -> Callable:
    """Declare a worker method's transfer protocol (the mode may be registered later); its
    calls are timed per role (executor.engines.timers: ``call:<role>.<method>``)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            role = args[0] if args and isinstance(args[0], str) else ""
            with timers.timed(f"call:{role}.{fn.__name__}"):
                return fn(self, *args, **kwargs)

        setattr(call, DISPATCH_ATTR, dispatch_mode)
        return call

    return wrap


def dispatch_mode_of(cls: type, method: str) -> str | None:
    return getattr(getattr(cls, method, None), DISPATCH_ATTR, None)


# ---- helpers ---------------------------------------------------------------------------
def split_args(args: tuple, kwargs: dict, parts: int) -> list[tuple[tuple, dict]]:
    """Split every Batch argument into `parts` equal chunks; others are repeated."""

    def pieces(v: Any) -> list[Any]:
        return v.split(parts) if isinstance(v, Batch) else [v] * parts

    a = [pieces(v) for v in args]
    k = {name: pieces(v) for name, v in kwargs.items()}
    return [(tuple(p[i] for p in a), {name: p[i] for name, p in k.items()}) for i in range(parts)]


def merge_outputs(outputs: Sequence[Any]) -> Any:
    """Concatenate Batches or tensors; None if all are None; otherwise the list."""
    outputs = list(outputs)
    if all(o is None for o in outputs):
        return None
    if all(isinstance(o, Batch) for o in outputs):
        return Batch.concat(outputs)
    if all(isinstance(o, torch.Tensor) for o in outputs):
        return torch.cat(outputs)
    return outputs


# ---- the built-in modes ----------------------------------------------------------------
def _one_to_all(ctx: CallContext, args: tuple, kwargs: dict) -> Dispatched:
    return [(args, kwargs)] * ctx.world_size


def _all_to_all(ctx: CallContext, args: tuple, kwargs: dict) -> Dispatched:
    for v in [*args, *kwargs.values()]:
        if not isinstance(v, (list, tuple)) or len(v) != ctx.world_size:
            raise ProtocolError(
                f"ALL_TO_ALL needs every argument to be a list of one value "
                f"per rank ({ctx.world_size}), got {type(v).__name__}"
            )
    return [
        (tuple(v[r] for v in args), {k: v[r] for k, v in kwargs.items()})
        for r in range(ctx.world_size)
    ]


def _as_list(ctx: CallContext, outputs: list) -> list:
    return list(outputs)


def _dp_compute(ctx: CallContext, args: tuple, kwargs: dict) -> Dispatched:
    return split_args(args, kwargs, ctx.world_size)


def _dp_collect(ctx: CallContext, outputs: list) -> Any:
    return merge_outputs(outputs)


def _megatron_3d(ctx: CallContext, args: tuple, kwargs: dict) -> Dispatched:
    """Split over DP; the same for the training layout's calls and for generation (each DP
    replica generates its share, split again over its micro-DP group inside the engine)."""
    layout = ctx.need_layout("MEGATRON_3D")
    per_dp = split_args(args, kwargs, layout.dp)
    # every rank of a DP slice gets it: stage 0 uses the inputs, the last stage the loss fields
    return [per_dp[layout.coords(r).dp] for r in range(ctx.world_size)]


def megatron_3d_output_ranks(layout: ParallelLayout) -> list[int]:
    """Last pipeline stage, TP rank 0, one per DP rank in DP order."""
    return [layout.rank_of(pp=layout.pp - 1, dp=d, tp=0) for d in range(layout.dp)]


def _megatron_3d_collect(ctx: CallContext, outputs: list) -> Any:
    layout = ctx.need_layout("MEGATRON_3D")
    return merge_outputs([outputs[r] for r in megatron_3d_output_ranks(layout)])


def _first_rank_of_replicas(ctx: CallContext, outputs: list) -> Any:
    """Generation: the first rank of each DP replica (pp 0, tp 0) returns all its completions."""
    layout = ctx.need_layout("3D_ALL_MICRO_DP")
    return merge_outputs([outputs[layout.rank_of(pp=0, dp=d, tp=0)] for d in range(layout.dp)])


ONE_TO_ALL = register_mode("ONE_TO_ALL", _one_to_all, _as_list).name
ALL_TO_ALL = register_mode("ALL_TO_ALL", _all_to_all, _as_list).name
DP_COMPUTE = register_mode("DP_COMPUTE", _dp_compute, _dp_collect).name
MEGATRON_3D = register_mode("MEGATRON_3D", _megatron_3d, _megatron_3d_collect).name
GENERATE = register_mode("3D_ALL_MICRO_DP", _megatron_3d, _first_rank_of_replicas).name
