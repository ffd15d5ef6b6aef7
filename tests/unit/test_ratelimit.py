"""TokenBucket and RateLimiter on a virtual clock: the time is an argument."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smsgw.engine.ratelimit import RateLimiter, RecipientLimiter, TokenBucket


def test_a_full_bucket_allows_a_burst_then_refuses() -> None:
    bucket = TokenBucket.start(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    # Empty: the next token is 1/rate seconds away.
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)  # refilled half a token meanwhile
    assert bucket.take(0.1) == 0.0


def test_refill_stops_at_the_burst() -> None:
    bucket = TokenBucket.start(rate=100, burst=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert bucket.full(1_000.0)
    assert [bucket.take(1_000.0) for _ in range(4)][-1] > 0  # only 3 again, not 100,000


def test_a_clock_going_backwards_does_not_mint_tokens() -> None:
    bucket = TokenBucket.start(rate=1, burst=1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) > 0  # earlier than the last refill: nothing added
    assert bucket.take(11.0) == 0.0


def test_wrong_figures_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket.start(rate=0, burst=1, now=0.0)
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=0)


@given(
    rate=st.floats(0.5, 1_000),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket.start(rate, burst, now=0.0)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        assert wait >= 0
        if wait == 0:
            allowed += 1
        else:
            # The wait it announces is enough, and not more than one token's worth.
            assert wait <= 1 / rate + 1e-9
            assert bucket.take(now + wait + 1e-9) == 0.0
            allowed += 1
            now += wait + 1e-9
    assert allowed <= burst + rate * now + 1e-6


@given(
    shares=st.lists(st.floats(0.2, 0.5), min_size=8, max_size=40),
    per_tick=st.integers(20, 60),
)
def test_a_share_that_moves_every_tick_admits_no_more_than_its_mean(
    shares: list[float], per_tick: int
) -> None:
    """A node's share of an account's rate (engine/shares.py) changes every 0.25 s tick; under
    a steady overload, what the bucket lets through is the share's rate over the time, plus
    one burst, whichever way the share moves."""
    rate, tick = 50.0, 0.25
    limiter: RateLimiter[int] = RateLimiter(rate=1_000, burst=2_000)
    allowed, now = 0, 0.0
    for share in shares:
        here = rate * share
        for i in range(per_tick):
            if limiter.take(1, now + tick * i / per_tick, rate=here, burst=max(1.0, 2 * here)):
                continue
            allowed += 1
        now += tick
    assert allowed <= sum(rate * s * tick for s in shares) + 2 * rate * 0.5 + 1


def test_limiter_keeps_one_bucket_per_key() -> None:
    limiter: RateLimiter[int] = RateLimiter(rate=1, burst=2)
    assert limiter.take(1, 0.0) == 0.0
    assert limiter.take(1, 0.0) == 0.0
    assert limiter.take(1, 0.0) == pytest.approx(1.0)
    assert limiter.take(2, 0.0) == 0.0  # another account is not affected
    assert limiter.limited == 1


def test_limiter_forgets_idle_keys_past_its_size() -> None:
    limiter: RateLimiter[int] = RateLimiter(rate=1, burst=1, max_keys=10)
    for key in range(10):
        limiter.take(key, 0.0)
    assert len(limiter) == 10
    # Ten seconds on, every bucket has refilled: a new key makes room by dropping them.
    limiter.take(99, 10.0)
    assert len(limiter) == 1
    # A key dropped while full starts full again: forgetting it changed nothing.
    assert limiter.take(3, 10.0) == 0.0


def test_limiter_keeps_busy_keys_and_does_not_rescan_each_time() -> None:
    limiter: RateLimiter[int] = RateLimiter(rate=1, burst=1, max_keys=4)
    for key in range(4):
        limiter.take(key, 0.0)  # all empty now: none may be dropped
    limiter.take(4, 0.0)
    assert len(limiter) == 5
    # The empty buckets still refuse: their limit survived the growth.
    assert limiter.take(0, 0.0) > 0


def test_recipient_limit_allows_the_limit_an_hour_per_account_and_number() -> None:
    limiter = RecipientLimiter(3)
    assert [limiter.take(1, "+1", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(1, "+1", 0.0) == pytest.approx(1200.0)  # a token every 20 minutes
    assert limiter.take(1, "+2", 0.0) == 0.0  # another number
    assert limiter.take(2, "+1", 0.0) == 0.0  # another account
    assert limiter.take(1, "+1", 1200.0) == 0.0
    # A higher limit for the account adds its difference; what was spent stays spent.
    assert limiter.take(1, "+1", 1200.0, limit=5) == 0.0
    assert limiter.take(1, "+1", 1200.0, limit=5) == 0.0
    assert limiter.take(1, "+1", 1200.0, limit=5) > 0


def test_recipient_limit_memory_is_bounded_and_forgets_the_least_spent_first() -> None:
    limiter = RecipientLimiter(20, max_keys=100)
    for n in range(99):
        limiter.take(1, f"+{n}", 0.0)  # one message each
    for _ in range(10):
        limiter.take(1, "+busy", 0.0)
    for n in range(1_000):
        limiter.take(2, f"+{n}", 0.0)
        assert len(limiter) <= 100
    # The busy number kept its count: its bucket spent the most.
    for _ in range(10):
        assert limiter.take(1, "+busy", 0.0) == 0.0
    assert limiter.take(1, "+busy", 0.0) > 0


def test_a_bucket_says_when_it_has_a_token_without_spending_one() -> None:
    bucket = TokenBucket.start(rate=2, burst=1, now=0.0)
    assert bucket.wait(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert bucket.wait(0.5) == 0.0 and bucket.take(0.5) == 0.0


def test_buckets_are_not_tracked_by_the_garbage_collector() -> None:
    # A node keeps up to 200,000 recipient buckets; full collections must not walk them.
    import gc

    assert not gc.is_tracked(TokenBucket.start(rate=1, burst=1, now=0.0))


def test_a_recipient_token_given_back_can_be_taken_again() -> None:
    limiter = RecipientLimiter(2)
    assert limiter.take(1, "+1", 0.0) == limiter.take(1, "+1", 0.0) == 0.0
    assert limiter.take(1, "+1", 0.0) > 0
    limiter.give_back(1, "+1")  # the message was refused for another reason
    assert limiter.take(1, "+1", 0.0) == 0.0
    assert limiter.take(1, "+1", 0.0) > 0


def test_recipient_pairs_are_not_tracked_by_the_garbage_collector() -> None:
    # Up to 200,000 pairs; a full collection must not walk them.
    import gc

    limiter = RecipientLimiter(20)
    for n in range(100):
        limiter.take(n % 3, f"+{n}", 0.0, limit=20 + n % 2)
    assert not any(gc.is_tracked(pairs) for pairs in limiter._full_at.values())
