"""ProviderPool: sends the Scheduler's batches to operators, with timeouts, retries and
outcomes, and tells the Scheduler when each batch is done."""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio

from smsgw.engine.actor import ActorRef, Inbox
from smsgw.engine.breaker import Call
from smsgw.engine.histogram import DELIVERY_BUCKETS, Histogram
from smsgw.engine.messages import (
    BatchDone,
    Dispatch,
    Enqueue,
    OutboundSms,
    Outcome,
    RecordOutcome,
    SchedulerMessage,
    SendResult,
    WriterMessage,
)
from smsgw.engine.ports import Provider
from smsgw.engine.retry import DEADLINE_EXCEEDED, RetryLater, RetryPolicy, expired
from smsgw.engine.routing import OperatorRoute, Router, Routing, RoutingConfig

log = logging.getLogger("smsgw.pool")


class ProviderPool:
    """Owns the operators and the messages in flight.

    The Scheduler, which owns the window, sends a `Dispatch` of as many messages as it took
    slots for; the pool sends the batch to one operator in one call (one task, one timeout,
    one round trip for the window, where a task per message cost more than the rest of
    dispatch), hands each message's outcome on, and then tells the Scheduler `BatchDone`.
    Messages in flight when the run loop dies go back to the Scheduler on restart, with their
    batches' slots: the operator dedupes on the message id, so a repeat cannot charge twice.
    """

    def __init__(
        self,
        providers: Sequence[tuple[Provider, int]],
        writer: ActorRef[WriterMessage],
        retry: ActorRef[RetryLater],
        scheduler: ActorRef[SchedulerMessage],
        *,
        window: int = 256,
        max_batch: int = 64,
        policy: RetryPolicy = RetryPolicy(),
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        admit: Callable[[OutboundSms], bool] | None = None,
        still_held: Callable[[OutboundSms], bool] | None = None,
        routing: RoutingConfig = RoutingConfig(),
    ) -> None:
        if not providers:
            raise ValueError("a ProviderPool needs at least one provider")
        # Every batch in it holds at least one of the `window` slots: it is never full.
        self.inbox: Inbox[Dispatch] = Inbox("provider_pool", window)
        self.ref = self.inbox.handle()
        self.max_batch = max_batch  # messages in one operator call
        self._providers = [p for p, _ in providers]
        self._writer = writer
        self._retry = retry
        self._scheduler = scheduler
        self._policy = policy
        self._clock = clock
        self._rng = random.Random(seed)
        # trio's clock, as the router is read with (it has an arbitrary origin: a breaker
        # started at 0.0 showed a state age of some 76,000 s a minute after start).
        router = Router(providers, routing, now=trio.current_time(), rng=self._rng)
        self.routing = Routing(router, clock=clock)
        # The last check before a send (ShardLeases.admit): a message of a shard this node no
        # longer leases is dropped here unsent; its new owner recovers it from PostgreSQL.
        self._admit = admit
        self._still_held = still_held
        self.inflight: dict[str, OutboundSms] = {}
        # Batches taken from the inbox and not yet done: number -> (slots, express). What a
        # run loop that died left here goes back to the Scheduler when it starts again.
        self._open: dict[int, tuple[int, bool]] = {}
        self._batch_seq = 0
        self.counts: dict[str, int] = {"sent": 0, "temporary": 0, "permanent": 0, "failed": 0}
        self.batches = 0
        self.duplicates = 0  # messages handed in again while already in flight
        # Plain counters for /metrics and the status page, read when asked for.
        # (operator, result of one attempt: sent / temporary / permanent) -> attempts
        self.attempts: dict[tuple[str, str], int] = {}
        # (operator, final status: sent / failed, reason or "") -> messages
        self.outcomes: dict[tuple[str, str, str], int] = {}
        # Seconds from accept (`created_at`) to the operator's `sent`, retries included.
        self.accept_to_sent = Histogram(DELIVERY_BUCKETS)
        self.express_to_sent = Histogram(DELIVERY_BUCKETS)
        self.deadline_misses = 0  # express messages failed here because the deadline passed
        # Per operator: batches that failed as a whole in a row (a timeout, an exception), and
        # a moving average of a batch's round trip in seconds: what the express admission
        # check (`express_problem`) reads.
        self.failing: dict[str, int] = {p.name: 0 for p in self._providers}
        self.latency: dict[str, float] = {}
        self.observed_at: dict[str, float] = {}  # trio time of the last batch's answer
        # Per operator, for the ops console: the round trips of its last RECENT_CALLS calls
        # (p50/p99 now, where a histogram since start would hide a change), and attempts it
        # refused as throttled (temporary, reason "throttled...": the operator's own cap).
        self.recent_latency: dict[str, deque[float]] = {
            p.name: deque(maxlen=self.RECENT_CALLS) for p in self._providers
        }
        self.throttled: dict[str, int] = {p.name: 0 for p in self._providers}

    def _routing_stats(self) -> dict[str, Any]:
        """The router's figures, with each operator's consecutive failed batches and latency
        (what the express admission check reads) next to its breaker's."""
        stats = self.routing.stats()
        for name, figures in stats["operators"].items():
            figures["failing_batches"] = self.failing.get(name, 0)
            latency = self.latency.get(name)
            figures["latency_ms"] = None if latency is None else round(1000 * latency, 3)
            recent = sorted(self.recent_latency.get(name, ()))
            figures["latency_p50_ms"] = _percentile_ms(recent, 0.5)
            figures["latency_p99_ms"] = _percentile_ms(recent, 0.99)
            figures["throttled_attempts"] = self.throttled.get(name, 0)
        return stats

    def stats(self) -> dict[str, Any]:
        outcomes: dict[str, dict[str, dict[str, int]]] = {}
        for (operator, status, reason), n in sorted(self.outcomes.items()):
            outcomes.setdefault(operator, {}).setdefault(status, {})[reason or "-"] = n
        return {
            "inflight": len(self.inflight),
            "batches": self.batches,
            "duplicates": self.duplicates,
            **self.counts,
            "outcomes": outcomes,
            "accept_to_sent_seconds": self.accept_to_sent.summary(),
            "express_accept_to_sent_seconds": self.express_to_sent.summary(),
            "express_deadline_misses": self.deadline_misses,
            **self._routing_stats(),
        }

    # Calls per operator whose round trips give the console's latency percentiles.
    RECENT_CALLS = 256
    # An operator whose last batches all failed this many times in a row is not healthy.
    UNHEALTHY_AFTER = 3
    # What is known of an operator is trusted this long: with no batch since, it may have
    # recovered, and refusing every express message would never let one find out.
    KNOWN_FOR = 10.0

    def express_problem(self, deadline_s: float, express_ahead: int, room: int) -> str | None:
        """Why an express message accepted now could not reach an operator within
        `deadline_s` seconds, or None when it can: a healthy operator, answering in time,
        with room in the window for it and the `express_ahead` messages before it (`room`:
        the window's slots that bulk does not hold)."""
        now = trio.current_time()
        known = {
            p.name
            for p in self._providers
            if now - self.observed_at.get(p.name, -math.inf) < self.KNOWN_FOR
        }
        healthy = [
            p.name
            for p in self._providers
            if p.name not in known or self.failing[p.name] < self.UNHEALTHY_AFTER
        ]
        if not healthy:
            return "no operator is healthy: every operator's recent batches failed"
        latency = min(self.latency.get(name, 0.0) if name in known else 0.0 for name in healthy)
        if latency >= deadline_s:
            return (
                f"operators answer in {latency * 1000:.0f} ms, past the express deadline of"
                f" {deadline_s * 1000:.0f} ms"
            )
        # Each turn of the window (one operator latency) sends `room` express messages.
        turns = express_ahead // max(1, room)
        if (turns + 1) * latency >= deadline_s:
            return (
                f"{express_ahead} express messages are waiting ahead of this one; at"
                f" {latency * 1000:.0f} ms per operator turn it would miss its deadline of"
                f" {deadline_s * 1000:.0f} ms"
            )
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        orphans = tuple(self.inflight.values())
        if orphans or self._open:
            # A previous run died with these in flight: they go back to the Scheduler, and
            # their batches' slots with them. (Batches it had not taken from the inbox yet are
            # still there, and this run sends them.)
            self.inflight.clear()
            if orphans:
                await self._scheduler.tell(Enqueue(orphans))
            for slots, express in self._open.values():
                await self._scheduler.tell(BatchDone(slots, express))
            self._open.clear()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                batch = self._take(await self.inbox.get())
                nursery.start_soon(self._attempt, self._batch_seq, batch)

    def _take(self, message: Dispatch) -> tuple[OutboundSms, ...]:
        """Open `message`'s batch; what of it to send: not a message in flight here already.

        The Scheduler can be handed one message twice, as when another node's hand-off
        arrives after paging already read the message back, and two attempts of one id in
        flight would settle it twice."""
        batch = message.batch
        self._batch_seq += 1
        self._open[self._batch_seq] = (len(batch), batch[0].express)
        inflight = self.inflight
        fresh = {sms.id: sms for sms in batch if sms.id not in inflight}
        if len(fresh) < len(batch):
            self.duplicates += len(batch) - len(fresh)
            batch = tuple(fresh.values())
        inflight.update(fresh)
        return batch

    async def _attempt(self, number: int, batch: tuple[OutboundSms, ...]) -> None:
        """Send `batch`, then tell the Scheduler that batch `number`'s slots are free.
        Cancelled on the way (the run loop died), it stays open for the next run to give
        back."""
        sending = batch if self._admit is None or not batch else await self._admitted(batch)
        if sending:
            await self.routing.dispatch(
                sending, self._send_part, self._expire, self._policy.ends_at, self.max_batch
            )
        slots, express = self._open[number]
        await self._scheduler.tell(BatchDone(slots, express))
        del self._open[number]

    async def _send_part(self, route: OperatorRoute, call: Call, part: list[OutboundSms]) -> None:
        """One call to the operator `routing` chose for `part` of a batch."""
        provider = route.provider
        try:
            self.batches += 1
            results = await self._send(route, call, part)
        finally:
            self.routing.abandon(route, call)  # cancelled: its slots come back unrecorded
        for sms, result in zip(part, results, strict=True):
            await self._settle(provider, sms, result)
            # Handed on: only now is it no longer ours. Cancelled before this point, it
            # stays in `inflight` and the next run of the pool hands it back.
            del self.inflight[sms.id]

    async def _expire(self, sms: OutboundSms) -> None:
        """`sms` waited for an operator past its time (`RetryPolicy.ends_at`)."""
        await self._record(expired(sms, self._clock()))
        del self.inflight[sms.id]

    async def _admitted(self, batch: tuple[OutboundSms, ...]) -> tuple[OutboundSms, ...]:
        """The messages this node may send now. One whose shard went to another node is
        dropped (the new owner recovers it); one whose shard is still this node's under the
        same token, only not renewed lately enough to be trusted (a slow heartbeat under
        load), comes back after a short wait: dropped, it would wait for a restart."""
        assert self._admit is not None
        admitted = [self._admit(sms) for sms in batch]
        if all(admitted):
            return batch
        for sms, ok in zip(batch, admitted, strict=True):
            if not ok:
                del self.inflight[sms.id]
                if self._still_held is not None and self._still_held(sms):
                    await self._retry.tell(RetryLater(sms, 0.5))
        return tuple(sms for sms, ok in zip(batch, admitted, strict=True) if ok)

    async def _send(
        self, route: OperatorRoute, call: Call, batch: Sequence[OutboundSms]
    ) -> list[SendResult]:
        """One attempt per message; a timeout, an exception or a wrong number of results is a
        temporary failure for the whole batch, never a crash. The result goes to the
        operator's breaker."""
        provider = route.provider
        failure = "timeout"
        timeout = self._policy.attempt_timeout
        deadlines = [s.deadline for s in batch if s.deadline is not None]
        if deadlines:
            left = min(deadlines) - self._clock()
            timeout = min(timeout, max(0.05, left * self._policy.express_attempt_share))
        started = trio.current_time()
        try:
            with trio.move_on_after(timeout):
                results = await provider.send_batch(batch)
                if len(results) == len(batch):
                    self._observe(provider.name, trio.current_time() - started, ok=True)
                    self.routing.finish(route, call, results)
                    return results
                failure = f"operator_error: {len(results)} results for {len(batch)} messages"
        except Exception as exc:
            log.warning("operator %s raised on a batch of %d: %r", provider.name, len(batch), exc)
            failure = f"operator_error: {type(exc).__name__}"
        self._observe(provider.name, trio.current_time() - started, ok=False)
        failed = [SendResult("temporary", reason=failure)] * len(batch)
        self.routing.finish(route, call, None if failure == "timeout" else failed)
        return failed

    def _observe(self, name: str, seconds: float, *, ok: bool) -> None:
        self.observed_at[name] = trio.current_time()
        recent = self.recent_latency.get(name)
        if recent is not None:
            recent.append(seconds)
        self.failing[name] = 0 if ok else self.failing.get(name, 0) + 1
        previous = self.latency.get(name)
        self.latency[name] = seconds if previous is None else previous + 0.2 * (seconds - previous)

    async def _settle(self, provider: Provider, sms: OutboundSms, result: SendResult) -> None:
        attempts = sms.attempts + 1
        self.counts[result.kind] += 1
        key = (provider.name, result.kind)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if result.kind == "temporary" and (result.reason or "").startswith("throttled"):
            self.throttled[provider.name] = self.throttled.get(provider.name, 0) + 1
        now = self._clock()
        if result.kind != "temporary":
            outcome = Outcome(
                sms=msgspec.structs.replace(sms, attempts=attempts),
                status="sent" if result.kind == "sent" else "failed",
                operator=provider.name,
                operator_message_id=result.operator_message_id,
                reason=result.reason,
                attempts=attempts,
                at=now,
            )
            await self._record(outcome)
            return
        retry = msgspec.structs.replace(
            sms, attempts=attempts, last_reason=result.reason, last_operator=provider.name
        )
        delay = self._policy.next_delay(retry, now, self._rng)
        if attempts >= self._policy.max_attempts:
            outcome = Outcome(retry, "failed", provider.name, None, result.reason, attempts, now)
            await self._record(outcome)
        elif delay is None:  # its time is up before the next attempt could begin
            await self._record(expired(retry, now, operator=provider.name, reason=result.reason))
        else:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "message %s attempt %d via %s failed for now (%s); retry in %.2fs",
                    sms.id,
                    attempts,
                    provider.name,
                    result.reason,
                    delay,
                    extra={"request_id": sms.request_id, "message_id": sms.id},
                )
            await self._retry.tell(RetryLater(retry, delay))

    async def _record(self, outcome: Outcome) -> None:
        """Count a final outcome and hand it to the writer."""
        sms = outcome.sms
        status, reason = outcome.status, outcome.reason
        if status == "failed":
            self.counts["failed"] += 1
            if reason == DEADLINE_EXCEEDED:
                self.deadline_misses += 1
        else:
            waited = max(0.0, outcome.at - sms.created_at)
            self.accept_to_sent.observe(waited)
            if sms.express:
                self.express_to_sent.observe(waited)
        key = (outcome.operator or "-", status, reason or "")
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "message %s %s via %s after %d attempts%s",
                sms.id,
                status,
                outcome.operator,
                sms.attempts,
                f" ({reason})" if reason else "",
                extra={"request_id": sms.request_id, "message_id": sms.id},
            )
        await self._writer.tell(RecordOutcome(outcome))


def _percentile_ms(ordered: Sequence[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `ordered` seconds, in milliseconds; None when empty."""
    if not ordered:
        return None
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return round(1000 * ordered[rank], 3)
