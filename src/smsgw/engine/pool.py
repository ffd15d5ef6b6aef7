"""ProviderPool: sends to operators within a window, with timeouts, retries and outcomes."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio

from smsgw.engine.actor import ActorRef, Inbox
from smsgw.engine.messages import (
    Enqueue,
    OutboundSms,
    Outcome,
    RecordOutcome,
    SchedulerMessage,
    SendResult,
    WriterMessage,
)
from smsgw.engine.ports import Provider
from smsgw.engine.retry import RetryLater, backoff

log = logging.getLogger("smsgw.pool")


class RetryPolicy(msgspec.Struct, frozen=True):
    max_attempts: int = 5
    attempt_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_cap: float = 60.0


class ProviderPool:
    """Owns the in-flight window and the operators.

    The Scheduler takes a slot from `slots` before it chooses a message, then `submit`s it;
    the slot is released when the attempt ends. Each attempt runs in its own task with a
    timeout. A message in flight when the run loop dies is handed back to the Scheduler on
    restart: the operator dedupes on the message id, so a repeat cannot charge twice.
    """

    def __init__(
        self,
        providers: Sequence[tuple[Provider, int]],
        writer: ActorRef[WriterMessage],
        retry: ActorRef[RetryLater],
        requeue: ActorRef[SchedulerMessage],
        *,
        window: int = 256,
        policy: RetryPolicy = RetryPolicy(),
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        if not providers:
            raise ValueError("a ProviderPool needs at least one provider")
        self.inbox: Inbox[OutboundSms] = Inbox("provider_pool", window)
        self.slots = trio.Semaphore(window)
        self.window = window
        self._providers = [p for p, _ in providers]
        self._weights = [w for _, w in providers]
        self._writer = writer
        self._retry = retry
        self._requeue = requeue
        self._policy = policy
        self._clock = clock
        self._rng = random.Random(seed)
        self.inflight: dict[str, OutboundSms] = {}
        self.counts: dict[str, int] = {"sent": 0, "temporary": 0, "permanent": 0, "failed": 0}

    def stats(self) -> dict[str, Any]:
        return {"inflight": len(self.inflight), "window": self.window, **self.counts}

    def submit(self, sms: OutboundSms) -> None:
        """Start an attempt; the caller holds a slot from `slots` for it."""
        self.inflight[sms.id] = sms
        self.inbox.put_nowait(sms)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        orphans = tuple(self.inflight.values())
        if orphans:
            # A previous run died with these in flight; their slots died with their tasks.
            self.inflight.clear()
            await self._requeue.tell(Enqueue(orphans))
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sms = await self.inbox.get()
                nursery.start_soon(self._attempt, sms)

    def _choose(self) -> Provider:
        if len(self._providers) == 1:
            return self._providers[0]
        return self._rng.choices(self._providers, self._weights)[0]

    async def _attempt(self, sms: OutboundSms) -> None:
        try:
            provider = self._choose()
            attempts = sms.attempts + 1
            result = await self._send(provider, sms)
            self.counts[result.kind] += 1
            if result.kind == "temporary":
                delay = backoff(
                    attempts,
                    base=self._policy.backoff_base,
                    cap=self._policy.backoff_cap,
                    rng=self._rng,
                )
                retry = msgspec.structs.replace(sms, attempts=attempts, last_reason=result.reason)
                if attempts >= self._policy.max_attempts:
                    await self._finish(retry, provider, "failed", None, f"{result.reason}")
                elif sms.deadline is not None and self._clock() + delay > sms.deadline:
                    await self._finish(retry, provider, "failed", None, "deadline_exceeded")
                else:
                    await self._retry.tell(RetryLater(retry, delay))
            else:
                done = msgspec.structs.replace(sms, attempts=attempts)
                status = "sent" if result.kind == "sent" else "failed"
                await self._finish(
                    done, provider, status, result.operator_message_id, result.reason
                )
            # Handed on: only now is it no longer ours. Cancelled before this point, it stays in
            # `inflight` and the next run of the pool hands it back to the Scheduler.
            self.inflight.pop(sms.id, None)
        finally:
            self.slots.release()

    async def _send(self, provider: Provider, sms: OutboundSms) -> SendResult:
        """One attempt; a timeout or an exception is a temporary failure, never a crash."""
        try:
            with trio.move_on_after(self._policy.attempt_timeout):
                return await provider.send(sms, sms.id)
            return SendResult("temporary", reason="timeout")
        except Exception as exc:
            log.warning("operator %s raised on %s: %r", provider.name, sms.id, exc)
            return SendResult("temporary", reason=f"operator_error: {type(exc).__name__}")

    async def _finish(
        self,
        sms: OutboundSms,
        provider: Provider,
        status: str,
        operator_message_id: str | None,
        reason: str | None,
    ) -> None:
        if status == "failed":
            self.counts["failed"] += 1
        outcome = Outcome(
            sms=sms,
            status="sent" if status == "sent" else "failed",
            operator=provider.name,
            operator_message_id=operator_message_id,
            reason=reason,
            attempts=sms.attempts,
            at=self._clock(),
        )
        await self._writer.tell(RecordOutcome(outcome))
