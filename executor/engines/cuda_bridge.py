"""The one CPU compatibility layer for megatron-core (used only when no CUDA device exists).

megatron-core 0.16.1 takes CUDA-only calls on paths the executor uses (RNG tracker,
``device="cuda"`` factories, ``torch.cuda.current_device()`` buffers, ``tensor.type()``
asserts in the optimizer). This module bridges them at run time without editing the
installed package:

* ``install()`` (process-wide, idempotent): stubs ``torch.cuda.current_device`` /
  ``synchronize`` / ``current_stream`` / ``default_stream`` / ``empty_cache`` and the
  device RNG state that activation recompute saves; megatron's RNG tracker is replaced with
  :class:`CpuRNGStatesTracker`.
* ``active()``: a context manager that maps ``device="cuda"`` to the CPU, makes
  ``Tensor.cuda()`` a no-op and reports CPU tensor types with their CUDA names, for the
  duration of one megatron call. A no-op on a CUDA machine.

It is pinned to the megatron-core versions it was checked against and fails loudly
on any other version, because every bridged line is version specific.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON_VERSIONS = ("0.16.1",)


class BridgeError(RuntimeError):
    """megatron-core is at a version this bridge was not checked against."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _megatron_version() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core
    return megatron.core.__version__


def check_version() -> None:
    version = _megatron_version()
    if version not in SUPPORTED_MEGATRON_VERSIONS:
        raise BridgeError(
            f"executor/cuda_bridge.py was checked with megatron-core "
            f"{', '.join(SUPPORTED_MEGATRON_VERSIONS)} only; found {version}. Its CPU bridge "
            f"patches version-specific lines: check them (see FEASIBILITY.md) before adding "
            f"this version, or run on a CUDA machine."
        )


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CpuForCudaMode(TorchFunctionMode):
    """Runs megatron's CUDA-device requests on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")) or isinstance(kwargs.get("device"), int):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if (
            func is torch.Tensor.to
            and len(args) > 1
            and (_is_cuda_device(args[1]) or isinstance(args[1], int))
        ):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """megatron's named RNG states, kept as CPU generator states.

    ``fork(name)`` swaps the process's CPU RNG state for the named one and back, which is
    what megatron's CUDA tracker does with the device generator.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _NullStream:
    def wait_stream(self, _other: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Install the process-wide stubs (no-op with CUDA, idempotent)."""
    global _installed
    if cuda_available():
        return
    with _install_lock:
        if _installed:
            return
        check_version()
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_stream = lambda *a, **k: _NullStream()
        torch.cuda.default_stream = lambda *a, **k: _NullStream()
        torch.cuda.empty_cache = lambda: None
        _bridge_checkpoint_rng()
        _installed = True


def _bridge_checkpoint_rng() -> None:
    """Activation recompute (``tensor_parallel.checkpoint``, random.py:447,456) saves and
    restores the device RNG state around the recomputed forward; on the CPU that state is
    the CPU generator's, which the checkpoint already saves (and the tracker's states with
    it), so the device half is nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None


def new_rng_tracker() -> Any:
    """A fresh megatron RNG tracker of the right kind for this machine."""
    from megatron.core.tensor_parallel import random as mrandom

    if cuda_available():
        return mrandom.CudaRNGStatesTracker()
    install()
    return CpuRNGStatesTracker()


def seed_tracker(tracker: Any, seed: int, tp_rank: int) -> None:
    """megatron's ``model_parallel_cuda_manual_seed`` for one tracker (same offsets)."""
    tracker.reset()
    if cuda_available():
        torch.cuda.manual_seed(seed)
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
    tracker.add("data-parallel-rng", seed)
    tracker.add("expert-parallel-rng", seed + 1024 + tp_rank)  # ep_rank 0, etp = tp


def use_rng_tracker(tracker: Any) -> None:
    """Make `tracker` the one megatron's ``get_cuda_rng_tracker()`` returns."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def current_rng_tracker() -> Any:
    from megatron.core.tensor_parallel import random as mrandom

    return mrandom._CUDA_RNG_STATE_TRACKER


@contextlib.contextmanager
def active() -> Iterator[None]:
    """Run the enclosed megatron calls on the CPU (a no-op on a CUDA machine)."""
    if cuda_available():
        yield
        return
    install()
    with _CpuForCudaMode():
        yield


def device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if cuda_available()
        else torch.device("cpu")
    )
