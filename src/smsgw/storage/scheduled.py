"""Scheduled messages coming due: `promote_due`, the store side of engine/scheduled.py.

A scheduled message is a `messages` row with status `scheduled` and its `send_at`, found by the
due-time index of migration 016 (`messages_scheduled`: per dispatching shard, by send_at). A
node promotes the due rows of the shards it leases to `queued` and hands them to its Scheduler.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import asyncpg

from smsgw.engine.ports import SHARDS, Promoted
from smsgw.storage.commit import Handoff
from smsgw.storage.database import StorePart
from smsgw.storage.partitions import SCHEDULED, OldestDay
from smsgw.storage.rollups import moved, upsert
from smsgw.storage.rows import PENDING_COLUMNS, Days, pending_sms, within_days_or_all

# The dispatching shard exactly as migration 016's index spells it, so the planner matches it.
_SHARD = "coalesce(m.dispatch_shard, shard_of(m.account_id))"

# Each given shard's due rows in send_at order, a range of messages_scheduled per shard (the
# literal status proves the index's predicate), at most $per_shard of one shard, until the
# page is full; the shards are visited in the order given (the caller starts from another
# one each time). Then the update, by primary key (an array of ids, never a join the planner
# could make a hash of every pending row), of rows still `scheduled`: a cancel that locked a
# row first has made it `cancelled`, and PostgreSQL re-reads a row it waited for (the
# `(SELECT ...)` keeps that test from making the partial index a candidate for the update's
# own scan: rows.NOT_FINAL says why). The fenced form reads the shards' leases after the
# caller took their advisory locks shared (in the same transaction, as `smsgw_handoff()` does
# for an accept), so a lease cannot change hands between this reading "mine, under this
# token" and the commit: the shard's next owner recovers, after its lease change, every
# message promoted here.
_DUE = f"""
SELECT d.id FROM unnest($1::int[]) WITH ORDINALITY AS s(shard, i)
{{lease}}
CROSS JOIN LATERAL (
    SELECT m.id FROM messages m
    WHERE {_SHARD} = s.shard AND m.status = 'scheduled' AND m.send_at <= to_timestamp($2)
      AND {{within}}
    ORDER BY {_SHARD}, m.send_at
    LIMIT $4
) d
LIMIT $3"""

_LEASED = """
JOIN shard_leases l ON l.shard = s.shard AND l.owner = $5 AND l.token = ($6::bigint[])[s.i::int]"""


@functools.lru_cache(maxsize=8)
def promote_sql(fenced: bool, days: Days | None) -> str:
    """The promotion of the messages made in `days` (None: any day), fenced by the caller's
    leases or not, and the rollups of the messages it moved from `scheduled` (its condition,
    checked again on each row it locks) to `queued`."""
    due = _DUE.format(lease=_LEASED if fenced else "", within=within_days_or_all("m.id", days))
    return f"""
WITH promoted AS (
    UPDATE messages SET status = 'queued', updated_at = to_timestamp($2)
    WHERE id = ANY(ARRAY({due}
    )) AND {within_days_or_all("messages.id", days)} AND status = (SELECT 'scheduled')
    RETURNING {PENDING_COLUMNS}, status, operator, messages.created_at AS created
), rolled AS ({upsert(moved(_PROMOTED, "'scheduled'"))}
)
SELECT * FROM promoted
"""


# The promoted rows with the rollup columns under their own names (PENDING_COLUMNS has
# created_at as Unix seconds).
_PROMOTED = """(SELECT account_id, created AS created_at, status, express, operator, sender,
               recipient, segments, price FROM promoted) AS p"""


# The earliest send_at still scheduled in the given shards: the first entry of each shard's
# range of messages_scheduled, in the partitions of `days` (None: every day).
@functools.lru_cache(maxsize=8)
def next_due_sql(days: Days | None) -> str:
    return f"""
SELECT extract(epoch FROM min(n.send_at))::float8 FROM unnest($1::int[]) AS s(shard)
CROSS JOIN LATERAL (
    SELECT m.send_at FROM messages m
    WHERE {_SHARD} = s.shard AND m.status = 'scheduled' AND {within_days_or_all("m.id", days)}
    ORDER BY {_SHARD}, m.send_at
    LIMIT 1
) n"""


# Each shard's range walked in index order, whatever the statistics say: an ANALYZE taken
# while few messages were scheduled prices a bitmap scan and a sort of a shard's every due
# message as cheap, and a million due at 9:00 would then be read and sorted for a page.
# SET LOCAL: it ends with the promotion's transaction.
_SETTINGS = "SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off"

_LOCK_SHARED = """
SELECT count(pg_advisory_xact_lock_shared($1, s)) FROM (SELECT unnest($2::int[]) AS s ORDER BY 1) q
"""

_ALL_SHARDS = list(range(SHARDS))


class ScheduledMessages(StorePart):
    """The engine's `ScheduledStore` on PostgreSQL, a part of PgStore. On a node among several
    (`handoff` set, by GroupCommit) promotions are fenced by its leases."""

    handoff: Handoff | None = None
    _turn = 0  # where the next statement starts among the shards
    _scheduled_days: OldestDay | None = None

    async def promote_due(
        self, shards: Mapping[int, int] | None, now: float, limit: int, per_shard: int
    ) -> Promoted:
        order = _ALL_SHARDS if shards is None else sorted(shards)
        if not order:
            return Promoted([], None)
        # A different first shard each time: when more is due than a page takes, every
        # shard's earliest are promoted within a few statements.
        self._turn = (self._turn + 1) % len(order)
        order = order[self._turn :] + order[: self._turn]
        handoff = self.handoff

        # From the oldest day partition holding a scheduled message (partitions.OldestDay),
        # not every day of the retention: with 98 of them, the two statements were planned
        # over every one at each poll, whether anything was scheduled or not.
        if self._scheduled_days is None:
            self._scheduled_days = OldestDay(SCHEDULED)
        days = await self._scheduled_days.days(self.db, now)

        async def promote(conn: asyncpg.Connection) -> Promoted:
            async with conn.transaction():
                await conn.execute(_SETTINGS)
                if shards is not None and handoff is not None:
                    await conn.execute(_LOCK_SHARED, handoff.lock_class, order)
                    rows = await conn.fetch(
                        promote_sql(True, days),
                        order,
                        now,
                        limit,
                        per_shard,
                        handoff.node_id,
                        [shards[s] for s in order],
                    )
                else:
                    rows = await conn.fetch(promote_sql(False, days), order, now, limit, per_shard)
                next_due = await conn.fetchval(next_due_sql(days), order)
            return Promoted([pending_sms(r) for r in rows], next_due)

        return await self.db.run(promote, name="PgStore.promote_due")
