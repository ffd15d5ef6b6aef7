"""The engine's fixed-bucket histogram."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smsgw.engine.histogram import Histogram


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
