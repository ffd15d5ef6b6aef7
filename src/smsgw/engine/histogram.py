"""Histograms: fixed buckets for the engine's latency and size figures, read at scrape time;
log buckets 1% wide for the durations the simulator and the load generator report, which no
fixed bounds fit."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

# Seconds, for request and commit latencies: 0.5 ms to 10 s.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Seconds, from accept to the operator's answer: retries back off for up to a minute.
DELIVERY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
# Items in one group commit.
GROUP_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000)


class Histogram:
    """Counts of observations at or below each bound (Prometheus `le` buckets, not cumulative
    here), their sum and count. `observe` is a bisect and two additions: cheap enough for the
    hot path. Plain Python, so the engine needs no metrics library; the HTTP layer's /metrics
    collector reads `cumulative()` at scrape time."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bounds must be strictly increasing, not {bounds!r}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, count)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile (an over-estimate by at most
        one bucket); None before any observation, inf past the last bound."""
        if self.count == 0:
            return None
        rank = q * self.count
        for bound, running in self.cumulative():
            if running >= rank:
                return bound
        return float("inf")  # pragma: no cover - the last cumulative count is `count`

    def summary(self) -> dict[str, Any]:
        """For status pages (JSON): count, mean and bucket-bound p50/p99."""
        if self.count == 0:
            return {"count": 0}

        def bound(q: float) -> float | None:
            value = self.quantile(q)
            return None if value is None or value == float("inf") else value

        return {
            "count": self.count,
            "mean": round(self.sum / self.count, 6),
            "p50_le": bound(0.5),
            "p99_le": bound(0.99),
        }


class LogHistogram:
    """Durations in log buckets 1% wide, with weights (a cohort of n messages adds n at
    once): constant memory for any number of samples, deterministic, and quantiles within 1%
    (each the upper edge of its bucket, never above the exact `max_s`). Durations at or below
    FLOOR_S share the first bucket."""

    FLOOR_S = 1e-5
    _GROWTH = math.log(1.01)

    __slots__ = ("buckets", "count", "max_s", "total_s")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float, n: int = 1) -> None:
        """Count `n` durations of `seconds`."""
        index = (
            int(math.log(seconds / self.FLOOR_S) / self._GROWTH) + 1
            if seconds > self.FLOOR_S
            else 0
        )
        self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += n
        self.total_s += seconds * n
        if seconds > self.max_s:
            self.max_s = seconds

    def _edge(self, index: int) -> float:
        return min(self.FLOOR_S * math.exp(index * self._GROWTH), self.max_s)

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket that holds the q-quantile (nearest rank), in seconds;
        0.0 before any duration."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return self._edge(index)
        return self.max_s

    def share_within(self, seconds: float) -> float:
        """The fraction of the weight at or below `seconds` (bucket resolution); 1.0 empty."""
        if self.count == 0:
            return 1.0
        inside = sum(n for i, n in self.buckets.items() if self._edge(i) <= seconds)
        return inside / self.count

    def cdf(self, points: int = 60) -> list[tuple[float, float]]:
        """(seconds, fraction at or below) at up to `points` bucket edges, for plotting."""
        if self.count == 0:
            return []
        indexes = sorted(self.buckets)
        step = max(1, len(indexes) // points)
        out: list[tuple[float, float]] = []
        seen = 0
        for k, index in enumerate(indexes):
            seen += self.buckets[index]
            if k % step == 0 or k == len(indexes) - 1:
                out.append((round(self._edge(index), 6), round(seen / self.count, 6)))
        return out
