"""Scheduler: per-account mailboxes served round robin, with an express lane served first."""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any, assert_never

import trio

from smsgw.engine.actor import ActorRef, Inbox
from smsgw.engine.messages import (
    Enqueue,
    OutboundSms,
    Outcome,
    RecordOutcome,
    SchedulerMessage,
    WriterMessage,
)
from smsgw.engine.pool import ProviderPool


class SchedulerState:
    """Which message goes next. Pure: no I/O, no clock.

    Bulk: one FIFO mailbox per account with work, accounts served round robin one message at a
    time, so a flooding account gets one turn per round like everyone else. Express: one lane
    for all accounts, earliest deadline first, always served before bulk.
    """

    def __init__(self) -> None:
        self.mailboxes: dict[int, deque[OutboundSms]] = {}
        self.ring: deque[int] = deque()  # accounts with bulk work, in serving order
        self.express: list[tuple[float, int, OutboundSms]] = []
        self._seq = 0
        self.bulk_size = 0

    def __len__(self) -> int:
        return self.bulk_size + len(self.express)

    def push(self, sms: OutboundSms) -> None:
        if sms.express:
            self._seq += 1
            deadline = sms.deadline if sms.deadline is not None else float("inf")
            heapq.heappush(self.express, (deadline, self._seq, sms))
            return
        mailbox = self.mailboxes.get(sms.account_id)
        if mailbox is None:
            mailbox = self.mailboxes[sms.account_id] = deque()
            self.ring.append(sms.account_id)
        mailbox.append(sms)
        self.bulk_size += 1

    def pop(self) -> OutboundSms | None:
        if self.express:
            return heapq.heappop(self.express)[2]
        if not self.ring:
            return None
        account_id = self.ring[0]
        mailbox = self.mailboxes[account_id]
        sms = mailbox.popleft()
        self.bulk_size -= 1
        if mailbox:
            self.ring.rotate(-1)
        else:
            self.ring.popleft()
            del self.mailboxes[account_id]
        return sms

    def largest_backlogs(self, n: int) -> list[tuple[int, int]]:
        return heapq.nlargest(n, ((len(q), a) for a, q in self.mailboxes.items()))


class Scheduler:
    """Takes committed messages in, hands them to the ProviderPool as its window frees up.

    The state survives a restart of the run loop: it is accepted work, not a cache.
    """

    def __init__(
        self,
        inbox: Inbox[SchedulerMessage],
        pool: ProviderPool,
        writer: ActorRef[WriterMessage],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox
        self.ref = self.inbox.handle()
        self.state = SchedulerState()
        self._pool = pool
        self._writer = writer
        self._clock = clock
        self.dispatched = 0
        self.deadline_misses = 0

    def stats(self) -> dict[str, Any]:
        return {
            "active_accounts": len(self.state.mailboxes),
            "bulk_backlog": self.state.bulk_size,
            "express_backlog": len(self.state.express),
            "largest_backlogs": [
                {"account_id": a, "backlog": n} for n, a in self.state.largest_backlogs(10)
            ],
            "dispatched": self.dispatched,
            "express_deadline_misses": self.deadline_misses,
        }

    def _absorb(self, message: SchedulerMessage) -> None:
        match message:
            case Enqueue(items=items):
                for sms in items:
                    self.state.push(sms)
            case _:
                assert_never(message)

    def _drain(self) -> None:
        while (message := self.inbox.get_nowait()) is not None:
            self._absorb(message)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        window = self._pool.window
        while True:
            # Dispatch avoids a task switch per message; this yields once per batch so that
            # HTTP and the other actors get the loop back.
            await trio.lowlevel.checkpoint()
            if not self.state:
                self._absorb(await self.inbox.get())
            self._drain()
            if window.free == 0:
                await window.wait_free()
                # An express message that arrived while we waited still goes first.
                self._drain()
            batch: list[OutboundSms] = []
            wanted = window.take(min(len(self.state), self._pool.max_batch))
            now = self._clock()
            while len(batch) < wanted:
                sms = self.state.pop()
                assert sms is not None
                if sms.deadline is not None and now > sms.deadline:
                    self.deadline_misses += 1
                    await self._writer.tell(RecordOutcome(self._expired(sms)))
                else:
                    batch.append(sms)
            window.release(wanted - len(batch))
            if batch:
                self._pool.submit(tuple(batch))
                self.dispatched += len(batch)

    def _expired(self, sms: OutboundSms) -> Outcome:
        return Outcome(
            sms=sms,
            status="failed",
            operator=None,
            operator_message_id=None,
            reason="deadline_exceeded",
            attempts=sms.attempts,
            at=self._clock(),
        )
