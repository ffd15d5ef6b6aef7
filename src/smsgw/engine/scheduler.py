"""Scheduler: owns the dispatch window and hands committed messages to the ProviderPool
into it, express first, then bulk by deficit round robin (or the strategy it is given)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, assert_never

import trio

from smsgw.engine.actor import ActorRef, Inbox
from smsgw.engine.mailboxes import SchedulerState
from smsgw.engine.messages import (
    Backlog,
    BatchDone,
    Dispatch,
    DispatchFigures,
    Enqueue,
    ForgetShards,
    OutboundSms,
    Paged,
    RecordOutcome,
    SchedulerMessage,
    SendRate,
    SendShare,
    WriterMessage,
)
from smsgw.engine.ports import Entry, SchedulingStore, entry_of, slots, slots_of, stream_of
from smsgw.engine.retry import expired
from smsgw.engine.writer import CommitFence

# How long after a light account's message the window's light reserve stays kept for them.
LIGHT_HOLD_S = 5.0
# When the operators say how many segments a second they take, bulk in flight (at them and
# waiting in the pool for them) is at most this long of it: more only queues, oldest first,
# where a light account's message arriving next would wait behind all of it, and round robin
# can no longer put it first.
BULK_AHEAD_S = 1.0


class Capacity:
    """The dispatch window: how many segments may be in flight at once (like an SMPP window:
    operators count PDUs, a segment each; `ports.slots`). The Scheduler's alone: it takes
    slots as it dispatches and frees them when the pool says a batch is done (`BatchDone`).
    A message larger than the window goes when nothing else is in flight.

    `express_reserve` slots are for express messages only: bulk may fill at most
    `size - express_reserve`, so express never waits behind bulk work already in flight.
    `light_reserve` of the bulk slots are what the Scheduler keeps (`room(keep=...)`) for
    accounts with little backlog while such accounts are sending, for the same reason.
    """

    __slots__ = ("bulk_inflight", "express_reserve", "free", "light_reserve", "size")

    def __init__(self, size: int, express_reserve: int = 0, light_reserve: int = 0) -> None:
        if not 0 <= express_reserve < size:
            raise ValueError("express_reserve must leave bulk at least one slot")
        if not 0 <= light_reserve < size - express_reserve:
            raise ValueError("light_reserve must leave the heaviest account at least one slot")
        self.size = size
        self.express_reserve = express_reserve
        self.light_reserve = light_reserve
        self.free = size
        self.bulk_inflight = 0

    @property
    def express_inflight(self) -> int:
        return self.size - self.free - self.bulk_inflight

    def fits(self, need: int, room: int, *, express: bool = False, first: bool = False) -> bool:
        """Whether a message of `need` slots may go with `room` left for it: it fits, or it
        is larger than the window and goes alone (the `first` this round, with nothing of its
        kind in flight)."""
        if need <= room:
            return True
        idle = self.free == self.size if express else self.bulk_inflight == 0
        return first and idle and room > 0

    def room(self, *, express: bool = False, keep: int = 0) -> int:
        """Slots free for an express batch, or for a bulk one that leaves `keep` of the bulk
        slots free."""
        if express:
            return self.free
        return max(0, min(self.free, self.size - self.express_reserve - keep - self.bulk_inflight))

    def take(self, count: int, *, express: bool = False) -> None:
        """Take `count` slots of `room`."""
        self.free -= count
        if not express:
            self.bulk_inflight += count

    def release(self, count: int, *, express: bool = False) -> None:
        self.free += count
        if not express:
            self.bulk_inflight -= count
        if self.free > self.size or self.bulk_inflight < 0:
            raise RuntimeError(f"window over-released: {self.free} free of {self.size}")


class Scheduler:
    """Takes committed messages in, hands them to the ProviderPool as its window frees up.

    Express first, in their own batches, into the window's reserve as well as its shared part;
    then bulk, by deficit round robin, into the shared part only. Each batch is one `Dispatch`
    to the pool, whose `BatchDone` frees its slots. An express message whose deadline passes
    while it waits is failed (`deadline_exceeded`, refunded), never sent late.
    Bulk entries paged back from PostgreSQL (and any whose body did not fit in the cache) get
    their bodies in one read per batch.

    The state survives a restart of the run loop: it is accepted work, not a cache.
    """

    def __init__(
        self,
        inbox: Inbox[SchedulerMessage],
        pool: ActorRef[Dispatch],
        writer: ActorRef[WriterMessage],
        capacity: Capacity,
        *,
        max_batch: int = 64,
        clock: Callable[[], float] = time.time,
        store: SchedulingStore | None = None,
        state: SchedulerState | None = None,
        page_accounts: int = 500,
        prefetch: int = 1_000,
        commits: CommitFence | None = None,
        stamp: Callable[[OutboundSms], OutboundSms | None] | None = None,
        held: Callable[[OutboundSms], bool] | None = None,
        operator_rate: Callable[[], float] | None = None,
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
        self.capacity = capacity
        self._max_batch = max_batch  # messages per Dispatch
        self._writer = writer
        self._clock = clock
        self._store = store
        self._page_accounts = page_accounts
        self._prefetch = prefetch
        self._commits = commits
        # Among several nodes: a body read from the store gets its shard's fencing token, or
        # is dropped (None) when this node no longer leases the shard; its owner recovers it.
        self._stamp = stamp
        # Among several nodes: whether a stamped message's shard is still leased here under
        # the token it carries (ShardLeases.still_held). One that is not (a retry whose shard
        # left while it waited) is not queued: its shard's owner has it from the store, and
        # queued here it would move its stream's cursor for a shard that is not this node's.
        self._held = held
        self.left_behind = 0  # messages not queued for that reason, and entries forgotten
        # Segments a second the operators take now (the pool's published figure; 0: unknown).
        self._operator_rate = operator_rate
        self._page_requests = trio.Event()
        self.dispatched = 0
        self.deadline_misses = 0  # express messages that expired waiting here
        self.pages = 0
        self.paged_entries = 0
        self.body_reads = 0
        self.prefetched = 0  # bodies read ahead of their batch
        self._ahead: OrderedDict[str, OutboundSms] = OrderedDict()
        self._not_here: set[str] = set()  # read ahead, found not to be sent from here
        self.page_failures = 0
        # What others read of the Scheduler (HTTP, metrics, admission), refreshed each round.
        self.figures = DispatchFigures()
        self._publish()

    def _publish(self) -> None:
        state = self.state
        capacity = self.capacity
        self.figures = DispatchFigures(
            express_waiting=len(state.express),
            express_waiting_slots=state.express_slots,
            bulk_waiting=state.bulk_size,
            bulk_in_store=state.spilled,
            active_accounts=state.accounts_waiting,
            dispatched=self.dispatched,
            deadline_misses=self.deadline_misses,
            window=capacity.size,
            inflight=capacity.size - capacity.free,
            express_inflight=capacity.express_inflight,
            express_reserve=capacity.express_reserve,
            light_reserve=capacity.light_reserve,
            light_reserve_kept_until=state.light_served_at + LIGHT_HOLD_S
            if capacity.light_reserve
            else -math.inf,
        )

    def stats(self) -> dict[str, Any]:
        """The status page's figures: the published ones, the largest backlogs and the
        paging's counters."""
        figures = self.figures
        state = self.state
        return {
            "active_accounts": figures.active_accounts,
            "bulk_backlog": figures.bulk_waiting,
            "bulk_in_memory": figures.bulk_waiting - figures.bulk_in_store,
            "bulk_in_store": figures.bulk_in_store,
            "express_backlog": figures.express_waiting,
            "largest_backlogs": [
                {"account_id": a, "backlog": n} for a, n in self.largest_backlogs(10)
            ],
            "dispatched": figures.dispatched,
            "window": figures.window,
            "inflight": figures.inflight,
            "express_inflight": figures.express_inflight,
            "express_reserve": figures.express_reserve,
            "light_reserve": figures.light_reserve,
            "express_deadline_misses": figures.deadline_misses,
            "paced_accounts": len(state.buckets),
            "pages": self.pages,
            "paged_entries": self.paged_entries,
            "page_failures": self.page_failures,
            "body_reads": self.body_reads,
            "bodies_prefetched": self.prefetched,
            "bodies_cached": len(state.bodies),
            "left_behind": self.left_behind,
        }

    # --- what the Scheduler answers when asked (synchronously: one thread, no await) ------

    def backlog(self, account_id: int) -> int:
        """Bulk messages of `account_id` waiting here (in memory or counted in the store)."""
        return self.state.backlog(account_id)

    def largest_backlogs(self, n: int) -> list[tuple[int, int]]:
        """The `n` accounts with the most bulk waiting: (account, messages), largest first."""
        return [(a, count) for count, a in self.state.largest_backlogs(n)]

    def send_rate(self, account_id: int) -> float | None:
        """The pace `account_id`'s bulk is dispatched at (messages a second; None: unpaced)."""
        return self.state.send_rates.get(account_id)

    def unheld(self, items: Iterable[OutboundSms]) -> list[OutboundSms]:
        """The messages of `items` that are not waiting here (`SchedulerState.unheld`)."""
        return self.state.unheld(items)

    def _absorb(self, message: SchedulerMessage) -> None:
        match message:
            case Enqueue(items=items):
                held = self._held
                for sms in items:
                    if held is None or sms.fence is None or held(sms):
                        self.state.push(sms)
                    else:
                        self.left_behind += 1
            case Backlog(counts=counts):
                for key, count in counts:
                    self.state.add_backlog(key, count)
            case ForgetShards(shards=shards):
                self.left_behind += self.state.forget_shards(frozenset(shards))
            case Paged(key=key, rows=rows, size=size, ok=ok):
                if ok:
                    self.pages += 1
                    self.paged_entries += len(rows)
                    self.state.paged(key, rows, size)
                else:
                    self.page_failures += 1
                    self.state.page_failed(key)
            case SendRate(account_id=account_id, rate=rate):
                self.state.set_send_rate(account_id, rate, self._clock())
            case SendShare(account_id=account_id, share=share):
                self.state.set_share(account_id, share, self._clock())
            case BatchDone(slots=slots, express=express):
                self.capacity.release(slots, express=express)
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
        cached: list[OutboundSms] = []
        uncached: list[tuple[int, Entry]] = []
        for key, entry in entries:
            sms = self._take_body(entry[1])
            if sms is None:
                uncached.append((key, entry))
            else:
                cached.append(sms)
        self._submit(cached)
        if uncached:
            nursery.start_soon(self._read_and_submit, uncached)

    async def _read_and_submit(self, entries: list[tuple[int, Entry]]) -> None:
        try:
            batch = await self._bodies([entry for _, entry in entries])
        except BaseException:
            # Cancelled (the run loop is restarting): the entries go back, slots too.
            for key, entry in entries:
                self.state.put_back(key, entry)
            self.capacity.release(_entry_slots(entries))
            raise
        self._submit(batch)
        if len(batch) < len(entries):
            # The slots of messages not sent after all (no longer queued, or of a shard this
            # node no longer leases) come back as a batch's do, waking the dispatch loop.
            unsent = _entry_slots(entries) - slots_of(batch)
            await self.ref.tell(BatchDone(unsent, express=False))
        self._publish()

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        state = self.state
        capacity = self.capacity
        max_batch = self._max_batch
        while True:
            # Dispatch avoids a task switch per message; this yields once per batch so that
            # HTTP and the other actors get the loop back.
            await trio.lowlevel.checkpoint()
            self._drain()
            now = self._clock()
            await self._expire(now)
            progressed = False
            if state.express:
                room = capacity.room(express=True)
                batch: list[OutboundSms] = []
                taken = 0
                while state.express and len(batch) < max_batch:
                    need = slots(state.express[0][2].segments)
                    if not capacity.fits(need, room - taken, express=True, first=not batch):
                        break
                    sms = state.pop_express()
                    assert sms is not None
                    batch.append(sms)
                    taken += need
                if batch:
                    capacity.take(taken, express=True)
                    self._submit(batch)
                    progressed = True
            if state.bulk_ready():
                entries = self._pop_bulk(max_batch, now)
                if entries:
                    self._dispatch_bulk(nursery, entries)
                    progressed = True
            self._publish()
            if progressed:
                continue
            timeout = min(state.next_deadline(), state.next_ready(now)) - now
            await self._wait(max(0.0, timeout))

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
        reserve = self.capacity.light_reserve
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
        """Fill what `entries` lacks of `max_batch` with bulk entries, as far as the window has
        room (leaving `keep` of the bulk slots), and take their slots."""
        state = self.state
        capacity = self.capacity
        room = capacity.room(keep=keep)
        rate = self._operator_rate() if self._operator_rate is not None else 0.0
        if rate > 0:
            ahead = max(max_batch, int(rate * BULK_AHEAD_S))
            room = min(room, ahead - capacity.bulk_inflight)
        wanted = min(state.in_memory, max_batch - len(entries))
        taken = 0
        for _ in range(wanted):
            left = room - taken
            # A message larger than the window goes alone (`Capacity.fits`): offered it all.
            offer = math.inf if capacity.fits(1 << 30, left, first=not taken) else left
            popped = state.pop_bulk_of(now, light_only, offer)
            if popped is None:
                break
            entries.append(popped)
            taken += slots(popped[1][2])
        capacity.take(taken)

    def _submit(self, batch: list[OutboundSms]) -> None:
        """Send `batch` (its slots taken) to the pool. Its inbox holds at most one batch per
        slot of the window, so it is never full."""
        if batch:
            self._pool.tell_nowait(Dispatch(tuple(batch)))
            self.dispatched += len(batch)

    async def _wait(self, seconds: float) -> None:
        """Until new work arrives, or a batch is done (its slots free) while work waits for
        room, or `seconds` pass (the next express deadline or send-rate token). A batch done
        while nothing waits only frees its slots: a dispatch round for it would find nothing
        to do, and with light traffic every batch would cost one."""
        with trio.move_on_after(seconds):
            while True:
                message = await self.inbox.get()
                self._absorb(message)
                if not isinstance(message, BatchDone) or self.state:
                    return
                self._publish()  # the window's figures, which express admission reads

    async def _expire(self, now: float) -> None:
        for sms in self.state.expired_express(now):
            self.deadline_misses += 1
            await self._writer.tell(RecordOutcome(expired(sms, self._clock())))

    async def _bodies(self, entries: list[Entry]) -> list[OutboundSms]:
        """The messages of `entries`, in order: from the body cache, the rest in one read.
        An entry whose row is no longer queued (it cannot be, but a row deleted by hand is
        not sent), or whose shard this node no longer leases, is dropped."""
        bodies = self.state.bodies
        found: dict[str, OutboundSms] = {}
        missing: list[str] = []
        not_here = self._not_here
        for _, message_id, _ in entries:
            sms = self._take_body(message_id)
            if sms is None:
                missing.append(message_id)
            else:
                found[message_id] = sms
        if missing:
            assert self._store is not None
            self.body_reads += 1
            stamp = self._stamp
            # The bodies of the next batches come along in the same read (into the cache), as
            # many as the read-ahead bodies still waiting leave room for. Reading `prefetch`
            # more each time pushed out of the cache, once more accounts waited than that,
            # the bodies read for the very next batches: they missed in turn, and each read
            # brought a few bodies wanted and `prefetch` to be thrown away.
            wanted = set(missing)
            self._drop_stale_ahead()
            room = self._prefetch - len(self._ahead)
            ahead = (
                [
                    i
                    for i in self.state.upcoming(room, self.state.quantum, not_here)
                    if i not in wanted
                ]
                if room > 0
                else []
            )
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
                    # Read ahead and not cached: of a shard this node no longer leases, or no
                    # longer queued. Not asked for again until its own batch comes (which
                    # drops it): a node that gave up half its shards asked for the same
                    # thousand such bodies in every read.
                    not_here.update(i for i in ahead if i not in bodies)
                    if len(not_here) > 100 * self._prefetch:  # a bound, should any be missed
                        not_here.clear()
                    break
                except Exception:
                    # The store is away: these are committed and only need reading; wait.
                    self.page_failures += 1
                    await trio.sleep(0.5)
        return [found[e[1]] for e in entries if e[1] in found]

    def _take_body(self, message_id: str) -> OutboundSms | None:
        """The cached body of a message being dispatched, taken out of the cache (None: not
        cached). Its batch has come: whatever a read ahead found of it no longer counts."""
        self._not_here.discard(message_id)
        sms = self.state.bodies.pop(message_id, None)
        if sms is not None:
            self._ahead.pop(message_id, None)
        return sms

    def _drop_stale_ahead(self) -> None:
        """Drop the oldest read-ahead bodies whose messages are no longer waiting here (sent
        with a body their own batch read meanwhile, or gone with their shard), until one
        still is: those would take the room of bodies wanted."""
        bodies, ahead, mailboxes = self.state.bodies, self._ahead, self.state.mailboxes
        while ahead:
            message_id, sms = next(iter(ahead.items()))
            mailbox = mailboxes.get(stream_of(sms))
            if mailbox is not None and mailbox.queue and mailbox.queue[0] <= entry_of(sms):
                return
            del ahead[message_id]
            if bodies.get(message_id) is sms:
                del bodies[message_id]

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
                    for key, _, size in requests:
                        await self.ref.tell(Paged(key, (), size, ok=False))
                    await trio.sleep(0.5)
                    continue
                if self._commits is not None:
                    # Groups that committed before the query but have not told us yet go
                    # first: their Enqueue then reaches the inbox ahead of this page.
                    await self._commits.wait()
                for (key, _, size), rows in zip(requests, pages, strict=True):
                    await self.ref.tell(Paged(key, tuple(rows), size))


def _entry_slots(entries: Iterable[tuple[int, Entry]]) -> int:
    """The window slots of bulk `entries` (their segments, `ports.slots`)."""
    return sum(slots(entry[2]) for _, entry in entries)
