"""Fixed-bucket histograms: the engine's latency and size figures, read at scrape time."""

from __future__ import annotations

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
