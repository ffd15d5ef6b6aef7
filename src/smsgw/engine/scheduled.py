"""ScheduledSends: moves this node's scheduled messages from the store into dispatch once due.

A message accepted with a `send_at` ahead is stored `scheduled`, its price held, and goes to no
node's memory: a million scheduled for 9:00 cost the node nothing until 9:00. This actor, one
per node, promotes the due messages of the shards the node leases (`scheduled` -> `queued`, one
statement a page) and hands them to the Scheduler as any committed message is handed, where
they wait, paged, like any backlog. It wakes at the earliest `send_at` the store knows of in its
shards, at the `send_at` of a message this node just accepted (`due`), and every `poll`
seconds for messages other nodes accepted.

Memory: promotion goes on only while the Scheduler has room, by the figures it publishes:
below its bound of entries in memory (`memory_bound`), and below `backlog_bound` of bulk
waiting (the node builds it at half admission's node bound, so that scheduled sends coming due
never make admission refuse anyone's new work). What has no room yet stays `scheduled` in the
store, due, and is promoted as dispatch drains.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
import trio

from smsgw.engine.messages import DispatchFigures, OutboundSms
from smsgw.engine.ports import ScheduledStore
from smsgw.engine.writer import CommitFence

log = logging.getLogger("smsgw.scheduled")


class ScheduledConfig(msgspec.Struct, frozen=True):
    # Look for due messages at least this often (seconds): other nodes' accepts do not wake
    # this one, so a message accepted elsewhere shortly before its send_at is promoted within
    # this of it.
    poll: float = 0.5
    # Messages promoted by one statement, and at most this many of one shard in it: a
    # million of one account due at once do not hold the other shards' due messages back by
    # a page each (the shards are visited in turn, from a different one each time).
    page: int = 2_000
    per_shard: int = 250
    # While due messages wait for room in the Scheduler: how soon to look again.
    step: float = 0.05


# The store or the Scheduler is away: try again after this long.
_RETRY_S = 0.5
# A wake for a due time is this much after it: the store's clock compares `send_at <= now`,
# and a wake a rounding error early would find nothing due and sleep again for nothing.
_PAST_DUE_S = 0.001

Enqueue = Callable[[Sequence[OutboundSms], Mapping[int, int] | None], Awaitable[None]]


class ScheduledSends:
    """Promotes due scheduled messages of this node's shards, a page at a time, while the
    Scheduler has room.

    `shards` gives the shards this node dispatches now (shard -> lease token; None: all, a
    node without leases); `enqueue` hands promoted messages on (with the tokens they were
    promoted under); `figures` is what the Scheduler last published. Each promotion is
    fenced like a group commit (`commits`): the Scheduler's pager, whose query may see the
    promoted rows as `queued`, waits until they were handed on, so no message is read back
    twice. Nothing is promoted before `ready` (start-up recovery) is set.

    Promotion is exact by the store alone: a message is promoted once, by the node leasing its
    shard; one promoted here and not handed on (this node lost the shard, or crashed between
    the commit and the hand-on) is `queued` in the store, where the shard's next owner's
    recovery or this node's stranded-message sweep finds it.
    """

    def __init__(
        self,
        store: ScheduledStore,
        enqueue: Enqueue,
        shards: Callable[[], Mapping[int, int] | None],
        figures: Callable[[], DispatchFigures],
        ready: trio.Event,
        *,
        memory_bound: float = math.inf,
        backlog_bound: float = math.inf,
        commits: CommitFence | None = None,
        clock: Callable[[], float] = time.time,
        config: ScheduledConfig = ScheduledConfig(),
    ) -> None:
        self._store = store
        self._enqueue = enqueue
        self._shards = shards
        self._figures = figures
        self._memory_bound = memory_bound
        self._backlog_bound = backlog_bound
        self._ready = ready
        self._commits = commits
        self._clock = clock
        self.config = config
        self._wake = trio.Event()
        # The wall-clock time this loop sleeps towards (inf: the poll's end only).
        self._next = math.inf
        self.promoted = 0  # messages moved from scheduled to queued here
        self.promotions = 0  # statements that promoted at least one
        self.waits_for_room = 0  # passes that found due messages and no room for them
        self.next_due: float | None = None  # the earliest send_at the store last reported
        self.last_error: str | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "promotions": self.promotions,
            "waits_for_room": self.waits_for_room,
            "next_due_in_s": None
            if self.next_due is None
            else round(self.next_due - self._clock(), 3),
            "last_error": self.last_error,
        }

    def _room(self) -> int:
        """How many more the Scheduler may take now: below both bounds. A promoted entry
        before its account's paging cursor goes to memory (no page would read it back), one
        after it may be only counted: the memory bound takes the worst case."""
        figures = self._figures()
        in_memory = figures.bulk_waiting - figures.bulk_in_store
        room = min(self._memory_bound - in_memory, self._backlog_bound - figures.bulk_waiting)
        return int(min(room, self.config.page * 1_000))

    def due(self, send_at: float) -> None:
        """A message due at `send_at` (wall clock) was just stored by this node: wake then,
        if that is before the time this loop sleeps towards. Synchronous, never waits."""
        if send_at < self._next:
            self._next = send_at
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Promote what is due, then sleep until the next due time, a `due` call or the poll;
        until cancelled. Starts promoting once `ready` is set."""
        task_status.started()
        await self._ready.wait()
        while True:
            try:
                wake_at = await self._pass()
            except Exception as exc:
                # The store is away: the messages wait in it, due; look again shortly.
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("promoting scheduled messages failed: %s", self.last_error)
                wake_at = self._clock() + _RETRY_S
            now = self._clock()
            self._next = min(wake_at, now + self.config.poll)
            if self._wake.is_set():
                self._wake = trio.Event()
                continue  # a `due` came during the pass: look again at once
            with trio.move_on_after(max(0.0, self._next - now)):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _pass(self) -> float:
        """Promote due messages until none is left or the Scheduler has no room; returns when
        to look next (wall clock)."""
        config = self.config
        room = self._room()
        while True:
            shards = self._shards()
            if shards is not None and not shards:
                self.next_due = None
                return math.inf  # nothing leased (yet): the poll looks again
            if room <= 0:
                # No statement without room: the next pass asks, once the Scheduler has
                # taken some of what it holds (or at the next due time the store told).
                now = self._clock()
                if self.next_due is None:
                    return math.inf  # nothing was scheduled at the last look: the poll
                if self.next_due > now:
                    return self.next_due + _PAST_DUE_S
                self.waits_for_room += 1
                return now + config.step
            limit = min(config.page, room)
            now = self._clock()
            promoted = await self._promote(shards, now, limit)
            room -= len(promoted)
            due = self.next_due
            if due is None:
                return math.inf
            if due > now:
                return due + _PAST_DUE_S
            if not promoted:
                # Due and not promoted (a row locked by a cancel deciding it): shortly.
                return self._clock() + config.step
            # More are due (a page was full, or a shard gave its share): go on.

    async def _promote(
        self, shards: Mapping[int, int] | None, now: float, limit: int
    ) -> list[OutboundSms]:
        """One statement's worth, handed on before the fence closes."""
        fence = None if self._commits is None else self._commits.open()
        try:
            done = await self._store.promote_due(shards, now, limit, self.config.per_shard)
            self.next_due = done.next_due
            if done.messages:
                self.promotions += 1
                self.promoted += len(done.messages)
                await self._enqueue(done.messages, shards)
            self.last_error = None
            return done.messages
        finally:
            if fence is not None and self._commits is not None:
                self._commits.close(fence)
