"""What waits for dispatch: the express lane and the account mailboxes (pure state).

A mailbox holds one stream (`ports.stream_key`): an account's bulk under one dispatch shard.
On a node that is nearly always one mailbox per account, keyed by the account id; an account
whose shard another node leases has its bulk accepted here in a second stream, under this
node's home shard, which is paged on its own (engine/shards.py says why). `key` below is a
mailbox's stream key; fairness, bounds and cursors are per mailbox, send rates per account.

`SchedulerState` serves bulk by deficit round robin; `FifoState`, the baseline the fairness
benchmark compares it with, in arrival order. The Scheduler (engine/scheduler.py) is given
one of them where the node is built.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Container, Iterable, Sequence

from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import (
    Entry,
    Position,
    entry_of,
    micros,
    slots,
    stream_account,
    stream_of,
    stream_parts,
)
from smsgw.engine.ratelimit import TokenBucket

START: Position = (-1, "")  # before every message


# How many of the newest mailboxes a pop for the light reserve looks at: bounded work per
# batch however many heavy accounts wait (a light account's mailbox is new: it is made
# with its message and goes to the end of the ring).
LIGHT_SCAN = 64


class Mailbox:
    """One account's bulk work: entries in memory, and how many more wait in the store."""

    __slots__ = ("deficit", "during", "heavy", "paging", "queue", "spilled", "stale", "turn")

    def __init__(self) -> None:
        self.queue: deque[Entry] = deque()
        self.deficit = 0
        self.turn = False  # has it had its quantum for the current visit?
        self.spilled = 0  # messages in the store after the account's cursor, not in memory
        self.paging = False  # a page query for it is out
        self.during: list[Entry] = []  # spilled while that query was out
        self.stale = False  # forgotten while that query was out: its page is dropped
        # Has it had more than `light_backlog` waiting since it last had none? A light
        # account's mailbox is made and dropped with each of its few messages.
        self.heavy = False

    def idle(self) -> bool:
        return not self.queue and not self.spilled and not self.paging


# The refill rate of a paused account's bucket (a token in about 30 years).
PAUSED_RATE = 1e-9


class SchedulerState:
    """Which message goes next. Pure: no I/O; the caller passes the time.

    Express: one lane for all accounts, earliest deadline first, always before bulk. Express
    messages carry their bodies (they are few, and a store read would cost their deadline).

    Bulk: deficit round robin over the accounts with work. Each visit gives an account
    `quantum` segments of credit; it is served while its next message fits in its credit, then
    the next account's turn begins. With `quantum` at least the largest message, every account
    with work is served in every round, and over any stretch of rounds the segments served to
    two backlogged accounts differ by at most one quantum: a flood of a million messages costs
    a light account one turn of waiting, not a million.

    Memory is bounded: an account keeps at most `account_bound` entries in memory and all
    accounts together `memory_bound` (each new mailbox may take its first entry past it). A
    message past the bound is only counted (`spilled`); it is in PostgreSQL already (it was
    committed before it got here), and `page_wanted` names the accounts whose next entries
    should be read back, after the account's cursor: the newest position that ever entered
    memory for it. Every message at or before the cursor entered memory once (and is queued,
    in flight, waiting for a retry, or done); every message after it is in the store and not
    anywhere else. That is what makes paging exact: nothing is read back twice, or missed.

    Send rates: an account with a rate (messages a second) is skipped while its token bucket
    is empty, keeping its deficit; its work waits, it is never refused.
    """

    def __init__(
        self,
        *,
        quantum: int = 10,
        account_bound: int | None = None,
        memory_bound: int | None = None,
        body_budget: int | None = None,
        page_size: int = 500,
        light_backlog: int = 10,
    ) -> None:
        if quantum < 1:
            raise ValueError("quantum must be at least 1 segment")
        self.quantum = quantum
        self.account_bound = account_bound if account_bound is not None else math.inf
        self.memory_bound = memory_bound if memory_bound is not None else math.inf
        self.body_budget = body_budget if body_budget is not None else math.inf
        self.page_size = page_size
        self.mailboxes: dict[int, Mailbox] = {}
        # account -> the keys of its mailboxes other than its own shard's (usually none)
        self.streams: dict[int, set[int]] = {}
        self.ring: deque[int] = deque()  # accounts with bulk work, in serving order
        self.cursors: dict[int, Position] = {}
        # An ordered set, taken from the front: popitem(last=False) is O(1), where copying a
        # plain dict's keys on every take costs O(accounts waiting) while memory is full.
        self.page_wanted: OrderedDict[int, None] = OrderedDict()
        self.express: list[tuple[float, int, OutboundSms]] = []
        self.express_slots = 0  # the express lane's messages in window slots (segments)
        self.bodies: dict[str, OutboundSms] = {}  # bulk bodies kept while there is room
        self.send_rates: dict[int, float] = {}
        self.send_shares: dict[int, float] = {}  # this node's of each paced account (1: all)
        self.buckets: dict[int, TokenBucket] = {}
        self._seq = 0
        self.in_memory = 0  # bulk entries in mailboxes
        self.spilled = 0  # bulk messages counted but only in the store
        # Light accounts: at most this many bulk messages waiting since they last had none
        # (the window's light reserve is theirs); `light_served_at`: when one was last served.
        self.light_backlog = light_backlog
        self.light_served_at = -math.inf

    # --- sizes ---------------------------------------------------------------------------

    @property
    def bulk_size(self) -> int:
        return self.in_memory + self.spilled

    def __len__(self) -> int:
        return self.bulk_size + len(self.express)

    @property
    def accounts_waiting(self) -> int:
        """Accounts with bulk waiting here (an account with several streams counts once)."""
        extra = 0
        for account_id, keys in self.streams.items():
            extra += len(keys) - (account_id not in self.mailboxes)
        return len(self.mailboxes) - extra

    def backlog(self, account_id: int) -> int:
        """The account's bulk waiting here, in all its streams."""
        mailboxes = self.mailboxes
        total = 0
        for key in (account_id, *self.streams.get(account_id, ())):
            mailbox = mailboxes.get(key)
            if mailbox is not None:
                total += len(mailbox.queue) + mailbox.spilled
        return total

    def largest_backlogs(self, n: int) -> list[tuple[int, int]]:
        """The `n` largest backlogs as (messages, account), each account's streams summed."""
        if not self.streams:  # one stream an account, as nearly always
            return heapq.nlargest(
                n, ((len(m.queue) + m.spilled, a) for a, m in self.mailboxes.items())
            )
        by_account: dict[int, int] = {}
        for key, m in self.mailboxes.items():
            account_id = stream_account(key)
            by_account[account_id] = by_account.get(account_id, 0) + len(m.queue) + m.spilled
        return heapq.nlargest(n, ((size, a) for a, size in by_account.items()))

    # --- settings ------------------------------------------------------------------------

    def set_send_rate(self, account_id: int, rate: float | None, now: float) -> None:
        """Pace `account_id`'s bulk dispatch at `rate` messages a second, all its streams
        together, times this node's share of it (`set_share`) (None: no limit; 0: none at
        all, a suspended account: its work waits in its mailboxes and in the store)."""
        if rate is None:
            self.send_rates.pop(account_id, None)
            self.send_shares.pop(account_id, None)
            self.buckets.pop(account_id, None)
            return
        if self.send_rates.get(account_id) == rate:
            return
        self.send_rates[account_id] = rate
        self._tune(account_id, now)

    def set_share(self, account_id: int, share: float, now: float) -> None:
        """This node's share (0 to 1) of a paced account's rate: the nodes that hold some of
        its bulk split the rate between them (engine/shares.py). Ignored for an unpaced one."""
        if account_id not in self.send_rates or self.send_shares.get(account_id, 1.0) == share:
            return
        self.send_shares[account_id] = share
        self._tune(account_id, now)

    def _tune(self, account_id: int, now: float) -> None:
        """The account's bucket at its rate times its share. What was spent stays spent, and
        new figures grant nothing: a bucket keeps its tokens (at most the new burst); only a
        paused (suspended) account's resumes with a full burst."""
        rate = self.send_rates[account_id] * self.send_shares.get(account_id, 1.0)
        old = self.buckets.get(account_id)
        if rate <= 0:
            # An empty bucket that would take decades to fill: never ready, and `next_ready`
            # does not wake the dispatch loop for it.
            self.buckets[account_id] = TokenBucket(PAUSED_RATE, 1.0, 0.0, now)
            return
        # Bursts of up to one second's worth (at least one message).
        bucket = TokenBucket.start(rate, max(1.0, rate), now)
        if old is not None and old.rate != PAUSED_RATE:
            old.refill(now)
            bucket.tokens = min(bucket.burst, old.tokens)
        self.buckets[account_id] = bucket

    # --- arrivals ------------------------------------------------------------------------

    def push(self, sms: OutboundSms) -> None:
        """A committed message (new, recovered or back for a retry) to dispatch."""
        if sms.express:
            self._seq += 1
            deadline = sms.deadline if sms.deadline is not None else math.inf
            heapq.heappush(self.express, (deadline, self._seq, sms))
            self.express_slots += slots(sms.segments)
            return
        entry = entry_of(sms)
        key = stream_of(sms)
        if self._place(key, entry) and (sms.attempts or len(self.bodies) < self.body_budget):
            # A retry keeps its body whatever the budget: its attempts are only here.
            self.bodies[sms.id] = sms
        if sms.attempts:
            # A retry is not an account sending a little: with the operators failing a few
            # percent of a heavy load, retries alone would keep the light reserve (and a tenth
            # of the window) from the bulk senders.
            self.mailboxes[key].heavy = True

    def _mailbox(self, key: int) -> Mailbox:
        mailbox = self.mailboxes.get(key)
        if mailbox is None:
            mailbox = self.mailboxes[key] = Mailbox()
            self._enter_ring(key)
            account_id = stream_account(key)
            if account_id != key:
                self.streams.setdefault(account_id, set()).add(key)
        return mailbox

    def _forget(self, key: int) -> None:
        """Drop an idle mailbox (the caller takes it out of the ring)."""
        del self.mailboxes[key]
        account_id = stream_account(key)
        if account_id != key:
            others = self.streams[account_id]
            others.discard(key)
            if not others:
                del self.streams[account_id]

    def _enter_ring(self, key: int) -> None:
        """A mailbox was made: it takes its turn at the end of the round."""
        self.ring.append(key)

    def _leave_ring(self, key: int) -> None:
        """A mailbox was dropped elsewhere than at the front of the ring."""
        self.ring.remove(key)

    def _place(self, key: int, entry: Entry) -> bool:
        """Put `entry` in memory (True) or count it as spilled (False)."""
        mailbox = self._mailbox(key)
        if not mailbox.heavy and len(mailbox.queue) + mailbox.spilled >= self.light_backlog:
            mailbox.heavy = True  # this entry takes it past the light backlog
        position = (entry[0], entry[1])
        cursor = self.cursors.get(key, START)
        if position <= cursor:
            # It entered memory before (a retry, an orphan of the pool) or committed late,
            # behind the cursor: no page query would ever return it.
            self._remember(key, mailbox, entry)
            return True
        if mailbox.spilled or mailbox.paging:
            # Older messages of this account are in the store only: this one waits its turn
            # there too, or it would overtake them.
            self._spill(key, mailbox, entry)
            return False
        if mailbox.queue and (
            len(mailbox.queue) >= self.account_bound or self.in_memory >= self.memory_bound
        ):
            self._spill(key, mailbox, entry)
            return False
        self._remember(key, mailbox, entry)
        return True

    def _remember(self, key: int, mailbox: Mailbox, entry: Entry) -> None:
        mailbox.queue.append(entry)
        self.in_memory += 1
        position = (entry[0], entry[1])
        if position > self.cursors.get(key, START):
            self.cursors[key] = position

    def _spill(self, key: int, mailbox: Mailbox, entry: Entry) -> None:
        mailbox.spilled += 1
        self.spilled += 1
        if mailbox.paging:
            mailbox.during.append(entry)
        elif len(mailbox.queue) <= self._low_water():
            self.page_wanted[key] = None

    def _low_water(self) -> float:
        return self.account_bound / 2 if self.account_bound != math.inf else 0

    def add_backlog(self, key: int, count: int) -> None:
        """`count` bulk messages of this account wait in the store after its cursor (recovery:
        all of its pending messages, from the start)."""
        if count <= 0:
            return
        mailbox = self._mailbox(key)
        mailbox.spilled += count
        self.spilled += count
        if len(mailbox.queue) + mailbox.spilled > self.light_backlog:
            mailbox.heavy = True
        if not mailbox.paging:
            self.page_wanted[key] = None

    # --- paging --------------------------------------------------------------------------

    def take_page_requests(self, limit: int) -> list[tuple[int, Position, int]]:
        """Up to `limit` (account, cursor, how many) page queries to run now, within the
        memory bound; each account is marked as paging until `paged` is called for it."""
        requests: list[tuple[int, Position, int]] = []
        room = self.memory_bound - self.in_memory
        while self.page_wanted and len(requests) < limit and room > 0:
            key, _ = self.page_wanted.popitem(last=False)
            mailbox = self.mailboxes.get(key)
            if mailbox is None or not mailbox.spilled or mailbox.paging:
                continue
            free = self.account_bound - len(mailbox.queue)
            # One more than counted: a page that comes back that full says the count was low
            # (see `paged`), at no extra query when it is right.
            size = int(min(self.page_size, free, room, mailbox.spilled + 1))
            if size <= 0:
                continue
            mailbox.paging = True
            room -= size
            requests.append((key, self.cursors.get(key, START), size))
        return requests

    def paged(self, key: int, rows: Sequence[Entry], size: int) -> None:
        """The answer to a page query: up to `size` entries after the cursor, in order."""
        mailbox = self.mailboxes.get(key)
        if mailbox is None or not mailbox.paging:
            return  # cannot happen: a paging mailbox is never dropped
        if mailbox.stale:
            # Read for streams forgotten meanwhile (`forget_shards`): dropped as a failed page
            # is. What was counted since (the shard came back) is paged from the start.
            self.page_failed(key)
            return
        mailbox.paging = False
        during, mailbox.during = mailbox.during, []
        got = {row[1] for row in rows}
        for row in rows:
            self._remember(key, mailbox, row)
        cursor = self.cursors.get(key, START)
        beyond = 0
        for entry in during:
            if entry[1] in got:
                continue
            if (entry[0], entry[1]) <= cursor:
                # Committed after the query's snapshot but before its last row.
                self._remember(key, mailbox, entry)
                self._unspill(mailbox, 1)
            else:
                beyond += 1
        self._unspill(mailbox, len(rows))
        if len(rows) < size:
            # The store had nothing more after the last row when it was read: what is left is
            # what arrived meanwhile beyond it.
            self._unspill(mailbox, mailbox.spilled - beyond)
        elif not mailbox.spilled:
            # A full page, and the count says nothing is left: the count is low. That happens
            # when a page sees a committed message before the Scheduler was told of it (a
            # hand-off from another node still on its way), which the count never included.
            # Keep one in the count so the next page looks; only a short page ends the backlog,
            # so no committed message is left in the store uncounted.
            mailbox.spilled = 1
            self.spilled += 1
        if mailbox.spilled and len(mailbox.queue) <= self._low_water():
            self.page_wanted[key] = None
        if mailbox.idle():
            self._drop(key)

    def forget_shards(self, shards: Container[int]) -> int:
        """Forget the bulk streams of `shards` (they left this node, or were just leased and
        are about to be recovered: `messages.ForgetShards`): their entries in memory (and
        cached bodies), their counts in the store, their paging cursors. A recovery's counts
        then page each stream from the start. A page query out for one of them is dropped when
        it comes back (`Mailbox.stale`). Returns how many entries were dropped from memory."""
        dropped = 0
        gone: set[int] = set()
        for key, mailbox in list(self.mailboxes.items()):
            if stream_parts(key)[1] not in shards:
                continue
            for entry in mailbox.queue:
                self.bodies.pop(entry[1], None)
            dropped += len(mailbox.queue)
            self.in_memory -= len(mailbox.queue)
            self.spilled -= mailbox.spilled
            mailbox.queue.clear()
            mailbox.spilled = 0
            mailbox.during = []
            mailbox.deficit = 0
            mailbox.turn = False
            self.page_wanted.pop(key, None)
            if mailbox.paging:
                mailbox.stale = True
            else:
                self._forget(key)
                gone.add(key)
        if gone:
            self._leave_ring_all(gone)
        for key in [k for k in self.cursors if stream_parts(k)[1] in shards]:
            del self.cursors[key]
        return dropped

    def _leave_ring_all(self, keys: set[int]) -> None:
        """Mailboxes dropped in numbers (`forget_shards`): one pass over the ring."""
        self.ring = deque(k for k in self.ring if k not in keys)

    def page_failed(self, key: int) -> None:
        """A page query failed (or read for a forgotten stream, `Mailbox.stale`): nothing was
        read; the entries spilled meanwhile stay counted."""
        mailbox = self.mailboxes.get(key)
        if mailbox is None:
            return
        mailbox.paging = False
        mailbox.during = []
        if mailbox.stale:
            mailbox.stale = False
            if mailbox.idle():
                self._drop(key)
                return
        if mailbox.spilled:
            self.page_wanted[key] = None

    def reset_paging(self) -> None:
        """Forget queries that were out when the run loop died; they are asked again."""
        for key, mailbox in self.mailboxes.items():
            if mailbox.paging:
                self.page_failed(key)

    def _unspill(self, mailbox: Mailbox, n: int) -> None:
        n = max(0, min(n, mailbox.spilled))
        mailbox.spilled -= n
        self.spilled -= n

    def _drop(self, key: int) -> None:
        self._forget(key)
        self._leave_ring(key)
        self.page_wanted.pop(key, None)

    # --- dispatch ------------------------------------------------------------------------

    def pop(self, now: float) -> OutboundSms | Entry | None:
        """The next message: the earliest express deadline, else the next bulk entry."""
        if self.express:
            return self.pop_express()
        return self.pop_bulk(now)

    def pop_express(self) -> OutboundSms | None:
        if not self.express:
            return None
        sms = heapq.heappop(self.express)[2]
        self.express_slots -= slots(sms.segments)
        return sms

    def expired_express(self, now: float) -> list[OutboundSms]:
        """Take the express messages whose deadline has passed (the earliest are on top)."""
        expired = []
        while self.express and self.express[0][0] <= now:
            sms = heapq.heappop(self.express)[2]
            self.express_slots -= slots(sms.segments)
            expired.append(sms)
        return expired

    def next_deadline(self) -> float:
        return self.express[0][0] if self.express else math.inf

    def pop_bulk(self, now: float) -> Entry | None:
        """The next bulk entry by deficit round robin, or None when no account with work is
        ready (its entries are still in the store, or its send rate holds it back)."""
        popped = self.pop_bulk_of(now)
        return None if popped is None else popped[1]

    def pop_bulk_of(
        self, now: float, light_only: bool = False, room: float = math.inf
    ) -> tuple[int, Entry] | None:
        """`pop_bulk`, with the account the entry is of. With `light_only`, see `_pop_light`.
        None too when the entry whose turn it is needs more than `room` window slots (its
        segments, `ports.slots`): it waits for them, first in line."""
        if light_only:
            return self._pop_light(now, room)
        ring = self.ring
        unready = 0
        while unready < len(ring):
            key = ring[0]
            mailbox = self.mailboxes[key]
            bucket = self.buckets.get(stream_account(key))
            if not mailbox.queue or (bucket is not None and bucket.wait(now) > 0):
                # Not ready: its turn passes without credit, keeping what it had.
                mailbox.turn = False
                ring.rotate(-1)
                unready += 1
                continue
            if not mailbox.turn:
                mailbox.turn = True
                mailbox.deficit += self.quantum
            entry = mailbox.queue[0]
            if slots(entry[2]) > room:
                return None
            if entry[2] > mailbox.deficit:
                # Its credit for this visit is spent: the next account's turn.
                mailbox.turn = False
                ring.rotate(-1)
                unready = 0
                continue
            mailbox.queue.popleft()
            mailbox.deficit -= entry[2]
            if not mailbox.heavy:
                self.light_served_at = now
            if self._taken(key, mailbox, bucket, now, entry):
                ring.popleft()
            elif not mailbox.queue:
                ring.rotate(-1)
            return key, entry
        return None

    def _taken(
        self,
        key: int,
        mailbox: Mailbox,
        bucket: TokenBucket | None,
        now: float,
        entry: Entry,
    ) -> bool:
        """What follows `entry` leaving `mailbox` for dispatch; True when the mailbox is idle
        now and was dropped (the caller takes it out of the ring). A send rate counts segments,
        as operators do: a long message spends a token each (more than the bucket holds puts
        it in debt, which the next message waits out)."""
        self.in_memory -= 1
        if bucket is not None:
            bucket.spend(now, slots(entry[2]))
        if not mailbox.queue:
            # Nothing left in memory: the turn ends, and DRR's credit does not carry over a
            # gap in the account's backlog.
            mailbox.turn = False
            mailbox.deficit = 0
            if mailbox.idle():
                self._forget(key)
                return True
            if mailbox.spilled and not mailbox.paging:
                self.page_wanted[key] = None
        elif mailbox.spilled and not mailbox.paging and len(mailbox.queue) <= self._low_water():
            self.page_wanted[key] = None
        return False

    def _pop_light(self, now: float, room: float) -> tuple[int, Entry] | None:
        """The next entry of a light account (see Mailbox.heavy) among the newest LIGHT_SCAN
        mailboxes, oldest first, for the window's light reserve. Outside round robin: the
        ring's order and every deficit stay as they are (a light account has little to
        send, and this is the reserve's, not the round's, share of the window)."""
        ring = self.ring
        size = len(ring)
        for i in range(max(0, size - LIGHT_SCAN), size):
            key = ring[i]
            mailbox = self.mailboxes[key]
            if mailbox.heavy or not mailbox.queue or slots(mailbox.queue[0][2]) > room:
                continue
            bucket = self.buckets.get(stream_account(key))
            if bucket is not None and bucket.wait(now) > 0:
                continue
            entry = mailbox.queue.popleft()
            self.light_served_at = now
            if self._taken(key, mailbox, bucket, now, entry):
                del ring[i]
            return key, entry
        return None

    def put_back(self, key: int, entry: Entry) -> None:
        """An entry popped but not dispatched after all (its dispatch was cancelled): it goes
        back in memory (it is at or before its account's cursor, so no page would return it)."""
        self._remember(key, self._mailbox(key), entry)

    def next_ready(self, now: float) -> float:
        """When a paced account will have a token again (inf if none is waiting on one)."""
        soonest = math.inf
        mailboxes = self.mailboxes
        for account_id, bucket in self.buckets.items():
            for key in (account_id, *self.streams.get(account_id, ())):
                mailbox = mailboxes.get(key)
                if mailbox is not None and mailbox.queue:
                    soonest = min(soonest, now + bucket.wait(now))
                    break
        return soonest

    def bulk_ready(self) -> bool:
        return self.in_memory > 0

    def upcoming(
        self, limit: int, per_account: int, skip: Container[str] = frozenset()
    ) -> list[str]:
        """Ids of entries likely to be served soon whose bodies are not cached, nor in `skip`:
        the first `per_account` of each mailbox in serving order, up to `limit`. What a body
        read takes along, so that the next batches find their bodies cached instead of each
        costing a read of its own."""
        ids: list[str] = []
        bodies = self.bodies
        for key in self.ring:
            queue = self.mailboxes[key].queue
            for i in range(min(per_account, len(queue))):
                message_id = queue[i][1]
                if message_id not in bodies and message_id not in skip:
                    ids.append(message_id)
                    if len(ids) >= limit:
                        return ids
        return ids

    def unheld(self, items: Iterable[OutboundSms]) -> list[OutboundSms]:
        """The messages of `items` (pending in the store) that nothing here will dispatch:
        not in the express lane and, for bulk, neither in its account's queue nor after the
        account's cursor while the account has entries counted in the store (a page reads
        those back)."""
        express_ids: set[str] | None = None
        queued: dict[int, set[str]] = {}  # account -> ids in its mailbox, built when needed
        out: list[OutboundSms] = []
        for sms in items:
            if sms.express:
                if express_ids is None:
                    express_ids = {e[2].id for e in self.express}
                if sms.id not in express_ids:
                    out.append(sms)
                continue
            key = stream_of(sms)
            mailbox = self.mailboxes.get(key)
            if (micros(sms.created_at), sms.id) > self.cursors.get(key, START):
                # Never in memory yet: held only if a page will read it.
                if mailbox is None or not (mailbox.spilled or mailbox.paging):
                    out.append(sms)
                continue
            ids = queued.get(key)
            if ids is None:
                ids = queued[key] = (
                    set() if mailbox is None else {entry[1] for entry in mailbox.queue}
                )
            if sms.id not in ids:
                out.append(sms)
        return out


class FifoState(SchedulerState):
    """The baseline benchmarks/fairness.py measures round robin against: bulk leaves in the
    order it entered memory, whoever sent it, so a flood delays every message behind it.

    Only the order of bulk differs: the express lane, paging (by account, as recovery counts
    it) and the mailboxes' bookkeeping are round robin's. It keeps everything in memory, as a
    plain queue would, and has no light accounts or send rates to keep to (a baseline)."""

    def __init__(self, *, page_size: int = 500) -> None:
        super().__init__(page_size=page_size)
        self.order: deque[tuple[int, Entry]] = deque()  # (account, entry) as they came

    def _enter_ring(self, key: int) -> None:
        pass  # served in arrival order, not in rounds

    def _leave_ring(self, key: int) -> None:
        pass

    def _remember(self, key: int, mailbox: Mailbox, entry: Entry) -> None:
        super()._remember(key, mailbox, entry)
        self.order.append((key, entry))

    def forget_shards(self, shards: Container[int]) -> int:
        dropped = super().forget_shards(shards)
        if dropped:
            self.order = deque((k, e) for k, e in self.order if stream_parts(k)[1] not in shards)
        return dropped

    def pop_bulk_of(
        self, now: float, light_only: bool = False, room: float = math.inf
    ) -> tuple[int, Entry] | None:
        """The oldest entry in memory (an account's entries enter `order` as they enter its
        queue, so it is the front of its account's queue). No light-only pops: one queue."""
        if light_only or not self.order or slots(self.order[0][1][2]) > room:
            return None
        key, entry = self.order.popleft()
        mailbox = self.mailboxes[key]
        mailbox.queue.popleft()
        self._taken(key, mailbox, None, now, entry)
        return key, entry

    def next_ready(self, now: float) -> float:
        return math.inf  # nothing is paced

    def upcoming(
        self, limit: int, per_account: int, skip: Container[str] = frozenset()
    ) -> list[str]:
        """Ids of the next `limit` entries whose bodies are not cached, nor in `skip`."""
        ids: list[str] = []
        for _, (_, message_id, _) in self.order:
            if message_id not in self.bodies and message_id not in skip:
                ids.append(message_id)
                if len(ids) >= limit:
                    break
        return ids
