"""Scheduler: hands committed messages to the ProviderPool, express first, then bulk by
deficit round robin (or whichever SchedulerState it is given), as the window frees up."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, assert_never

import trio

from smsgw.engine.actor import ActorRef, Inbox
from smsgw.engine.mailboxes import SchedulerState
from smsgw.engine.messages import (
    Backlog,
    Enqueue,
    OutboundSms,
    Outcome,
    Paged,
    RecordOutcome,
    SchedulerMessage,
    SendRate,
    WriterMessage,
)
from smsgw.engine.pool import ProviderPool
from smsgw.engine.ports import Entry, SchedulingStore
from smsgw.engine.writer import CommitFence

# How long after a light account's message the window's light reserve stays kept for them.
LIGHT_HOLD_S = 5.0


class Scheduler:
    """Takes committed messages in, hands them to the ProviderPool as its window frees up.

    Express first, in their own batches, into the window's reserve as well as its shared part;
    then bulk, by deficit round robin, into the shared part only. An express message whose
    deadline passes while it waits is failed (`deadline_exceeded`, refunded), never sent late.
    Bulk entries paged back from PostgreSQL (and any whose body did not fit in the cache) get
    their bodies in one read per batch.

    The state survives a restart of the run loop: it is accepted work, not a cache.
    """

    def __init__(
        self,
        inbox: Inbox[SchedulerMessage],
        pool: ProviderPool,
        writer: ActorRef[WriterMessage],
        *,
        clock: Callable[[], float] = time.time,
        store: SchedulingStore | None = None,
        state: SchedulerState | None = None,
        page_accounts: int = 500,
        prefetch: int = 1_000,
        commits: CommitFence | None = None,
        stamp: Callable[[OutboundSms], OutboundSms | None] | None = None,
    ) -> None:
        self.inbox = inbox
        self.ref = self.inbox.handle()
        self.state = state if state is not None else SchedulerState()
        if store is None and (
            self.state.memory_bound != math.inf
            or self.state.account_bound != math.inf
            or self.state.body_budget != math.inf
        ):
            raise ValueError("bounded mailboxes need a store to page from")
        self._pool = pool
        self._writer = writer
        self._clock = clock
        self._store = store
        self._page_accounts = page_accounts
        self._prefetch = prefetch
        self._commits = commits
        # Among several nodes: a body read from the store gets its shard's fencing token, or
        # is dropped (None) when this node no longer leases the shard; its owner recovers it.
        self._stamp = stamp
        self._page_requests = trio.Event()
        self.dispatched = 0
        self.deadline_misses = 0  # express messages that expired waiting here
        self.pages = 0
        self.paged_entries = 0
        self.body_reads = 0
        self.prefetched = 0  # bodies read ahead of their batch
        self._ahead: OrderedDict[str, OutboundSms] = OrderedDict()
        self.page_failures = 0

    def stats(self) -> dict[str, Any]:
        state = self.state
        return {
            "active_accounts": len(state.mailboxes),
            "bulk_backlog": state.bulk_size,
            "bulk_in_memory": state.in_memory,
            "bulk_in_store": state.spilled,
            "express_backlog": len(state.express),
            "largest_backlogs": [
                {"account_id": a, "backlog": n} for n, a in state.largest_backlogs(10)
            ],
            "dispatched": self.dispatched,
            "express_deadline_misses": self.deadline_misses + self._pool.deadline_misses,
            "paced_accounts": len(state.buckets),
            "pages": self.pages,
            "paged_entries": self.paged_entries,
            "page_failures": self.page_failures,
            "body_reads": self.body_reads,
            "bodies_prefetched": self.prefetched,
            "bodies_cached": len(state.bodies),
        }

    def unheld(
        self, items: Sequence[OutboundSms], retrying: Iterable[OutboundSms] = ()
    ) -> list[OutboundSms]:
        """The messages of `items` (pending in the store) that nothing on this node will
        dispatch or finish: not in flight at the pool, not among `retrying` (the RetryTimer's
        heap), and not waiting here (`SchedulerState.unheld`). For ShardLeases.sweep; a
        message between two holders (an Enqueue not yet taken from the inbox, a batch whose
        bodies are being read) is unheld for that moment, which the sweep allows for."""
        inflight = self._pool.inflight
        retry_ids = {sms.id for sms in retrying}
        return self.state.unheld(
            sms for sms in items if sms.id not in inflight and sms.id not in retry_ids
        )

    def _absorb(self, message: SchedulerMessage) -> None:
        match message:
            case Enqueue(items=items):
                for sms in items:
                    self.state.push(sms)
            case Backlog(counts=counts):
                for account_id, count in counts:
                    self.state.add_backlog(account_id, count)
            case Paged(account_id=account_id, rows=rows, size=size, ok=ok):
                if ok:
                    self.pages += 1
                    self.paged_entries += len(rows)
                    self.state.paged(account_id, rows, size)
                else:
                    self.page_failures += 1
                    self.state.page_failed(account_id)
            case SendRate(account_id=account_id, rate=rate):
                self.state.set_send_rate(account_id, rate, self._clock())
            case _:
                assert_never(message)

    def _drain(self) -> None:
        while (message := self.inbox.get_nowait()) is not None:
            self._absorb(message)
        if self.state.page_wanted:
            self._page_requests.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.state.reset_paging()
        async with trio.open_nursery() as nursery:
            if self._store is not None:
                nursery.start_soon(self._pager, self._store)
            task_status.started()
            await self._dispatch(nursery)

    def _dispatch_bulk(self, nursery: trio.Nursery, entries: list[tuple[int, Entry]]) -> None:
        """Hand a bulk batch to the pool: the messages whose bodies are cached at once, the
        rest in a task that reads them, so that neither the dispatch loop (and express) nor a
        light account's message that shares the batch with a paged-back backlog waits on it."""
        bodies = self.state.bodies
        cached: list[OutboundSms] = []
        uncached: list[tuple[int, Entry]] = []
        for account_id, entry in entries:
            sms = bodies.pop(entry[1], None)
            if sms is None:
                uncached.append((account_id, entry))
            else:
                cached.append(sms)
        self._submit(cached)
        if uncached:
            nursery.start_soon(self._read_and_submit, uncached)

    async def _read_and_submit(self, entries: list[tuple[int, Entry]]) -> None:
        window = self._pool.window
        try:
            batch = await self._bodies([entry for _, entry in entries])
        except BaseException:
            # Cancelled (the run loop is restarting): the entries go back, slots too.
            for account_id, entry in entries:
                self.state.put_back(account_id, entry)
            window.release(len(entries), express=False)
            raise
        window.release(len(entries) - len(batch), express=False)
        self._submit(batch)

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        state = self.state
        window = self._pool.window
        max_batch = self._pool.max_batch
        while True:
            # Dispatch avoids a task switch per message; this yields once per batch so that
            # HTTP and the other actors get the loop back.
            await trio.lowlevel.checkpoint()
            self._drain()
            now = self._clock()
            await self._expire(now)
            progressed = False
            if state.express:
                wanted = window.take(min(len(state.express), max_batch), express=True)
                if wanted:
                    batch: list[OutboundSms] = []
                    while len(batch) < wanted and (sms := state.pop_express()) is not None:
                        batch.append(sms)
                    window.release(wanted - len(batch), express=True)
                    self._submit(batch)
                    progressed = True
            if state.bulk_ready():
                entries = self._pop_bulk(max_batch, now)
                if entries:
                    self._dispatch_bulk(nursery, entries)
                    progressed = True
            if progressed:
                continue
            timeout = min(state.next_deadline(), state.next_ready(now)) - now
            await self._wait(max(0.0, timeout), window_bound=bool(state))

    def _pop_bulk(self, max_batch: int, now: float) -> list[tuple[int, Entry]]:
        """Up to `max_batch` bulk entries in round-robin order, as the window has room.

        While a light account (no more than `light_backlog` messages waiting since it last had
        none) has been served in the last LIGHT_HOLD_S, the window's light reserve is kept out
        of this room and then offered to light accounts alone: a flood fills its slots again
        as each batch returns, and a light account's message that arrives between two returns
        would otherwise wait for the next one, behind the flood's work in flight (DESIGN.md: a
        flood from one must not delay the others). A flood alone, or accounts that all send
        in bulk, keep the whole window."""
        state = self.state
        reserve = self._pool.window.light_reserve
        keep = reserve if now < state.light_served_at + LIGHT_HOLD_S else 0
        entries: list[tuple[int, Entry]] = []
        self._pop_into(entries, max_batch, now, keep=keep)
        if reserve and len(entries) < max_batch:
            self._pop_into(entries, max_batch, now, light_only=True)
        return entries

    def _pop_into(
        self,
        entries: list[tuple[int, Entry]],
        max_batch: int,
        now: float,
        *,
        keep: int = 0,
        light_only: bool = False,
    ) -> None:
        """Take window slots for what `entries` lacks of `max_batch` (leaving `keep` of the
        bulk slots), fill them with bulk entries, and give back the slots left unfilled."""
        state = self.state
        window = self._pool.window
        wanted = window.take(min(state.in_memory, max_batch - len(entries)), keep=keep)
        start = len(entries)
        while len(entries) - start < wanted and (popped := state.pop_bulk_of(now, light_only)):
            entries.append(popped)
        window.release(wanted - (len(entries) - start))

    def _submit(self, batch: list[OutboundSms]) -> None:
        if batch:
            self._pool.submit(tuple(batch))
            self.dispatched += len(batch)

    async def _wait(self, seconds: float, *, window_bound: bool) -> None:
        """Until a message arrives, or (if work waits for room) the window frees a slot, or
        `seconds` pass (the next express deadline or send-rate token)."""
        with trio.move_on_after(seconds):
            if not window_bound:
                self._absorb(await self.inbox.get())
                return
            async with trio.open_nursery() as nursery:

                async def on_message() -> None:
                    self._absorb(await self.inbox.get())
                    nursery.cancel_scope.cancel()

                async def on_release() -> None:
                    await self._pool.window.wait_release()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(on_message)
                nursery.start_soon(on_release)

    async def _expire(self, now: float) -> None:
        for sms in self.state.expired_express(now):
            self.deadline_misses += 1
            await self._writer.tell(RecordOutcome(self._expired(sms)))

    async def _bodies(self, entries: list[Entry]) -> list[OutboundSms]:
        """The messages of `entries`, in order: from the body cache, the rest in one read.
        An entry whose row is no longer queued (it cannot be, but a row deleted by hand is
        not sent), or whose shard this node no longer leases, is dropped."""
        bodies = self.state.bodies
        found: dict[str, OutboundSms] = {}
        missing: list[str] = []
        for _, message_id, _ in entries:
            sms = bodies.pop(message_id, None)
            if sms is None:
                missing.append(message_id)
            else:
                found[message_id] = sms
        if missing:
            assert self._store is not None
            self.body_reads += 1
            stamp = self._stamp
            # The bodies of the next batches come along in the same read (into the cache).
            wanted = set(missing)
            ahead = [
                i
                for i in self.state.upcoming(self._prefetch, self.state.quantum)
                if i not in wanted
            ]
            while True:
                try:
                    for sms in await self._store.queued_messages([*missing, *ahead]):
                        stamped = sms if stamp is None else stamp(sms)
                        if stamped is None:
                            continue
                        if sms.id in wanted:
                            found[sms.id] = stamped
                        elif sms.id not in bodies:
                            self._cache_ahead(stamped)
                    break
                except Exception:
                    # The store is away: these are committed and only need reading; wait.
                    self.page_failures += 1
                    await trio.sleep(0.5)
        return [found[e[1]] for e in entries if e[1] in found]

    def _cache_ahead(self, sms: OutboundSms) -> None:
        """Cache a body read ahead of its batch. Its entry may have been popped meanwhile and
        its body read by its own batch, so nothing would ever take it out of the cache: the
        oldest read-ahead bodies are dropped past a bound (one still wanted is read again)."""
        bodies = self.state.bodies
        bodies[sms.id] = sms
        self.prefetched += 1
        ahead = self._ahead
        ahead[sms.id] = sms
        while len(ahead) > 4 * self._prefetch:
            old_id, old = ahead.popitem(last=False)
            if bodies.get(old_id) is old:  # not a retry's body since, which holds attempts
                del bodies[old_id]

    async def _pager(self, store: SchedulingStore) -> None:
        """Reads spilled entries back, many accounts per query, as room allows."""
        while True:
            await self._page_requests.wait()
            self._page_requests = trio.Event()
            while requests := self.state.take_page_requests(self._page_accounts):
                try:
                    pages = await store.page_entries(requests)
                except Exception:
                    for account_id, _, size in requests:
                        await self.ref.tell(Paged(account_id, (), size, ok=False))
                    await trio.sleep(0.5)
                    continue
                if self._commits is not None:
                    # Groups that committed before the query but have not told us yet go
                    # first: their Enqueue then reaches the inbox ahead of this page.
                    await self._commits.wait()
                for (account_id, _, size), rows in zip(requests, pages, strict=True):
                    await self.ref.tell(Paged(account_id, tuple(rows), size))

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
