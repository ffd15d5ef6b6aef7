"""OperatorBreaker: the circuit breaker of one operator, a pure state machine in caller's time.

closed -> open: over the last `window_s` seconds, at least `min_calls` calls were made and at
    least `failure_ratio` of their messages failed for now (a timeout fails every message of
    its call); or `consecutive_failures` calls in a row failed (a call fails when it times
    out or `failure_ratio` of its messages failed: an operator that is plainly down opens its
    breaker in a few calls, not once its failures outweigh the window's earlier successes);
    or `consecutive_timeouts` calls in a row timed out (fewer: each costs an attempt timeout).
open -> half-open: after the cool-down (`cool_down_s`, doubled after each failed probe, at
    most `max_cool_down_s`).
half-open: at most `probe_batches` calls of at most `probe_size` messages in flight; when
    `probe_batches` probes succeeded in a row -> closed (the window forgets the outage); a
    failed probe -> open again.

Every method takes `now` (a monotonic clock, seconds), so tests drive it in virtual time. A
call's result counts for the state only if the call began in the breaker's current state: a
call that began while closed and ends after the breaker opened is counted in the figures, but
cannot open it again or close it.

held open: `hold_open` (an operator drained by hand, from the ops console) opens the breaker
    and keeps it open whatever time passes or calls report, until `release`, which lets it
    probe its way back (half-open) as after a cool-down.
"""

from __future__ import annotations

import enum
import math
from collections import deque

import msgspec


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    window_s: float = 10.0
    buckets: int = 10  # the window slides by window_s / buckets
    min_calls: int = 5
    failure_ratio: float = 0.5
    consecutive_failures: int = 5
    consecutive_timeouts: int = 3
    cool_down_s: float = 2.0
    max_cool_down_s: float = 10.0
    probe_batches: int = 2
    probe_size: int = 10

    def __post_init__(self) -> None:
        if not (
            self.window_s > 0
            and self.buckets >= 1
            and self.min_calls >= 1
            and 0.0 < self.failure_ratio <= 1.0
            and self.consecutive_timeouts >= 1
            and self.consecutive_failures >= 1
            and 0 < self.cool_down_s <= self.max_cool_down_s
            and self.probe_batches >= 1
            and self.probe_size >= 1
        ):
            raise ValueError(f"not a usable breaker policy: {self}")


class Call(msgspec.Struct):
    """One call through the breaker, from `begin` to `end` (or `abandon`)."""

    generation: int
    probe: bool
    size: int
    started: float
    done: bool = False
    # What the call holds of its operator's window, in segments (engine/routing.py's).
    segments: int = 0


class RecentWindow:
    """Calls, messages answered, failures, timeouts and latency over the last `window_s`
    seconds, in `buckets` slices of time."""

    __slots__ = ("_buckets", "_slices", "_width")

    def __init__(self, window_s: float, buckets: int) -> None:
        self._width = window_s / buckets
        self._slices = buckets
        # [slice index, calls, ok, failed, timeouts, latency sum]
        self._buckets: deque[list[float]] = deque()

    def _trim(self, now: float) -> int:
        index = math.floor(now / self._width)
        while self._buckets and self._buckets[0][0] <= index - self._slices:
            self._buckets.popleft()
        return index

    def add(self, now: float, ok: int, failed: int, timed_out: bool, latency: float) -> None:
        index = self._trim(now)
        if not self._buckets or self._buckets[-1][0] < index:
            self._buckets.append([index, 0, 0, 0, 0, 0.0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += ok
        bucket[3] += failed
        bucket[4] += int(timed_out)
        bucket[5] += latency

    def totals(self, now: float) -> tuple[int, int, int, int, float]:
        """(calls, ok, failed, timeouts, latency sum) in the window ending at `now`."""
        self._trim(now)
        calls = ok = failed = timeouts = 0
        latency = 0.0
        for bucket in self._buckets:
            calls += int(bucket[1])
            ok += int(bucket[2])
            failed += int(bucket[3])
            timeouts += int(bucket[4])
            latency += bucket[5]
        return calls, ok, failed, timeouts, latency

    def clear(self) -> None:
        self._buckets.clear()


class OperatorBreaker:
    """See the module docstring. Not thread-safe; one per operator, owned by its pool."""

    def __init__(self, policy: BreakerPolicy, now: float) -> None:
        self.policy = policy
        self.state = BreakerState.CLOSED
        self.since = now
        self.generation = 0
        self.recent = RecentWindow(policy.window_s, policy.buckets)
        self.timeouts_in_a_row = 0
        self.failures_in_a_row = 0
        self.probes_in_flight = 0
        self.probes_passed = 0
        self.cool_down = policy.cool_down_s
        self.opens = 0
        self.last_opened: float | None = None
        self.last_reason: str | None = None
        self.held: str | None = None  # why it is held open (`hold_open`), until `release`

    # --- transitions --------------------------------------------------------------------

    def _move(self, state: BreakerState, now: float) -> None:
        self.state = state
        self.since = now
        self.generation += 1
        self.timeouts_in_a_row = 0
        self.failures_in_a_row = 0
        self.probes_in_flight = 0
        self.probes_passed = 0

    def _open(self, now: float, reason: str, *, after_probe: bool) -> None:
        if after_probe:
            self.cool_down = min(self.policy.max_cool_down_s, 2 * self.cool_down)
        else:
            self.cool_down = self.policy.cool_down_s
        self.opens += 1
        self.last_opened = now
        self.last_reason = reason
        self._move(BreakerState.OPEN, now)

    def hold_open(self, now: float, reason: str) -> None:
        """Open now and stay open until `release`, whatever the time or the calls' results.
        Calls in flight end as calls that began in an earlier state: figures only."""
        self.held = reason
        self._move(BreakerState.OPEN, now)

    def release(self, now: float) -> bool:
        """End a `hold_open`: half-open at once, so probes show whether the operator answers
        before it takes a full share again. False (and nothing changes) when not held."""
        if self.held is None:
            return False
        self.held = None
        self.cool_down = self.policy.cool_down_s
        self._move(BreakerState.HALF_OPEN, now)
        return True

    def poll(self, now: float) -> BreakerState:
        """The state at `now`: an open breaker whose cool-down is over becomes half-open
        (unless it is held open)."""
        if (
            self.state is BreakerState.OPEN
            and self.held is None
            and now >= self.since + self.cool_down
        ):
            self._move(BreakerState.HALF_OPEN, now)
        return self.state

    def reopens_at(self) -> float | None:
        """When an open breaker becomes half-open; None in the other states and while held."""
        if self.state is not BreakerState.OPEN or self.held is not None:
            return None
        return self.since + self.cool_down

    # --- calls --------------------------------------------------------------------------

    def allowance(self, now: float) -> int:
        """How many messages one call may carry now: 0 when no call may begin."""
        match self.poll(now):
            case BreakerState.CLOSED:
                return 1 << 30
            case BreakerState.OPEN:
                return 0
            case BreakerState.HALF_OPEN:
                free = self.probes_in_flight + self.probes_passed < self.policy.probe_batches
                return self.policy.probe_size if free else 0

    def begin(self, now: float, size: int) -> Call:
        """A call of `size` messages begins; only when `allowance(now) >= size`."""
        allowed = self.allowance(now)
        if not 1 <= size <= allowed:
            raise ValueError(f"a call of {size} messages when {allowed} are allowed")
        probe = self.state is BreakerState.HALF_OPEN
        if probe:
            self.probes_in_flight += 1
        return Call(self.generation, probe, size, now)

    def abandon(self, call: Call) -> None:
        """The call ended without a result (cancelled): it frees its probe slot, nothing else."""
        if call.done:
            return
        call.done = True
        if call.probe and call.generation == self.generation:
            self.probes_in_flight -= 1

    def end(self, call: Call, now: float, *, ok: int, failed: int, timed_out: bool) -> None:
        """Record a call's result: `ok` messages answered (sent or refused for good), `failed`
        failed for now; `timed_out`: no answer at all (every message counts as failed)."""
        if call.done:
            return
        call.done = True
        if timed_out:
            ok, failed = 0, call.size
        self.recent.add(now, ok, failed, timed_out, max(0.0, now - call.started))
        if call.generation != self.generation:
            return  # began in an earlier state: figures only
        bad = timed_out or failed >= self.policy.failure_ratio * max(1, ok + failed)
        if call.probe:
            self.probes_in_flight -= 1
            if bad:
                reason = "probe timed out" if timed_out else "probe failed"
                self._open(now, reason, after_probe=True)
                return
            self.probes_passed += 1
            if self.probes_passed >= self.policy.probe_batches:
                self.cool_down = self.policy.cool_down_s
                self.recent.clear()
                self._move(BreakerState.CLOSED, now)
            return
        if self.state is not BreakerState.CLOSED:
            return
        self.timeouts_in_a_row = self.timeouts_in_a_row + 1 if timed_out else 0
        self.failures_in_a_row = self.failures_in_a_row + 1 if bad else 0
        if self.timeouts_in_a_row >= self.policy.consecutive_timeouts:
            self._open(now, f"{self.timeouts_in_a_row} timeouts in a row", after_probe=False)
            return
        if self.failures_in_a_row >= self.policy.consecutive_failures:
            self._open(now, f"{self.failures_in_a_row} failed calls in a row", after_probe=False)
            return
        calls, good, bad_messages, _, _ = self.recent.totals(now)
        answered = good + bad_messages
        if (
            calls >= self.policy.min_calls
            and answered > 0
            and bad_messages >= self.policy.failure_ratio * answered
        ):
            self._open(
                now,
                f"{bad_messages} of {answered} messages failed in {calls} calls",
                after_probe=False,
            )

    # --- figures ------------------------------------------------------------------------

    def stats(self, now: float) -> dict[str, object]:
        state = self.poll(now)
        calls, ok, failed, timeouts, latency = self.recent.totals(now)
        answered = ok + failed
        return {
            "state": str(state),
            "state_for_s": round(now - self.since, 3),
            "held_open": self.held,
            "opens": self.opens,
            "last_opened_ago_s": None
            if self.last_opened is None
            else round(now - self.last_opened, 3),
            "last_open_reason": self.last_reason,
            "cool_down_s": self.cool_down,
            "recent_calls": calls,
            "recent_error_ratio": round(failed / answered, 4) if answered else 0.0,
            "recent_timeouts": timeouts,
            "recent_latency_ms": round(1000 * latency / calls, 3) if calls else None,
            "timeouts_in_a_row": self.timeouts_in_a_row,
            "failures_in_a_row": self.failures_in_a_row,
            "probes_in_flight": self.probes_in_flight,
        }
