"""The fixed-bucket histogram (the engine's figures) and the log-bucket one (durations)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smsgw.engine.histogram import Histogram, LogHistogram


def test_buckets_are_upper_bounds_inclusive() -> None:
    h = Histogram([1, 2, 5])
    for value in (0.5, 1, 1.5, 2, 4, 5, 7):
        h.observe(value)
    assert h.cumulative() == [(1.0, 2), (2.0, 4), (5.0, 6), (math.inf, 7)]
    assert (h.count, h.sum) == (7, pytest.approx(21.0))


def test_quantiles_are_bucket_bounds() -> None:
    h = Histogram([0.01, 0.1, 1])
    assert h.quantile(0.5) is None
    assert h.summary() == {"count": 0}
    for _ in range(98):
        h.observe(0.005)
    h.observe(0.5)
    h.observe(3)
    assert h.quantile(0.5) == 0.01
    assert h.quantile(0.99) == 1.0
    assert h.quantile(1.0) == math.inf
    summary = h.summary()
    assert (summary["count"], summary["p50_le"], summary["p99_le"]) == (100, 0.01, 1.0)


def test_bounds_must_increase() -> None:
    with pytest.raises(ValueError):
        Histogram([2, 1])
    with pytest.raises(ValueError):
        Histogram([])


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=100))
def test_cumulative_counts_everything_once(values: list[float]) -> None:
    h = Histogram([1, 10, 50])
    for v in values:
        h.observe(v)
    cumulative = h.cumulative()
    assert cumulative[-1] == (math.inf, len(values))
    assert [n for _, n in cumulative] == sorted(n for _, n in cumulative)
    for bound, n in cumulative:
        assert n == sum(1 for v in values if v <= bound)


def test_log_quantiles_are_within_one_percent_and_weights_count() -> None:
    h = LogHistogram()
    assert (h.quantile(0.5), h.share_within(1.0), h.cdf()) == (0.0, 1.0, [])
    for ms in range(1, 1001):
        h.add(ms / 1000.0)
    h.add(2.0, n=1000)  # a cohort: as many again, all at 2 s
    assert h.count == 2000 and h.total_s == pytest.approx(500.5 + 2000.0)
    assert h.quantile(0.25) == pytest.approx(0.5, rel=0.01)
    assert h.quantile(0.25) >= 0.5
    assert h.quantile(0.75) == h.max_s == 2.0
    assert h.share_within(1.0) == pytest.approx(0.5, abs=0.01)


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=100))
def test_log_cdf_rises_to_one_and_quantiles_bound_their_share(values: list[float]) -> None:
    h = LogHistogram()
    for v in values:
        h.add(v)
    cdf = h.cdf(points=10)
    assert cdf[-1] == (round(max(values), 6), 1.0)
    assert [x for x, _ in cdf] == sorted(x for x, _ in cdf)
    assert [f for _, f in cdf] == sorted(f for _, f in cdf)
    for q in (0.5, 0.9, 1.0):
        edge = h.quantile(q)
        assert edge <= max(values)
        # The bucket edge is at or above the nearest-rank value, by at most 1% (or the floor).
        exact = sorted(values)[max(1, math.ceil(q * len(values))) - 1]
        assert exact * (1 - 1e-9) <= edge <= max(exact * 1.01, LogHistogram.FLOOR_S) * (1 + 1e-9)
