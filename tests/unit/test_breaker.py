"""OperatorBreaker in virtual time: each transition, and a Hypothesis state machine against a
model of the rules."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from smsgw.engine.breaker import BreakerPolicy, BreakerState, Call, OperatorBreaker

POLICY = BreakerPolicy(
    window_s=10.0,
    buckets=10,
    min_calls=4,
    failure_ratio=0.5,
    consecutive_failures=10,
    consecutive_timeouts=3,
    cool_down_s=2.0,
    max_cool_down_s=8.0,
    probe_batches=2,
    probe_size=5,
)


def call(b: OperatorBreaker, now: float, *, ok: int = 0, failed: int = 0, timeout: bool = False):
    c = b.begin(now, max(1, ok + failed))
    b.end(c, now, ok=ok, failed=failed, timed_out=timeout)


def opened(now: float = 0.0) -> OperatorBreaker:
    b = OperatorBreaker(POLICY, now)
    for _ in range(4):
        call(b, now, failed=10)
    assert b.state is BreakerState.OPEN
    return b


def test_a_failure_ratio_opens_only_past_the_minimum_of_calls() -> None:
    b = OperatorBreaker(POLICY, 0.0)
    for _ in range(3):
        call(b, 0.0, failed=10)
    assert b.state is BreakerState.CLOSED  # 3 calls < min_calls
    call(b, 0.0, failed=10)
    assert b.state is BreakerState.OPEN and b.opens == 1
    assert b.allowance(0.1) == 0


def test_a_low_failure_ratio_keeps_it_closed() -> None:
    b = OperatorBreaker(POLICY, 0.0)
    for i in range(50):
        call(b, i * 0.1, ok=9, failed=1)
    assert b.state is BreakerState.CLOSED


def test_old_failures_slide_out_of_the_window() -> None:
    b = OperatorBreaker(POLICY, 0.0)
    for _ in range(3):
        call(b, 0.0, failed=10)
    # 20 s later those three are out of the window: one more failure is one call, not four.
    call(b, 20.0, failed=10)
    assert b.state is BreakerState.CLOSED


def test_failed_calls_in_a_row_open_it_before_the_ratio_would() -> None:
    b = OperatorBreaker(BreakerPolicy(consecutive_failures=5, min_calls=5), 0.0)
    for i in range(100):
        call(b, i * 0.01, ok=10)
    for _ in range(4):
        call(b, 1.0, failed=10)
    call(b, 1.0, ok=1)  # an answered call ends the run
    for _ in range(4):
        call(b, 1.0, failed=10)
    assert b.state is BreakerState.CLOSED  # 80 of 1,081 messages: far below the ratio
    call(b, 1.0, failed=10)
    assert b.state is BreakerState.OPEN and "in a row" in (b.last_reason or "")


def test_consecutive_timeouts_open_it_and_an_answer_resets_the_count() -> None:
    b = OperatorBreaker(
        BreakerPolicy(min_calls=100, consecutive_failures=100, consecutive_timeouts=3), 0.0
    )
    call(b, 0.0, timeout=True)
    call(b, 0.0, timeout=True)
    call(b, 0.0, ok=1)
    call(b, 0.0, timeout=True)
    call(b, 0.0, timeout=True)
    assert b.state is BreakerState.CLOSED
    call(b, 0.0, timeout=True)
    assert b.state is BreakerState.OPEN and "timeouts" in (b.last_reason or "")


def test_cool_down_then_limited_probes_then_closed() -> None:
    b = opened()
    assert b.poll(1.9) is BreakerState.OPEN and b.reopens_at() == 2.0
    assert b.poll(2.0) is BreakerState.HALF_OPEN
    assert b.allowance(2.0) == POLICY.probe_size
    with pytest.raises(ValueError):
        b.begin(2.0, POLICY.probe_size + 1)
    first = b.begin(2.0, 5)
    second = b.begin(2.0, 5)
    assert b.allowance(2.0) == 0  # both probe slots taken
    b.end(first, 2.1, ok=5, failed=0, timed_out=False)
    assert b.state is BreakerState.HALF_OPEN and b.allowance(2.1) == 0
    b.end(second, 2.2, ok=5, failed=0, timed_out=False)
    assert b.state is BreakerState.CLOSED
    # The window forgot the outage: one more failure does not reopen it.
    call(b, 2.3, failed=10)
    assert b.state is BreakerState.CLOSED


def test_a_failed_probe_reopens_with_a_longer_cool_down_up_to_the_cap() -> None:
    b = opened()
    now = 0.0
    cool_downs = []
    for _ in range(4):
        now = b.reopens_at() or now
        assert b.poll(now) is BreakerState.HALF_OPEN
        probe = b.begin(now, 1)
        b.end(probe, now, ok=0, failed=0, timed_out=True)
        assert b.state is BreakerState.OPEN
        cool_downs.append(b.cool_down)
    assert cool_downs == [4.0, 8.0, 8.0, 8.0]
    assert b.opens == 5


def test_a_call_from_before_the_breaker_opened_cannot_move_it() -> None:
    b = OperatorBreaker(POLICY, 0.0)
    late = b.begin(0.0, 10)
    for _ in range(4):
        call(b, 0.0, failed=10)
    assert b.state is BreakerState.OPEN
    b.poll(2.0)
    b.end(late, 2.0, ok=10, failed=0, timed_out=False)  # a success from the closed state
    assert b.state is BreakerState.HALF_OPEN and b.allowance(2.0) == POLICY.probe_size


def test_an_abandoned_probe_frees_its_slot() -> None:
    b = opened()
    b.poll(2.0)
    probes = [b.begin(2.0, 1), b.begin(2.0, 1)]
    assert b.allowance(2.0) == 0
    b.abandon(probes[0])
    b.abandon(probes[0])  # twice is once
    assert b.allowance(2.0) == POLICY.probe_size


class BreakerMachine(RuleBasedStateMachine):
    """Random calls, results, cancellations and time steps; the breaker must agree with a
    model of the rules at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.b = OperatorBreaker(POLICY, 0.0)
        self.calls: list[Call] = []

    @rule(step=st.floats(min_value=0.0, max_value=5.0))
    def advance(self, step: float) -> None:
        before = self.b.state
        reopen = self.b.reopens_at()
        self.now += step
        state = self.b.poll(self.now)
        if before is BreakerState.OPEN:
            assert reopen is not None
            expected = BreakerState.HALF_OPEN if self.now >= reopen else BreakerState.OPEN
            assert state is expected
        else:
            assert state is before  # time alone only ends a cool-down

    @rule(size=st.integers(min_value=1, max_value=20))
    def begin(self, size: int) -> None:
        allowed = self.b.allowance(self.now)
        if size <= allowed:
            self.calls.append(self.b.begin(self.now, size))
        else:
            with pytest.raises(ValueError):
                self.b.begin(self.now, size)

    @precondition(lambda self: bool(self.calls))
    @rule(
        index=st.integers(min_value=0),
        failed_share=st.floats(min_value=0.0, max_value=1.0),
        timed_out=st.booleans(),
        abandon=st.booleans(),
    )
    def end(self, index: int, failed_share: float, timed_out: bool, abandon: bool) -> None:
        c = self.calls.pop(index % len(self.calls))
        state, generation, opens = self.b.state, self.b.generation, self.b.opens
        if abandon:
            self.b.abandon(c)
            assert self.b.state is state
            return
        failed = round(c.size * failed_share)
        self.b.end(c, self.now, ok=c.size - failed, failed=failed, timed_out=timed_out)
        bad = timed_out or failed >= POLICY.failure_ratio * c.size
        if c.generation != generation or state is BreakerState.OPEN:
            assert self.b.state is state  # stale calls and open breakers: figures only
        elif c.probe and bad:
            assert self.b.state is BreakerState.OPEN and self.b.opens == opens + 1
        elif c.probe:
            assert self.b.state in (BreakerState.HALF_OPEN, BreakerState.CLOSED)
        elif not bad and self.b.state is BreakerState.OPEN and c.generation == generation:
            # A good call in the closed state can open it by the window's ratio only.
            _, ok, bad_n, _, _ = self.b.recent.totals(self.now)
            assert bad_n >= POLICY.failure_ratio * (ok + bad_n)

    @invariant()
    def probes_are_bounded(self) -> None:
        if self.b.state is BreakerState.HALF_OPEN:
            assert 0 <= self.b.probes_in_flight <= POLICY.probe_batches
            assert self.b.allowance(self.now) in (0, POLICY.probe_size)
        else:
            assert self.b.probes_in_flight == 0

    @invariant()
    def open_allows_nothing(self) -> None:
        if self.b.state is BreakerState.OPEN:
            assert self.b.allowance(self.now) == 0 or self.b.state is BreakerState.HALF_OPEN
        assert POLICY.cool_down_s <= self.b.cool_down <= POLICY.max_cool_down_s


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
