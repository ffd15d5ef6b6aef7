"""backoff(): full jitter within the exponential bound, reproducible from a seed; when a
message's time is up, and the failure it then gets."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.engine.messages import OutboundSms
from smsgw.engine.retry import RetryPolicy, backoff, expired

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


def _sms(*, deadline: float | None = None, last_reason: str | None = None) -> OutboundSms:
    return OutboundSms(
        id="m1",
        account_id=1,
        to="+4915123456789",
        sender="t",
        text="x",
        segments=1,
        price=5,
        express=deadline is not None,
        created_at=100.0,
        deadline=deadline,
        attempts=2,
        last_reason=last_reason,
    )


def test_a_messages_time_ends_at_its_deadline_else_at_the_end_of_its_validity() -> None:
    policy = RetryPolicy(validity_s=60.0)
    assert policy.ends_at(_sms(deadline=102.0)) == 102.0
    assert policy.ends_at(_sms()) == 160.0
    # No retry would begin past it: an express message's next attempt is at most a quarter
    # of what is left, and none is made once it is gone.
    assert policy.next_delay(_sms(deadline=102.0), 102.0, random.Random(1)) is None
    delay = policy.next_delay(_sms(deadline=102.0), 100.0, random.Random(1))
    assert delay is not None and delay <= 0.5


def test_a_message_out_of_time_fails_with_its_reason_and_no_charge() -> None:
    late = expired(_sms(deadline=102.0, last_reason="timeout"), 103.0, operator="a")
    assert (late.status, late.reason, late.operator, late.attempts) == (
        "failed",
        "deadline_exceeded",
        "a",
        2,
    )
    assert expired(_sms(last_reason="busy"), 200.0).reason == "busy"
    assert expired(_sms(last_reason="busy"), 200.0, reason="throttled").reason == "throttled"
    assert expired(_sms(), 200.0).reason == "no_operator_available"
