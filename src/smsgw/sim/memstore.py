"""MemStore: the engine's MessageStore in memory, for virtual-time runs (credit exact, no rows).

Why in memory: a virtual-time run must be deterministic and fast, and PostgreSQL is neither
(its latency is real time, which a MockClock cannot skip, and 100M rows would take hours to
write here). STYLE.md says never to mix virtual time with real sockets or PostgreSQL.

What it keeps: every account's credit (balance, held, captured, topped_up) changed only through
the engine's own `CreditBook`, with the same hold rules as `PgStore` (`hold_items`: in order,
atomic all-or-none, a request stops at the first refusal); the messages that are not final
(for outcomes and `pending`); per account, the ledger sums and counts that PostgreSQL's
`credit_ledger` would hold; and how many messages ended in each status. It keeps no history of
final messages, so its memory follows the backlog, not the day.

What it does not prove: anything about PostgreSQL (locks, the group commit's SQL, durability
after a crash). Those are the integration tests' and the wall-clock runs' job. A group commit
takes virtual time from a simple cost model (`commit_cost`), so accept latency in virtual
time shows the group commit's queueing, not PostgreSQL's real speed.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from smsgw.engine.credit import AccountCredit, CreditBook, check_topups, hold_items
from smsgw.engine.messages import AcceptResult, Account, OutboundSms, Outcome
from smsgw.engine.ports import (
    SHARDS,
    Entry,
    GroupResult,
    Promoted,
    Recovered,
    WriteGroup,
    dispatch_shard,
    entry_of,
    stream_of,
)

# The same hold rules as the PostgreSQL store: one implementation, so both stores refuse alike.


@dataclass(slots=True)
class LedgerSums:
    """What the credit ledger would add up to for one account, and its messages' fates."""

    topup: int = 0
    hold: int = 0
    capture: int = 0
    release: int = 0
    hold_n: int = 0  # messages (cohort members count one each: see `weight`)
    capture_n: int = 0
    release_n: int = 0


@dataclass(frozen=True, slots=True)
class CommitCost:
    """Virtual seconds a group commit takes: a round trip plus a cost per row, per message
    inserted and per status updated (their rates measured on PostgreSQL here: about 66k
    inserts/s and 33k updates/s with the indexes of migration 002)."""

    base_s: float = 0.001
    insert_s: float = 1 / 66_000
    update_s: float = 1 / 33_000


Observer = Callable[[Sequence[OutboundSms], Sequence[Outcome]], None]


def weight(sms: OutboundSms) -> int:
    """Messages this item stands for. Virtual runs send one-segment messages and batch k of
    them into one cohort item with `segments` = k, so segments count messages there."""
    return sms.segments


class MemStore:
    """A `MessageStore` in memory; see the module docstring for what it proves."""

    def __init__(
        self,
        *,
        cost: CommitCost | None = CommitCost(),
        seed: int = 0,
        observer: Observer | None = None,
    ) -> None:
        self.credit: dict[int, AccountCredit] = {}
        self.names: dict[int, str] = {}
        self.ledger: dict[int, LedgerSums] = {}
        self.pending_messages: dict[str, OutboundSms] = {}
        # Each account's pending bulk entries in queue order: what `page_entries` reads, so a
        # page costs a bisect, not a scan of every pending message (a full-scale `day` run
        # pages under a backlog of millions).
        self._queues: dict[int, list[Entry]] = {}  # by stream (ports.stream_key)
        # Scheduled messages (pending too, their price held): each shard's (send_at, id) by
        # send_at, as PostgreSQL's due-time index; promoted ones move to the queues.
        self._due: dict[int, list[tuple[float, str]]] = {}
        self.scheduled_ids: set[str] = set()
        self.client_refs: set[tuple[int, str]] = set()
        self.final: dict[tuple[str, str], int] = {}  # (status, reason or "") -> messages
        self.commits = 0
        self._cost = cost
        # Jitter of a nanosecond or so: two commits never end at the same virtual instant, so
        # trio's tie-break between equal deadlines (by object id) cannot reorder a run.
        self._jitter = random.Random(f"memstore/{seed}")
        self._observer = observer
        self._next_id = 1

    def add_account(self, name: str, credit: int) -> Account:
        """Create an account directly (setup, before the engine runs)."""
        account_id = self._next_id
        self._next_id += 1
        self.credit[account_id] = AccountCredit(balance=credit, topped_up=credit)
        self.names[account_id] = name
        self.ledger[account_id] = LedgerSums(topup=credit)
        return Account(id=account_id, name=name, balance=credit, held=0)

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        # Refused before anything changes: this store has no transaction to roll back.
        check_topups(self.credit, group.topups)
        creates = [self.add_account(name, credit) for name, credit, _ in group.creates]
        book = CreditBook()
        ids: set[int] = {a for a, _ in group.topups}
        ids.update(o.sms.account_id for o in group.outcomes)
        for items, _ in group.accepts:
            ids.update(sms.account_id for sms in items)
        credits = self.credit
        for account_id in ids:
            credit = credits.get(account_id)
            if credit is not None:
                book.load(account_id, credit)

        finished: list[Outcome] = []
        for outcome in group.outcomes:
            if outcome.sms.id in self.scheduled_ids:
                continue  # not dispatched yet: nothing could have sent it
            sms = self.pending_messages.pop(outcome.sms.id, None)
            if sms is None:
                continue  # final already: a message ends once and is charged at most once
            if not sms.express:
                self._unqueue(sms)
            sums = self.ledger[sms.account_id]
            if outcome.status == "sent":
                book.capture(sms.account_id, sms.price)
                sums.capture += sms.price
                sums.capture_n += weight(sms)
            else:
                book.release(sms.account_id, sms.price)
                sums.release += sms.price
                sums.release_n += weight(sms)
            key = (outcome.status, outcome.reason or "")
            self.final[key] = self.final.get(key, 0) + weight(sms)
            finished.append(outcome)

        topups: list[int | None] = []
        for account_id, amount in group.topups:
            if account_id in book:
                topups.append(book.topup(account_id, amount))
                self.ledger[account_id].topup += amount
            else:
                topups.append(None)

        accepts: list[list[AcceptResult]] = []
        stored: list[OutboundSms] = []
        for items, atomic in group.accepts:
            results = hold_items(book, items, atomic)
            if any(s.client_ref is not None for s in items):
                duplicate = [
                    r.accepted
                    and s.client_ref is not None
                    and (s.account_id, s.client_ref) in self.client_refs
                    for s, r in zip(items, results, strict=True)
                ]
                if any(duplicate):
                    results = self._undo_duplicates(book, items, results, duplicate, atomic)
                for sms, r in zip(items, results, strict=True):
                    if r.accepted and sms.client_ref is not None:
                        self.client_refs.add((sms.account_id, sms.client_ref))
            stored.extend(sms for sms, r in zip(items, results, strict=True) if r.accepted)
            accepts.append(results)
        for sms in stored:
            self.pending_messages[sms.id] = sms
            if sms.send_at is not None:
                self.scheduled_ids.add(sms.id)
                heapq.heappush(self._due.setdefault(dispatch_shard(sms), []), (sms.send_at, sms.id))
            elif not sms.express:
                bisect.insort(self._queues.setdefault(stream_of(sms), []), entry_of(sms))
            sums = self.ledger[sms.account_id]
            sums.hold += sms.price
            sums.hold_n += weight(sms)
        for account_id in book.deltas:
            book.accounts[account_id].check()

        self.commits += 1
        if self._cost is not None:
            inserted = sum(weight(s) for s in stored)
            updated = sum(weight(o.sms) for o in finished)
            await trio.sleep(
                self._cost.base_s
                + inserted * self._cost.insert_s
                + updated * self._cost.update_s
                + self._jitter.random() * 1e-6
            )
        if self._observer is not None and (stored or finished):
            self._observer(stored, finished)
        return GroupResult(accepts, topups, creates)

    @staticmethod
    def _undo_duplicates(
        book: CreditBook,
        items: Sequence[OutboundSms],
        results: list[AcceptResult],
        duplicate: list[bool],
        atomic: bool,
    ) -> list[AcceptResult]:
        undone = list(results)
        for i, sms in enumerate(items):
            if not results[i].accepted or not (atomic or duplicate[i]):
                continue
            book.unhold(sms.account_id, sms.price)
            undone[i] = AcceptResult(
                accepted=False,
                reason="duplicate_client_ref" if duplicate[i] else "batch_rejected",
                balance=book.accounts[sms.account_id].balance,
            )
        return undone

    async def pending(self) -> list[OutboundSms]:
        return list(self.pending_messages.values())

    async def commit_fate(self, group: WriteGroup) -> set[str]:
        # A commit here happens all at once or not at all: a stored message of the group is
        # pending until the writer hands it on, so no final one can be missed.
        return {s.id for items, _ in group.accepts for s in items if s.id in self.pending_messages}

    async def recover(self) -> Recovered:
        express: list[OutboundSms] = []
        backlogs: dict[int, int] = {}
        for sms in self.dispatchable():
            if sms.express:
                express.append(sms)
            else:
                key = stream_of(sms)
                backlogs[key] = backlogs.get(key, 0) + 1
        return Recovered(express, sorted(backlogs.items()))

    def dispatchable(self) -> list[OutboundSms]:
        """The pending messages that are not scheduled (`queued` in PostgreSQL's terms)."""
        scheduled = self.scheduled_ids
        return [s for s in self.pending_messages.values() if s.id not in scheduled]

    async def promote_due(
        self, shards: Mapping[int, int] | None, now: float, limit: int, per_shard: int
    ) -> Promoted:
        """As PgStore's: the due scheduled messages of `shards` become queued (leases are
        not checked: MemCluster's never change hands)."""
        if not self._due:
            return Promoted([], None)  # the common case in a virtual run: a dict test
        order = range(SHARDS) if shards is None else sorted(shards)
        promoted: list[OutboundSms] = []
        for shard in order:
            due = self._due.get(shard)
            taken = 0
            while due and due[0][0] <= now and taken < per_shard and len(promoted) < limit:
                _, message_id = heapq.heappop(due)
                self.scheduled_ids.discard(message_id)
                sms = self.pending_messages[message_id]
                if not sms.express:
                    bisect.insort(self._queues.setdefault(stream_of(sms), []), entry_of(sms))
                promoted.append(sms)
                taken += 1
            if due is not None and not due:
                del self._due[shard]
        heads = [self._due[shard][0][0] for shard in order if shard in self._due]
        return Promoted(promoted, min(heads) if heads else None)

    async def dispatch_rates(self) -> list[tuple[int, float]]:
        return []

    async def page_entries(
        self, requests: Sequence[tuple[int, tuple[int, str], int]]
    ) -> list[list[tuple[int, str, int]]]:
        """As PgStore's: each stream's next queued bulk entries after its cursor."""
        pages = []
        for key, cursor, n in requests:
            queue = self._queues.get(key, [])
            # Past every entry at the cursor's position, whatever its segments.
            start = bisect.bisect_right(queue, (cursor[0], cursor[1], math.inf))
            pages.append(queue[start : start + n])
        return pages

    def _unqueue(self, sms: OutboundSms) -> None:
        key = stream_of(sms)
        queue = self._queues[key]
        entry = entry_of(sms)
        del queue[bisect.bisect_left(queue, entry)]
        if not queue:
            del self._queues[key]

    async def queued_messages(self, ids: Sequence[str]) -> list[OutboundSms]:
        return [sms for i in ids if (sms := self.pending_messages.get(i)) is not None]

    def pending_count(self) -> int:
        return len(self.pending_messages)

    def broken_accounts(self) -> dict[int, list[str]]:
        """Accounts whose credit does not add up, and what breaks (the same identities as
        storage/ledger.py checks on PostgreSQL), computed from the ledger sums and the pending
        messages, independently of the CreditBook's arithmetic."""
        pending_price: dict[int, int] = {}
        for sms in self.pending_messages.values():
            pending_price[sms.account_id] = pending_price.get(sms.account_id, 0) + sms.price
        broken: dict[int, list[str]] = {}
        for account_id, c in self.credit.items():
            s = self.ledger[account_id]
            held = pending_price.get(account_id, 0)
            checks = {
                "top-ups - captured - held != balance": (
                    c.topped_up - c.captured - c.held == c.balance
                ),
                "negative": c.balance >= 0 and c.held >= 0,
                "held != price of pending": c.held == held,
                "ledger top-ups": s.topup == c.topped_up,
                "ledger captures": s.capture == c.captured,
                "ledger holds - captures - releases != held": (
                    s.hold - s.capture - s.release == c.held
                ),
            }
            bad = [name for name, ok in checks.items() if not ok]
            if bad:
                broken[account_id] = bad
        return broken
