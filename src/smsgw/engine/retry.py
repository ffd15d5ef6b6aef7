"""When a message is tried again and when its time is up: the retry policy, the one rule of
expiry, and the RetryTimer that holds messages that failed for now until their backoff ends."""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from typing import Any

import msgspec
import trio

from smsgw.engine.actor import ActorRef, Inbox
from smsgw.engine.messages import Enqueue, OutboundSms, Outcome, OutcomeStatus, SchedulerMessage

# The reason of an express message failed because its deadline passed (waiting for a slot or
# an operator, or before its next attempt could begin).
DEADLINE_EXCEEDED = "deadline_exceeded"


class RetryPolicy(msgspec.Struct, frozen=True):
    max_attempts: int = 5
    attempt_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_cap: float = 60.0
    # Retries end this long after the accept (an express message's end is its deadline).
    validity_s: float = 86_400.0
    # An express batch's attempt gets this share of the time left to its earliest deadline,
    # so that a timeout leaves time for a retry on another operator.
    express_attempt_share: float = 0.4

    def ends_at(self, sms: OutboundSms) -> float:
        """When `sms`'s time is up, wherever it waits (wall clock): its deadline, else the end
        of its validity (its own, else `validity_s`), counted from when it may be sent: its
        `send_at` if it was scheduled, else its accept. Past it, the message ends with
        `expired`, never sent."""
        if sms.deadline is not None:
            return sms.deadline
        start = sms.created_at if sms.send_at is None else sms.send_at
        return start + (self.validity_s if sms.validity is None else sms.validity)

    def next_delay(self, sms: OutboundSms, now: float, rng: random.Random) -> float | None:
        """Seconds until the next attempt of `sms`, which failed for now after `sms.attempts`
        attempts; None when there is none (see `next_attempt`)."""
        return next_attempt(
            sms.attempts,
            now=now,
            expires=self.ends_at(sms),
            express=sms.deadline is not None,
            max_attempts=self.max_attempts,
            base=self.backoff_base,
            cap=self.backoff_cap,
            rng=rng,
        )


def expired(
    sms: OutboundSms, at: float, *, operator: str | None = None, reason: str | None = None
) -> Outcome:
    """The outcome of `sms` whose time ran out (`RetryPolicy.ends_at` passed, or would before
    its next attempt could begin), its hold released. An express message is `failed` with
    reason `deadline_exceeded` (what `"wait": true` answers 504 for); another ends `expired`,
    with its last failure's reason (`reason`, else the last attempt's), or
    `no_operator_available` when no operator could take it."""
    if sms.deadline is not None:
        status: OutcomeStatus = "failed"
        reason = DEADLINE_EXCEEDED
    else:
        status = "expired"
        reason = reason or sms.last_reason or "no_operator_available"
    return Outcome(
        sms=sms,
        status=status,
        operator=operator,
        operator_message_id=None,
        reason=reason,
        attempts=sms.attempts,
        at=at,
    )


class RetryLater(msgspec.Struct, frozen=True):
    sms: OutboundSms
    delay: float  # seconds from now


def backoff(attempts: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempts-1))]."""
    exponent = min(max(0, attempts - 1), 1023)  # past 2**1023 a float overflows
    return rng.uniform(0.0, min(cap, base * 2.0**exponent))


def next_attempt(
    attempts: int,
    *,
    now: float,
    expires: float,
    express: bool,
    max_attempts: int,
    base: float,
    cap: float,
    rng: random.Random,
) -> float | None:
    """Seconds until the next attempt of a message that failed for now after `attempts`
    attempts, or None when there is none: `max_attempts` are made, or the next would begin at
    or past `expires` (its validity; for express, its deadline). An express message waits at
    most a quarter of the time it has left, so a retry on another operator can still make it."""
    if attempts >= max_attempts:
        return None
    delay = backoff(attempts, base=base, cap=cap, rng=rng)
    if express:
        delay = min(delay, max(0.0, expires - now) / 4)
    if now + delay >= expires:
        return None
    return delay


class RetryTimer:
    """One timer for all waiting retries: a heap of due times, one sleeping loop.

    The heap survives a restart of the run loop, so no waiting retry is dropped.
    """

    def __init__(self, scheduler: ActorRef[SchedulerMessage], *, capacity: int = 100_000) -> None:
        self.inbox: Inbox[RetryLater] = Inbox("retry_timer", capacity)
        self.ref = self.inbox.handle()
        self._scheduler = scheduler
        self._heap: list[tuple[float, int, OutboundSms]] = []
        self._seq = 0
        self.scheduled = 0

    def stats(self) -> dict[str, Any]:
        return {"waiting": len(self._heap), "scheduled": self.scheduled}

    def waiting(self) -> Iterator[OutboundSms]:
        """The messages waiting out their backoff here (for the stranded-message sweep)."""
        return (sms for _, _, sms in self._heap)

    def _push(self, message: RetryLater) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (trio.current_time() + message.delay, self._seq, message.sms))
        self.scheduled += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            wait = self._heap[0][0] - trio.current_time() if self._heap else float("inf")
            if wait > 0:
                with trio.move_on_after(wait):
                    self._push(await self.inbox.get())
                    while (more := self.inbox.get_nowait()) is not None:
                        self._push(more)
                    continue
            due: list[OutboundSms] = []
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                due.append(heapq.heappop(self._heap)[2])
            if due:
                await self._scheduler.tell(Enqueue(tuple(due)))
