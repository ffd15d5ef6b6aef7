"""ProviderPool: sends the Scheduler's batches to operators, with timeouts, retries and
outcomes, and tells the Scheduler when each batch is done."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import trio

from smsgw.engine.actor import ActorRef, Inbox
from smsgw.engine.breaker import BreakerState, Call
from smsgw.engine.cancels import Cancels
from smsgw.engine.histogram import DELIVERY_BUCKETS, Histogram
from smsgw.engine.messages import (
    Attempt,
    BatchDone,
    Dispatch,
    Enqueue,
    OperatorHealth,
    OutboundSms,
    Outcome,
    PoolFigures,
    RecordAttempt,
    RecordOutcome,
    SchedulerMessage,
    SendResult,
    WriterMessage,
)
from smsgw.engine.ports import Provider, slots_of
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
        cancels: Cancels | None = None,
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
        self._cancels = cancels
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
        # Per operator seen answering: calls in a row that failed whole, a moving average of
        # a call's round trip, when it last answered (what engine/express.py judges by).
        self._health: dict[str, OperatorHealth] = {}
        # What others read of the pool (HTTP, metrics, express admission), refreshed as
        # batches open and calls end.
        self.figures = PoolFigures()
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
            health = self._health.get(name)
            figures["failing_batches"] = 0 if health is None else health.failing
            figures["latency_ms"] = None if health is None else round(1000 * health.latency_s, 3)
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

    @property
    def names(self) -> tuple[str, ...]:
        """The operators' names, in the order they were configured."""
        return tuple(p.name for p in self._providers)

    def drain(self, name: str, reason: str) -> None:
        """Hold operator `name`'s breaker open until `release` (`Routing.drain`); KeyError
        for an unknown operator."""
        self.routing.drain(name, reason)

    def release(self, name: str) -> bool:
        """End a drain of `name`: its breaker probes. False (nothing done) when it was not
        drained; KeyError for an unknown operator."""
        if self.routing.router.by_name[name].breaker.held is None:
            return False
        self.routing.release(name)
        return True

    def breakers(self) -> list[tuple[str, BreakerState, int, int]]:
        """Each operator's (name, breaker state, times it opened, messages at it now)."""
        return [
            (r.name, r.breaker.state, r.breaker.opens, r.inflight)
            for r in self.routing.router.routes
        ]

    def in_flight(self) -> Iterable[OutboundSms]:
        """The messages in flight here now."""
        return self.inflight.values()

    def sending(self, message_id: str) -> bool:
        """Whether an attempt of `message_id` is in flight here (its status shows `sending`)."""
        return message_id in self.inflight

    def _publish(self) -> None:
        self.figures = PoolFigures(
            inflight=len(self.inflight),
            sent=self.counts["sent"],
            failed=self.counts["failed"],
            deadline_misses=self.deadline_misses,
            operators=dict(self._health),
            capacity=self.routing.router.capacity(),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        orphans = tuple(self.inflight.values())
        if orphans or self._open:
            # A previous run died with these in flight: they go back to the Scheduler, and
            # their batches' slots with them. (Batches it had not taken from the inbox yet are
            # still there, and this run sends them.)
            self.inflight.clear()
            self._publish()
            if orphans:
                await self._scheduler.tell(Enqueue(orphans))
            for slots, express in self._open.values():
                await self._scheduler.tell(BatchDone(slots, express))
            self._open.clear()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                batch = self._take(await self.inbox.get())
                self._publish()
                nursery.start_soon(self._attempt, self._batch_seq, batch)

    def _take(self, message: Dispatch) -> tuple[OutboundSms, ...]:
        """Open `message`'s batch; what of it to send: not a message in flight here already.

        The Scheduler can be handed one message twice, as when another node's hand-off
        arrives after paging already read the message back, and two attempts of one id in
        flight would settle it twice."""
        batch = message.batch
        self._batch_seq += 1
        self._open[self._batch_seq] = (slots_of(batch), batch[0].express)
        inflight = self.inflight
        fresh = {sms.id: sms for sms in batch if sms.id not in inflight}
        if len(fresh) < len(batch):
            self.duplicates += len(batch) - len(fresh)
            for sms in batch:
                held = inflight.get(sms.id)
                if held is not None and _newer_lease(sms, held):
                    # Handed in again under a newer lease of its shard: the shard left this
                    # node and came back while the attempt was out. The attempt goes on, and
                    # is settled under the lease that holds now (`_current`); under the old
                    # one its outcome would be fenced off and its retry dropped.
                    inflight[sms.id] = msgspec.structs.replace(held, fence=sms.fence)
            batch = tuple(fresh.values())
        inflight.update(fresh)
        return batch

    def _current(self, sms: OutboundSms) -> OutboundSms:
        """`sms` under the lease its in-flight record holds now (see `_take`)."""
        held = self.inflight.get(sms.id)
        if held is None or held.fence == sms.fence:
            return sms
        return msgspec.structs.replace(sms, fence=held.fence)

    async def _attempt(self, number: int, batch: tuple[OutboundSms, ...]) -> None:
        """Send `batch`, then tell the Scheduler that batch `number`'s slots are free.
        Cancelled on the way (the run loop died), it stays open for the next run to give
        back."""
        if self._cancels is not None and batch:
            batch = await self._uncancelled(batch)
        sending = batch if self._admit is None or not batch else await self._admitted(batch)
        if sending:
            await self._route(sending)
        self._publish()
        slots, express = self._open[number]
        await self._scheduler.tell(BatchDone(slots, express))
        del self._open[number]

    async def _route(self, batch: tuple[OutboundSms, ...]) -> None:
        """Send `batch` in the calls routing assigns, concurrently, and fail what runs out of
        time waiting for an operator with room. Returns when every call has ended;
        cancelled, the calls begun are cancelled too."""
        looks = self.routing.assignments(batch, self._policy.ends_at, self.max_batch)
        async with trio.open_nursery() as calls, contextlib.aclosing(looks):
            async for begun, out_of_time in looks:
                for route, part, call in begun:
                    calls.start_soon(self._send_part, route, call, part)
                for sms in out_of_time:
                    await self._expire(sms)

    async def _send_part(self, route: OperatorRoute, call: Call, part: list[OutboundSms]) -> None:
        """One call to the operator `routing` chose for `part` of a batch."""
        provider = route.provider
        try:
            self.batches += 1
            results = await self._send(route, call, part)
        finally:
            self.routing.abandon(route, call)  # cancelled: its slots come back unrecorded
        for sms, result in zip(part, results, strict=True):
            await self._settle(provider, self._current(sms), result)
            # Handed on: only now is it no longer ours. Cancelled before this point, it
            # stays in `inflight` and the next run of the pool hands it back.
            del self.inflight[sms.id]
        self._publish()

    async def _expire(self, sms: OutboundSms) -> None:
        """`sms` waited for an operator past its time (`RetryPolicy.ends_at`)."""
        await self._record(expired(self._current(sms), self._clock()))
        del self.inflight[sms.id]
        self._publish()

    async def _uncancelled(self, batch: tuple[OutboundSms, ...]) -> tuple[OutboundSms, ...]:
        """The messages of `batch` no cancel stops (engine/cancels.py): a cancelled one is
        dropped unsent (its row is final: nothing more to record), one whose cancel is being
        decided comes back after a short wait, when the store has decided."""
        assert self._cancels is not None
        states = [self._cancels.state(sms.id) for sms in batch]
        if not any(states):
            return batch
        for sms, state in zip(batch, states, strict=True):
            if state is not None:
                del self.inflight[sms.id]
                if state == "deciding":
                    await self._retry.tell(RetryLater(sms, 0.5))
        return tuple(sms for sms, state in zip(batch, states, strict=True) if state is None)

    async def _admitted(self, batch: tuple[OutboundSms, ...]) -> tuple[OutboundSms, ...]:
        """The messages this node may send now. One whose shard went to another node is
        dropped (the new owner recovers it); one whose shard is still this node's under the
        same token, only not renewed lately enough to be trusted (a slow heartbeat under
        load), comes back after a short wait: dropped, it would wait for a restart."""
        assert self._admit is not None
        admitted = [self._admit(sms) for sms in batch]
        if all(admitted):
            return batch
        sending = []
        for sms, ok in zip(batch, admitted, strict=True):
            if not ok:
                current = self._current(sms)
                if current is not sms and self._admit(current):
                    sending.append(current)  # handed in again under a newer lease meanwhile
                    continue
                del self.inflight[sms.id]
                if self._still_held is not None and self._still_held(current):
                    await self._retry.tell(RetryLater(current, 0.5))
                continue
            sending.append(sms)
        return tuple(sending)

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
        recent = self.recent_latency.get(name)
        if recent is not None:
            recent.append(seconds)
        previous = self._health.get(name)
        self._health[name] = OperatorHealth(
            latency_s=seconds
            if previous is None
            else previous.latency_s + 0.2 * (seconds - previous.latency_s),
            failing=0 if ok else (0 if previous is None else previous.failing) + 1,
            observed_at=trio.current_time(),
        )

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
                attempt=result.kind,
            )
            await self._record(outcome)
            return
        retry = msgspec.structs.replace(
            sms, attempts=attempts, last_reason=result.reason, last_operator=provider.name
        )
        delay = self._policy.next_delay(retry, now, self._rng)
        if attempts >= self._policy.max_attempts:
            outcome = Outcome(
                retry, "failed", provider.name, None, result.reason, attempts, now, "temporary"
            )
            await self._record(outcome)
        elif delay is None:  # its time is up before the next attempt could begin
            ended = expired(retry, now, operator=provider.name, reason=result.reason)
            await self._record(msgspec.structs.replace(ended, attempt="temporary"))
        else:
            await self._writer.tell(
                RecordAttempt(Attempt(retry, provider.name, result.reason, now))
            )
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
        if status != "sent":
            self.counts["failed"] += 1
            if reason == DEADLINE_EXCEEDED:
                self.deadline_misses += 1
        else:
            waited = max(0.0, outcome.at - sms.created_at)
            self.accept_to_sent.observe(waited)
            if sms.express:
                self.express_to_sent.observe(waited)
        if self._cancels is not None:
            self._cancels.settling(sms.id)
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


def _newer_lease(sms: OutboundSms, held: OutboundSms) -> bool:
    """`sms` carries a newer fencing token than `held`, the same message (tokens grow)."""
    return sms.fence is not None and (held.fence is None or sms.fence > held.fence)
