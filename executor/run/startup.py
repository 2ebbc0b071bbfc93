"""Start-up time of a run, from the process's start to its first iteration, in phases:
``launch`` (interpreter, imports, the plan), ``inputs`` (models, data, rules checked; the
built-in task's artifacts built when not cached), ``ray``, ``workers`` (worker groups,
megatron-core, weights, vLLM) and ``eval`` (held-out scores before the first iteration)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def process_start() -> float:
    """When this process started (epoch seconds); now where psutil cannot say."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # no psutil, or a platform it cannot read: count from now
        return time.time()


@dataclass
class Startup:
    start: float = field(default_factory=process_start)
    phases: dict[str, float] = field(default_factory=dict)
    _last: float = 0.0
    done: bool = False

    def mark(self, phase: str) -> None:
        """`phase` ended now (after the first iteration has begun, nothing is recorded:
        a restart's set-up is not start-up)."""
        if self.done:
            return
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - (self._last or self.start)
        self._last = now

    def finish(self) -> None:
        """The first iteration begins: the last phase ends."""
        self.mark("eval")
        self.done = True

    def to_dict(self) -> dict[str, float]:
        phases = {f"{k}_s": v for k, v in self.phases.items()}
        return {"total_s": sum(self.phases.values()), **phases}
