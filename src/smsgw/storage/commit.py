"""The group commit: many requests' writes in one crossing and one transaction or statement.

Each group of accepts, outcomes, top-ups, new accounts and DLRs is one statement, or one
transaction (the exact way); a commit in doubt is settled by what it stored; each request gets
its answer. The statements are in storage/commit_sql.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import asyncpg
import msgspec
import trio

from smsgw.engine.credit import (
    AccountCredit,
    CreditBook,
    Room,
    Stops,
    TopUpTooLarge,
    hold_within_limits,
)
from smsgw.engine.messages import AcceptResult, Account, OutboundSms, Outcome
from smsgw.engine.ports import CommitInDoubt, GroupResult, WriteGroup, dispatch_shard
from smsgw.storage.announce import NOTIFY, HandoffAnnouncer
from smsgw.storage.commit_sql import (
    COPY_COLUMNS,
    COPY_MIN_ROWS,
    OUTCOME_CALLBACKS,
    REF_TAKEN,
    REFUSALS,
    UNDO_INSERTS,
    WRITE_CREDIT,
    WRITE_CREDIT_COPIED,
    WRITE_CREDIT_HANDOFF,
    WRITE_GROUP,
    WRITE_GROUP_HANDOFF,
    GroupBounds,
    attempts_json,
    copy_records,
    finished_json,
    handed_off,
    lock_and_finish,
    one_statement,
    record_attempts,
    ref_keys,
    refusal_keys,
)
from smsgw.storage.database import Database, Refused, StorePart
from smsgw.storage.delivery import apply_deliveries, callbacks_of
from smsgw.storage.payloads import handoff_notices, settled_payloads
from smsgw.storage.rollups import copy_rollup
from smsgw.storage.rows import DAY_S, ids_days
from smsgw.storage.statement import LedgerRow, Settled, ledger_rows

log = logging.getLogger("smsgw.storage")

_json = msgspec.json.Encoder()

# Transient conflicts a group simply runs again.
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


def _session_ended(exc: asyncpg.PostgresError) -> bool:
    """The session ended under a statement, rather than the server refusing it: the connection
    was lost (asyncpg's PostgresConnectionError, class 08, is a PostgresError too) or the
    server sent FATAL or PANIC (a shutdown, a crash, a terminated backend), at a moment the
    client cannot know."""
    if isinstance(exc, asyncpg.PostgresConnectionError):
        return True
    severity = getattr(exc, "severity_en", None) or getattr(exc, "severity", None)
    return severity in ("FATAL", "PANIC")


# A group commit's server process, ended when its fate is in doubt (same database only; a
# role may end its own sessions).
_END_SESSION = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE pid = $1 AND datname = current_database() AND pid <> pg_backend_pid()
"""
_SESSION_ALIVE = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)"


class _CopyConflict(Refused):
    """A COPY of a group's messages met a taken client_ref: nothing of the group was stored."""


class Handoff(NamedTuple):
    """Set on a PgStore of a node among several: messages stored for shards this node does
    not lease are handed to their owner in the same transaction (migration 004)."""

    node_id: str
    lock_class: int
    channel: str
    # Where the express outcomes this node commits are announced to every node (for a
    # `"wait": true` request on whichever node accepted the message); "" for nowhere.
    settled_channel: str = ""
    # Tells the owners of bulk hand-offs, several groups' worth at a time (None: each
    # group's own NOTIFY tells them).
    announcer: HandoffAnnouncer | None = None


# What a group commit's time is recorded under (Database.run: /metrics and slow-statement logs).
_COMMIT = "PgStore.commit_group"


# How near a UTC midnight a group with client_refs takes the exact way: the partition of the
# day on the other side of it may be written by a group that is committing now, which
# one_statement's snapshot (older than its locks) might not see. A group commits within
# seconds of its accepts; an hour leaves room for a stalled one.
_NEAR_S = 3_600


# The exact way's statements that probe an index per message (the refusals, REF_TAKEN, the
# INSERT's client_ref probe) are planned for each group, with the partitions' sizes as they are
# then: a plan PostgreSQL caches while today's partition is nearly empty scans the partition
# whole for each message once it has filled (16.5 s for a group of 1,000 on 190,000 messages,
# measured with a plan made on an empty day), and it takes a cached plan for good once that
# looks no dearer than the ones it made. Planning them costs about a millisecond a group, a
# group of this way being large or rare; the one statement keeps its cached plan (small groups,
# planned again with the statistics the upkeep gives a growing day: partitions.py).
_CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
_CACHED_PLANS = "SET LOCAL plan_cache_mode = auto"


def _near_midnight(created_at: float) -> bool:
    return not _NEAR_S <= created_at % DAY_S < DAY_S - _NEAR_S


class GroupCommit(StorePart):
    """The write side of the engine's `MessageStore`: `commit_group` and `commit_fate`."""

    def __init__(
        self,
        db: Database,
        *,
        handoff: Handoff | None = None,
        recipient_limit: int | None = None,
    ) -> None:
        super().__init__(db)
        self.handoff = handoff
        # Messages an hour to one number for an account without a limit of its own; None:
        # the store does not check the hourly limit (tests of the store alone).
        self.recipient_limit = recipient_limit

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        copy = True
        for attempt in range(5):
            try:
                return await self.db.run(
                    functools.partial(self._commit, group=group, copy=copy), name=_COMMIT
                )
            except _CopyConflict:
                copy = False  # a taken client_ref: the INSERT skips it, and says which
            except _RETRYABLE as exc:
                log.warning("group commit conflict, retrying (%d): %s", attempt + 1, exc)
                await trio.sleep(0.005 * (attempt + 1))
        return await self.db.run(
            functools.partial(self._commit, group=group, copy=False), name=_COMMIT
        )

    async def commit_fate(self, group: WriteGroup) -> set[str]:
        """Ends the group's server process if it still runs (a commit blocked on a lock, or
        one whose client went away mid-statement would otherwise commit whenever it gets the
        lock), waits until it is gone, then reads which of the group's messages are stored."""
        ids = [s.id for items, _ in group.accepts for s in items]
        pid = group.session

        async def _fate(conn: asyncpg.Connection) -> set[str]:
            if isinstance(pid, int):
                await conn.execute(_END_SESSION, pid)
                for _ in range(500):
                    if not await conn.fetchval(_SESSION_ALIVE, pid):
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise TimeoutError(f"server process {pid} of a group in doubt still runs")
            if not ids:
                return set()
            rows = await conn.fetch("SELECT id::text FROM messages WHERE id = ANY($1::uuid[])", ids)
            return {r["id"] for r in rows}

        return await self.db.run(_fate)

    async def _commit(
        self, conn: asyncpg.Connection, group: WriteGroup, *, copy: bool = True
    ) -> GroupResult:
        group.session = conn.get_server_pid()
        try:
            return await self._commit_group(conn, group, copy=copy)
        except asyncpg.PostgresError as exc:
            if _session_ended(exc):
                # Lost, or ended by the server (shutdown, crash): that can come after the
                # COMMIT was flushed and before its answer arrived, so it may have committed.
                raise CommitInDoubt(f"{type(exc).__name__}: {exc}") from exc
            raise
        except (_CopyConflict, TopUpTooLarge):
            # The server refused a statement, or the credit rules refused a top-up before the
            # commit: the transaction is rolled back, nothing of the group is stored.
            raise
        except Exception as exc:
            # Lost after its statements were sent (or failed after COMMIT): it may have
            # committed.
            raise CommitInDoubt(f"{type(exc).__name__}: {exc}") from exc

    async def _commit_group(
        self, conn: asyncpg.Connection, group: WriteGroup, *, copy: bool = True
    ) -> GroupResult:
        ids: set[int] = {a for a, _ in group.topups}
        ids.update(o.sms.account_id for o in group.outcomes)
        for items, _ in group.accepts:
            ids.update(sms.account_id for sms in items)
        account_ids = sorted(ids)
        finished = finished_json(group) if ids else ""
        # Before the outcomes (a message's last temporary failure and its outcome may share a
        # group), and in statements of their own: they move no credit and lock no account, so
        # they need not wait for the group's account locks, nor hold a message row while
        # waiting for them (a cancel takes its account's lock, then the row).
        if group.attempts:
            tried = record_attempts(ids_days(a.sms.id for a in group.attempts))
            for layer in attempts_json(group.attempts):
                await conn.execute(tried, layer)
        if not (ids or group.creates or group.deliveries):
            if group.written is not None:
                group.written()
            return GroupResult([], [], [])
        if ids and self._one_statement(group, copy):
            done = await self._commit_one(conn, group, account_ids, finished)
            if done is not None:
                return done
        wake: dict[str, list[OutboundSms]] = {}  # owner -> hand-offs, told once committed
        async with conn.transaction():
            creates = [await self._create(conn, *c) for c in group.creates]

            book = CreditBook()
            settled: dict[int, Settled] = {}  # what the outcomes captured and released
            account_urls: dict[int, str] = {}  # the group's accounts that have a callback_url
            if ids:
                outcome_days = ids_days(o.sms.id for o in group.outcomes)
                rows = await conn.fetch(lock_and_finish(outcome_days), account_ids, finished)
                for r in rows:
                    account_id = r["id"]
                    book.load(
                        account_id,
                        AccountCredit(r["balance"], r["held"], r["captured"], r["topped_up"]),
                    )
                    if r["callback_url"] is not None:
                        account_urls[account_id] = r["callback_url"]
                    if r["out_captured"] is None:
                        continue
                    if r["captured_n"]:
                        book.capture(account_id, r["out_captured"])
                    if r["released_n"]:
                        book.release(account_id, r["out_released"])
                    settled[account_id] = Settled.of(r)
                wanted = callbacks_of(group.outcomes, account_urls)
                if wanted:
                    await conn.execute(OUTCOME_CALLBACKS, wanted)

            topups: list[int | None] = []
            credited: list[tuple[int, int]] = []  # the top-ups applied, in order
            for account_id, amount in group.topups:
                if account_id in book:
                    topups.append(book.topup(account_id, amount))
                    credited.append((account_id, amount))
                else:
                    topups.append(None)

            accepts: list[list[AcceptResult]] = []
            stored: list[OutboundSms] = []
            # The span of the group's messages: the id ranges its probes read (the refusals',
            # the client_ref ones), each statement's partitions chosen once.
            candidates = [sms for items, _ in group.accepts for sms in items]
            bounds = GroupBounds.of(candidates)
            if candidates:
                await conn.execute(_CUSTOM_PLANS)
            room, stops = (
                await self._refusals(conn, candidates, bounds) if candidates else (None, None)
            )
            for items, atomic in group.accepts:
                results = hold_within_limits(book, items, atomic, room, stops)
                accepts.append(results)
                if all(res.accepted for res in results):
                    held = items
                else:
                    held = [s for s, r in zip(items, results, strict=True) if r.accepted]
                stored.extend(held)
            ledger = ledger_rows(book, settled, credited, stored)
            if not stored:
                await _write_credit(conn, book, ledger)
            elif copy and len(stored) >= COPY_MIN_ROWS:
                refs = ref_keys(stored)
                if refs is not None and await conn.fetchval(REF_TAKEN, refs, *bounds.ref_ranges()):
                    raise _CopyConflict("a client_ref of the group was used in the day before it")
                await conn.execute(_CACHED_PLANS)
                try:
                    await conn.copy_records_to_table(
                        "messages", records=copy_records(stored), columns=COPY_COLUMNS
                    )
                except asyncpg.UniqueViolationError as exc:
                    raise _CopyConflict(str(exc)) from exc
                if self.handoff is None:
                    await conn.fetchval(
                        WRITE_CREDIT_COPIED, *_credit_args(book, ledger), copy_rollup(stored)
                    )
                else:
                    row = await conn.fetchrow(
                        WRITE_CREDIT_HANDOFF,
                        *_credit_args(book, ledger),
                        self.handoff.node_id,
                        self.handoff.lock_class,
                        [dispatch_shard(s) for s in handed_off(stored)],
                        [s.id for s in handed_off(stored)],
                        copy_rollup(stored),
                    )
                    if row["ids"]:
                        wake = _handed(row["owners"], row["ids"], stored)
            else:
                written = [a for a, d in book.deltas.items() if d]
                args = [*_credit_args(book, ledger), _json.encode(stored).decode(), *bounds.refs]
                if self.handoff is None:
                    row = await conn.fetchrow(WRITE_GROUP, *args)
                else:
                    shards = _json.encode([dispatch_shard(s) for s in handed_off(stored)])
                    row = await conn.fetchrow(
                        WRITE_GROUP_HANDOFF,
                        *args,
                        self.handoff.node_id,
                        self.handoff.lock_class,
                        shards.decode(),
                    )
                await conn.execute(_CACHED_PLANS)
                if row["stored"] < len(stored):
                    inserted = set(row["inserted"] or ())
                    await _undo_duplicates(conn, book, group, accepts, inserted)
                    # The credit just written counted holds that were taken back: write it
                    # again, every account written above (its figures are absolute), and
                    # replace the ledger rows.
                    await conn.execute(
                        "DELETE FROM credit_ledger WHERE id = ANY($1::bigint[])", row["ledger"]
                    )
                    stored = _still_accepted(group, accepts)
                    ledger = ledger_rows(book, settled, credited, stored)
                    await conn.fetchval(WRITE_CREDIT, *_credit_args(book, ledger, written))
                if self.handoff is not None and row["ids"]:
                    wake = _handed(row["owners"], row["ids"], stored)
            # After the outcomes: a `sent` and its DLR in the same group apply in that order.
            deliveries = await apply_deliveries(conn, group.deliveries) if group.deliveries else []
        if group.written is not None:
            group.written()
        await self._notify(conn, wake, group.outcomes)
        return GroupResult(accepts, topups, creates, deliveries)

    async def _notify(
        self,
        conn: asyncpg.Connection,
        wake: dict[str, list[OutboundSms]],
        outcomes: Sequence[Outcome],
    ) -> None:
        """Wake the owners of handed-off messages, each on its own channel, and tell every
        node the express outcomes just committed (a `"wait": true` request may wait for one on
        any node). Bulk hand-offs go to the announcer when there is one (storage/announce.py:
        a few groups' worth a NOTIFY); express ones now, with whatever waits there. After the
        commit, in a transaction of its own: in the group's, the one statement would have to
        find the owners and build their payloads itself (tried: a third fewer transactions an
        accept, no less CPU), and it would hold PostgreSQL's database-wide notify lock through
        the group's WAL flush. A lost hand-off waits for the poll; a lost outcome lets its
        waiter time out at the deadline. The group is committed whatever happens here, so
        nothing may raise."""
        if self.handoff is None:
            return
        announcer = self.handoff.announcer
        if announcer is not None and wake:
            if not any(sms.express for items in wake.values() for sms in items):
                announcer.tell(wake)
                wake = {}
            else:
                for owner, items in announcer.take().items():
                    wake.setdefault(owner, []).extend(items)
        channels, payloads = handoff_notices(self.handoff.channel, wake)
        if self.handoff.settled_channel:
            settled = settled_payloads([o for o in outcomes if o.sms.express])
            channels += [self.handoff.settled_channel] * len(settled)
            payloads += settled
        if not payloads:
            return
        try:
            await conn.execute(NOTIFY, channels, payloads)
        except Exception as exc:
            log.warning("could not notify hand-offs or outcomes (the poll takes them): %s", exc)

    async def _commit_one(
        self, conn: asyncpg.Connection, group: WriteGroup, ids: list[int], finished: str
    ) -> GroupResult | None:
        """The group by one_statement (`finished`: its outcomes' JSON); None when it changed
        nothing (an account missing, or one whose balance may not cover its holds), for the
        exact way to do."""
        stored = [sms for items, _ in group.accepts for sms in items]
        bounds = GroupBounds.of(stored)
        days = bounds.statement_days._replace(outcomes=ids_days(o.sms.id for o in group.outcomes))
        args = [_json.encode(stored).decode(), finished, ids, self.recipient_limit]
        if self.handoff is None:
            row = await conn.fetchrow(one_statement(False, days), *args)
        else:
            shards = _json.encode([dispatch_shard(s) for s in handed_off(stored)]).decode()
            row = await conn.fetchrow(
                one_statement(True, days),
                *args,
                self.handoff.node_id,
                self.handoff.lock_class,
                shards,
            )
        if not row["ok"]:
            return None
        if group.written is not None:
            group.written()
        inserted = None if row["stored"] == len(stored) else set(row["inserted"] or ())
        balances = dict(zip(row["ids"], row["balances"], strict=True))
        accepts = _one_answers(group, balances, inserted)
        wake: dict[str, list[OutboundSms]] = {}
        if self.handoff is not None and row["handed"]:
            if inserted is not None:
                stored = [s for s in stored if s.id in inserted]
            wake = _handed(row["owners"], row["handed"], stored)
        await self._notify(conn, wake, group.outcomes)
        return GroupResult(accepts, [], [])

    async def _refusals(
        self, conn: asyncpg.Connection, items: list[OutboundSms], bounds: GroupBounds
    ) -> tuple[Room | None, Stops | None]:
        """Read after the accounts are locked (no other group can store messages of theirs
        until this one commits): the group's recipients past their hourly limit, (account,
        number) -> [messages it may still take, seconds until one more fits], unless the
        store checks no limit; and its numbers opted out or blocked, (account, number) ->
        blocked (True: on the gateway's blocklist, stops express too). None: none."""
        rows = await conn.fetch(REFUSALS, refusal_keys(items), self.recipient_limit, *bounds.hour)
        room: Room = {}
        stops: Stops = {}
        for r in rows:
            key = (r["account_id"], r["recipient"])
            if r["kind"] == "room":
                room[key] = [r["room"], float(r["retry_after"] or 1.0)]
            else:
                stops[key] = r["blocked"]
        return room or None, stops or None

    def _one_statement(self, group: WriteGroup, copy: bool) -> bool:
        """Whether one_statement can do this group: only accepts and outcomes, not a batch
        for COPY, and no atomic batch that names a client_ref (a taken one would take back
        its siblings: the exact way does that)."""
        if group.creates or group.topups or group.deliveries:
            return False
        n = 0
        for items, atomic in group.accepts:
            n += len(items)
            if atomic and len(items) > 1 and any(s.client_ref is not None for s in items):
                return False
            if any(s.client_ref is not None and _near_midnight(s.created_at) for s in items):
                return False
        return not copy or n < COPY_MIN_ROWS

    async def _create(
        self, conn: asyncpg.Connection, name: str, credit: int, key_hash: bytes
    ) -> Account:
        row = await conn.fetchrow(
            "INSERT INTO accounts (name, key_hash, balance, topped_up) VALUES ($1, $2, $3, $3)"
            " RETURNING id, signing_secret",
            name,
            key_hash,
            credit,
        )
        if credit > 0:
            await conn.execute(
                "INSERT INTO credit_ledger (account_id, kind, amount, balance_after, at)"
                " VALUES ($1, 'topup', $2, $2, clock_timestamp())",
                row["id"],
                credit,
            )
        return Account(
            id=row["id"],
            name=name,
            balance=credit,
            held=0,
            signing_secret=row["signing_secret"],
        )


def _one_answers(
    group: WriteGroup, balances: dict[int, int], inserted: set[str] | None
) -> list[list[AcceptResult]]:
    """The answers of a group one_statement did: each item accepted, but for those not
    `inserted` (their client_ref taken); None: every one was."""
    answers: dict[int, AcceptResult] = {}  # the accepted items of an account share one
    accepts: list[list[AcceptResult]] = []
    for items, _ in group.accepts:
        results = []
        for sms in items:
            if inserted is None or sms.id in inserted:
                answer = answers.get(sms.account_id)
                if answer is None:
                    balance = balances[sms.account_id]
                    answer = answers[sms.account_id] = AcceptResult(True, balance=balance)
                results.append(answer)
            else:
                balance = balances[sms.account_id]
                results.append(AcceptResult(False, reason="duplicate_client_ref", balance=balance))
        accepts.append(results)
    return accepts


def _still_accepted(group: WriteGroup, accepts: list[list[AcceptResult]]) -> list[OutboundSms]:
    """The messages stored after duplicates were taken back."""
    return [
        sms
        for (items, _), results in zip(group.accepts, accepts, strict=True)
        for sms, result in zip(items, results, strict=True)
        if result.accepted
    ]


def _handed(
    owners: Sequence[str], ids: Sequence[str], stored: list[OutboundSms]
) -> dict[str, list[OutboundSms]]:
    """The handed-off messages by owner: only messages still stored (not a duplicate's, nor
    an atomic sibling's taken back)."""
    by_id = {s.id: s for s in stored}
    handed: dict[str, list[OutboundSms]] = {}
    for owner, message_id in zip(owners, ids, strict=True):
        sms = by_id.get(message_id)
        if sms is not None:
            handed.setdefault(owner, []).append(sms)
    return handed


async def _undo_duplicates(
    conn: asyncpg.Connection,
    book: CreditBook,
    group: WriteGroup,
    accepts: list[list[AcceptResult]],
    inserted: set[str],
) -> None:
    """Some messages were not stored: their client_ref is taken (by an earlier message, or by
    another in this same group). The unique index is the arbiter, exact across requests and
    nodes. Their holds are taken back and they are answered `duplicate_client_ref`; in an atomic
    request the siblings that were stored are removed too (`batch_rejected`): all or none."""
    remove: list[str] = []
    touched: set[int] = set()
    for (items, atomic), results in zip(group.accepts, accepts, strict=True):
        duplicates = {
            i for i, s in enumerate(items) if results[i].accepted and s.id not in inserted
        }
        if not duplicates:
            continue
        undo = range(len(items)) if atomic else sorted(duplicates)
        for i in undo:
            sms = items[i]
            if not results[i].accepted:
                continue
            if sms.id in inserted:
                remove.append(sms.id)
            book.unhold(sms.account_id, sms.price)
            touched.add(sms.account_id)
            reason: Literal["duplicate_client_ref", "batch_rejected"] = (
                "duplicate_client_ref" if i in duplicates else "batch_rejected"
            )
            results[i] = AcceptResult(accepted=False, reason=reason)
    # Every answer of an account whose holds were taken back says its balance after the
    # group, as one_statement's answers do (an accepted one gave it before the undo).
    for (items, _), results in zip(group.accepts, accepts, strict=True):
        for i, sms in enumerate(items):
            if sms.account_id in touched:
                balance = book.accounts[sms.account_id].balance
                results[i] = msgspec.structs.replace(results[i], balance=balance)
    if remove:
        await conn.execute(UNDO_INSERTS, remove)


def _credit_args(
    book: CreditBook, ledger: Sequence[LedgerRow], accounts: Sequence[int] | None = None
) -> list[Any]:
    """The six parameters of the credit writes (commit_sql.WRITE_CREDIT and the other WRITE_
    statements): five arrays of each changed account's figures, once (or each of
    `accounts`'), and its `ledger` rows as JSON."""
    if accounts is None:
        accounts = [a for a, d in book.deltas.items() if d]
    changed = [(a, book.accounts[a]) for a in accounts]
    for _, credit in changed:
        credit.check()
    return [
        [a for a, _ in changed],
        [c.balance for _, c in changed],
        [c.held for _, c in changed],
        [c.captured for _, c in changed],
        [c.topped_up for _, c in changed],
        _json.encode(ledger).decode(),
    ]


async def _write_credit(
    conn: asyncpg.Connection, book: CreditBook, ledger: Sequence[LedgerRow]
) -> None:
    if any(book.deltas.values()):
        await conn.fetchval(WRITE_CREDIT, *_credit_args(book, ledger))
