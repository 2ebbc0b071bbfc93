"""The executor's RLWorker with a clock on its own work, for `hybridflow profile`.

Each ``profile_*`` method runs the RLWorker method the controller calls in a run
(``response_outputs``, ``update``, ``generate``) unchanged, and keeps how long this rank
spent in it (and in its parts: the optimizer step; resharding, vLLM and the micro-DP gather
of a generation). The controller reads them with ``take_seconds``; a call's wall time at the
controller minus its slowest rank's own time is the single controller's dispatch cost.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.controller.protocols import GENERATE, MEGATRON_3D, ONE_TO_ALL, register
from hybridflow.executor.engines.vllm_engine import VllmConfig, VllmEngine
from hybridflow.executor.rl.worker import RLWorker


def _timed(log: dict[str, float], key: str, fn: Callable) -> Callable:
    """`fn` adding its seconds to log[key] at each call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            log[key] = log.get(key, 0.0) + time.perf_counter() - t0

    return wrapper


def _clock_method(obj: object, name: str, log: dict[str, float], key: str) -> None:
    """Replace obj's method `name`, on obj only, by the same method timed into log[key]
    (setattr: mypy forbids assigning to a method)."""
    setattr(obj, name, _timed(log, key, getattr(obj, name)))


_CLOCKED = "_hybridflow_profile_clocked"
PRELOAD = (
    "hybridflow.executor.engines.train_engine",
    "hybridflow.executor.engines.megatron_model",
    "hybridflow.executor.hybrid_engine.engine",
    "hybridflow.executor.engines.vllm_engine",
    "vllm",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.worker.cpu_model_runner",
    "vllm.v1.core.sched.scheduler",
    "vllm.model_executor.models.llama",
)


class ProfileWorker(RLWorker):
    """One rank of a profiling worker group (see hybridflow.executor.profiler.calls)."""

    def __init__(self, rank: int, world_size: int, group_name: str = "group") -> None:
        super().__init__(rank, world_size, group_name)
        self._parts: dict[str, float] = {}  # the current call's parts
        self._calls: list[dict[str, float]] = []
        self._engine: tuple[VllmConfig, VllmEngine] | None = None  # the engine alive

    def _clock(self, role: str) -> None:
        """Put clocks on the parts of `role`'s engines (once per engine object: a vLLM
        engine is shared by the roles of one generation TP grouping)."""
        opt = self.role(role).engine.optimizer
        if opt is not None and not getattr(opt, _CLOCKED, False):
            opt.step = _timed(self._parts, "optimizer_s", opt.step)
            setattr(opt, _CLOCKED, True)
        he = self.rollout.get(role)
        if he is not None and not getattr(he, _CLOCKED, False):
            _clock_method(he, "to_generation", self._parts, "reshard_s")
            _clock_method(he, "to_training", self._parts, "reshard_s")
            _clock_method(he, "generate", self._parts, "generate_s")
            setattr(he, _CLOCKED, True)
            if he.engine is not None and not getattr(he.engine, _CLOCKED, False):
                _clock_method(he.engine, "generate", self._parts, "vllm_s")
                setattr(he.engine, _CLOCKED, True)

    def _run(self, role: str, fn: Callable, *args: Any) -> Any:
        self._clock(role)
        self._parts.clear()
        t0 = time.perf_counter()
        out = fn(role, *args)
        self._calls.append({"seconds": time.perf_counter() - t0, **self._parts})
        return out

    @register(dispatch_mode=MEGATRON_3D)
    def profile_outputs(self, role: str, batch: Batch, key: str) -> Batch | None:
        return self._run(role, self.response_outputs, batch, key)

    @register(dispatch_mode=MEGATRON_3D)
    def profile_update(
        self, role: str, batch: Batch, loss_fn: Any, mini_batches: int, epochs: int
    ) -> Batch | None:
        return self._run(role, self.update, batch, loss_fn, mini_batches, epochs)

    @register(dispatch_mode=GENERATE)
    def profile_generate(self, role: str, prompts: Batch, sampling: Any) -> Batch:
        return self._run(role, self.generate, prompts, sampling)

    @register(dispatch_mode=ONE_TO_ALL)
    def take_seconds(self, role: str | None = None) -> list[dict[str, float]]:
        """This rank's calls since the last take: seconds and parts of each."""
        out, self._calls = self._calls, []
        return out

    def new_engine(self, config: VllmConfig) -> VllmEngine:
        """RLWorker.new_engine, reusing the vLLM engine of an earlier role when its settings
        (generation TP groups included) are the same: starting vLLM is most of a generation
        layout's profiling time. One engine lives at a time (vLLM's parallel groups are per
        process)."""
        if self._engine is None or self._engine[0] != config:
            self.close_engine()
            self._engine = (config, super().new_engine(config))
        return self._engine[1]

    @register(dispatch_mode=ONE_TO_ALL)
    def drop_role(self, role: str) -> None:
        """Forget a measured role (model, optimizer, 3D-HybridEngine; a vLLM engine stays
        for the next role), so that the process holds about what a run's does: resharding
        ends with a garbage collection whose time grows with the objects alive."""
        self.rollout.pop(role, None)
        self.roles.pop(role)
        gc.collect()

    @register(dispatch_mode=ONE_TO_ALL)
    def drop_roles(self, role: str | None = None) -> None:
        """Forget every role (what a worker group of this process built)."""
        for name in list(self.roles):
            self.drop_role(name)

    @register(dispatch_mode=ONE_TO_ALL)
    def preload(self, role: str | None = None) -> None:
        """Import what the measurements use (megatron-core, vLLM and the modules its engine
        imports when it first starts), so that no measured layout pays for it."""
        import importlib

        for name in PRELOAD:
            importlib.import_module(name)

    @register(dispatch_mode=ONE_TO_ALL)
    def close_engine(self, role: str | None = None) -> None:
        """Shut the live vLLM engine down, so that one with other groups can start."""
        if self._engine is not None:
            self._engine[1].shutdown()
            self._engine = None
