"""Seconds spent per named piece of work in this process, for the iteration breakdown.

Every registered worker method is timed as ``call:<role>.<method>``; engines add what they
know inside it (``compute:<role>.forward``, ``generate:vllm``, ...). The controller takes
and clears each rank's totals once an iteration (``Worker.take_timers``) and sets them
against its own stage wall times (executor.rl.breakdown).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

_TOTALS: defaultdict[str, float] = defaultdict(float)


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _TOTALS[name] += time.perf_counter() - t0


def add(name: str, seconds: float) -> None:
    _TOTALS[name] += seconds


def take() -> dict[str, float]:
    """The totals since the last take, cleared."""
    out = dict(_TOTALS)
    _TOTALS.clear()
    return out
