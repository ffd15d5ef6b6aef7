"""backoff(): full jitter within the exponential bound, reproducible from a seed."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.engine.retry import backoff

SETTINGS = settings(max_examples=200, deadline=None)

attempts = st.integers(min_value=1, max_value=64)
bases = st.floats(min_value=0.001, max_value=10.0)
caps = st.floats(min_value=0.0, max_value=3_600.0)
seeds = st.integers(min_value=0, max_value=2**32)


@SETTINGS
@given(attempts, bases, caps, seeds)
def test_backoff_is_within_the_capped_exponential_bound(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = backoff(attempt, base=base, cap=cap, rng=random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** (attempt - 1))


@SETTINGS
@given(st.lists(attempts, min_size=1, max_size=20), bases, caps, seeds)
def test_backoff_is_reproducible_from_a_seed(
    sequence: list[int], base: float, cap: float, seed: int
) -> None:
    def delays(rng: random.Random) -> list[float]:
        return [backoff(a, base=base, cap=cap, rng=rng) for a in sequence]

    assert delays(random.Random(seed)) == delays(random.Random(seed))


@SETTINGS
@given(bases, seeds)
def test_a_first_attempt_waits_at_most_base(base: float, seed: int) -> None:
    rng = random.Random(seed)
    assert 0.0 <= backoff(1, base=base, cap=1e9, rng=rng) <= base
    assert 0.0 <= backoff(0, base=base, cap=1e9, rng=rng) <= base


def test_backoff_jitters_over_the_whole_range() -> None:
    # With full jitter, many draws for one attempt spread over [0, bound], not near one value.
    rng = random.Random(1)
    draws = [backoff(4, base=0.5, cap=60.0, rng=rng) for _ in range(2_000)]
    assert max(draws) <= 4.0
    assert min(draws) < 0.4
    assert max(draws) > 3.6


def test_the_cap_bounds_late_attempts() -> None:
    rng = random.Random(7)
    draws = [backoff(30, base=0.5, cap=60.0, rng=rng) for _ in range(2_000)]
    assert max(draws) <= 60.0
    assert max(draws) > 50.0
