"""Response lengths: a fixed length, a mean and a maximum, or an explicit distribution.

Generation runs in waves of the sequences that fit in the KV cache at once; a wave lasts as
long as its longest response (stragglers), so generation follows the expected maximum of a
wave. Training and inference follow the tokens really produced (the mean).

With only a mean and a maximum M the lengths follow F(x) = (x/M)^a, a = mean/(M - mean):
mean below M/2 gives a long tail of rare long responses, above M/2 most responses run long.
Its expected maximum of n responses is M·a·n/(a·n + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybridflow.errors import UserError


class LengthError(UserError):
    """Response lengths that cannot exist."""


@dataclass(frozen=True)
class ResponseLengths:
    max: int
    mean: float = 0.0  # 0: every response is `max` long
    points: tuple[tuple[int, float], ...] = ()  # explicit (length, weight); overrides mean

    def __post_init__(self) -> None:
        if isinstance(self.max, bool) or not isinstance(self.max, int) or self.max <= 0:
            raise LengthError(f"response length must be a positive integer, got {self.max!r}")
        if self.points:
            self._check_points()
            total = sum(w for _, w in self.points)
            object.__setattr__(self, "mean", sum(n * w for n, w in self.points) / total)
            return
        if self.mean == 0:
            object.__setattr__(self, "mean", float(self.max))
        if (
            isinstance(self.mean, bool)
            or not isinstance(self.mean, (int, float))
            or not 1 <= self.mean <= self.max
        ):
            raise LengthError(
                f"mean response length must be between 1 and the maximum "
                f"{self.max}, got {self.mean!r}"
            )
        object.__setattr__(self, "mean", float(self.mean))

    def _check_points(self) -> None:
        for p in self.points:
            ok = (
                isinstance(p, (tuple, list))
                and len(p) == 2
                and isinstance(p[0], int)
                and not isinstance(p[0], bool)
                and isinstance(p[1], (int, float))
                and not isinstance(p[1], bool)
            )
            if not ok or not 1 <= p[0] <= self.max or not (p[1] >= 0 and math.isfinite(p[1])):
                raise LengthError(
                    f"response length distribution: each entry must be "
                    f"[length 1..{self.max}, weight >= 0], got {p!r}"
                )
        if len({n for n, _ in self.points}) != len(self.points):
            raise LengthError("response length distribution: a length is listed twice")
        if sum(w for _, w in self.points) <= 0:
            raise LengthError("response length distribution: the weights sum to zero")
        object.__setattr__(
            self, "points", tuple(sorted((int(n), float(w)) for n, w in self.points))
        )

    @property
    def spread(self) -> bool:
        return self.mean < self.max

    @property
    def _shape(self) -> float:
        return self.mean / (self.max - self.mean)

    def expected_max(self, n: float) -> float:
        """Expected longest of `n` responses (the length of a wave of n sequences)."""
        if n <= 0:
            return 0.0
        if self.points:
            total, cdf, prev, out = sum(w for _, w in self.points), 0.0, 0.0, 0.0
            for length, w in self.points:
                cdf += w / total
                out += length * (min(cdf, 1.0) ** n - prev**n)
                prev = min(cdf, 1.0)
            return out
        if not self.spread:
            return float(self.max)
        an = self._shape * n
        return self.max * an / (an + 1.0)

    @property
    def mean_square(self) -> float:
        """E[length^2]: the attention context of decoding grows with each response's square."""
        if self.points:
            total = sum(w for _, w in self.points)
            return sum(n * n * w for n, w in self.points) / total
        if not self.spread:
            return float(self.max) ** 2
        a = self._shape
        return self.max**2 * a / (a + 2.0)

    def to_dict(self) -> dict:
        """Job-JSON keys beyond response_len (none when there is no spread)."""
        if self.points:
            return {"response_dist": [[n, w] for n, w in self.points]}
        return {"response_mean": self.mean} if self.spread else {}
