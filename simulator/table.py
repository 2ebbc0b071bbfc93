"""Validated numeric tables of a profile file and piecewise-linear lookups over them
(shared by hybridflow.simulator.profile and hybridflow.simulator.calls)."""

from __future__ import annotations

import bisect
import math
from typing import Any

from hybridflow.errors import UserError


class ProfileError(UserError):
    """A profile name or file that cannot be used."""


def num(where: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool):
        raise ProfileError(f"{where}: expected a number, got {value!r}")
    try:
        x = float(value)  # PyYAML reads 3e12 (no exponent sign) as a string
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond a float
        raise ProfileError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ProfileError(f"{where}: must be {'positive' if positive else '>= 0'}, got {value!r}")
    return x


def positive_int(where: str, value: Any, high: int = 2**20) -> int:
    """A positive integer up to `high` (default 2**20: more devices or cores than any host)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProfileError(f"{where}: expected a positive integer, got {value!r}")
    if value > high:
        raise ProfileError(f"{where}: must be at most {high:,}, got {value!r}")
    return value


def in_range(where: str, x: float, low: float, high: float, why: str) -> float:
    """`x` unless it lies outside [low, high]: a number no device has (`why` says which)."""
    if not low <= x <= high:
        raise ProfileError(f"{where}: must be in [{low:g}, {high:g}] ({why}), got {x:g}")
    return x


def rows(where: str, value: Any, keys: tuple[str, ...]) -> tuple[tuple[float, ...], ...]:
    """A list of {key: number} rows -> sorted tuple of tuples in `keys` order."""
    if not isinstance(value, list) or not value:
        raise ProfileError(f"{where}: expected a non-empty list of {{{', '.join(keys)}}} rows")
    out = []
    for i, row in enumerate(value):
        if not isinstance(row, dict) or set(row) != set(keys):
            raise ProfileError(
                f"{where}[{i}]: expected exactly the keys {', '.join(keys)}, got {row!r}"
            )
        out.append(tuple(num(f"{where}[{i}].{k}", row[k]) for k in keys))
    return tuple(sorted(out))


def interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear y(x) through sorted (x, y) points. Below the first point y stays at
    its value (a latency floor); beyond the last it grows in proportion to x."""
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        return points[-1][1] * x / xs[-1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def interpolate_linear(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear y(x) through sorted (x, y) points, held at the first point's value
    below it and continued along the last segment's (non-negative) slope beyond the last:
    a fixed per-call cost plus a per-item one."""
    if len(points) < 2 or x <= points[-1][0]:
        return interpolate(points, x) if x <= points[-1][0] else points[-1][1]
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (x - x1)
