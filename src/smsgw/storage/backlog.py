"""The backlog as dispatch reads it: recovery at start, the Scheduler's pages and bodies.

Every message not final yet when a node starts (recovery), each account's next page of queued
bulk for the Scheduler, the bodies of the messages it dispatches, and the accounts' send rates.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import Recovered, stream_key, stream_parts
from smsgw.storage.database import StorePart
from smsgw.storage.partitions import PENDING, SCHEDULED, OldestDay
from smsgw.storage.rows import (
    MIN_UUID,
    PENDING_COLUMNS,
    STREAM_SHARD,
    Days,
    at_micros,
    ids_days,
    micros_of,
    pending_sms,
    within_days,
)

_PENDING_EXPRESS = f"""
SELECT {PENDING_COLUMNS} FROM messages
WHERE status IN ('queued', 'sending') AND express ORDER BY created_at
"""

_PENDING_BULK = f"""
SELECT account_id, {STREAM_SHARD} AS shard, count(*) AS n FROM messages
WHERE status IN ('queued', 'sending') AND NOT express GROUP BY 1, 2
"""

# Each stream's next queued bulk messages after its cursor (a stream: an account's bulk under
# one dispatch shard, ports.stream_key): a range scan of messages_account_status per account,
# the other streams' rows of the account filtered out on the way, all streams in one
# statement. That index only: the status index's predicate is stated as such, and 'queued' is
# a value the planner cannot read while it plans (rows.NOT_FINAL says why), so
# messages_pending, which a literal 'queued' would make a candidate, is not one (after an
# ANALYZE taken while few messages were pending, a walk of every pending message of every
# account looked cheaper than each account's own range).
# The id bounds let each account's range skip the day partitions before its cursor's day
# (a message's id is made just after its created_at: rows.ID_SLACK) and the days ahead. The
# range is in (created_at, id) order, and partitions are by id: with sorts disabled, the
# partitions' ranges are merged (each an index scan in that order) rather than read whole and
# sorted, which for an account with a deep queue would read all of it for every page.
_PAGE_SETTINGS = "SET LOCAL enable_sort = off"
_PAGE_ENTRIES = f"""
SELECT x.i, m.created_at, m.id::text, m.segments
FROM unnest($1::bigint[], $2::timestamptz[], $3::uuid[], $4::int[], $5::int[], $6::int[])
     AS x(account_id, after_at, after_id, n, i, shard)
CROSS JOIN LATERAL (
    SELECT created_at, id, segments FROM messages
    WHERE account_id = x.account_id AND NOT express AND {STREAM_SHARD} = x.shard
      AND status NOT IN ('sent', 'delivered') AND status = (SELECT 'queued')
      AND (created_at, id) > (x.after_at, x.after_id)
      AND id >= uuid7_floor(x.after_at - interval '1 hour')
      AND id < uuid7_floor(now() + interval '1 hour') AND {{within}}
    ORDER BY created_at, id LIMIT x.n
) m
ORDER BY x.i, m.created_at, m.id
"""

# By primary key (a literal 'queued' would make messages_pending a candidate: rows.NOT_FINAL),
# one probe per id: the join finds each in its own day's partition, as a prepared statement's
# generic plan would not for `id = ANY($1)` (it probes every partition for every id). The ids'
# days are in the text (rows.within_days): the cached plan holds only those partitions.
_QUEUED_MESSAGES = f"""
SELECT {PENDING_COLUMNS}
FROM (SELECT DISTINCT id FROM unnest($1::uuid[]) AS u(id)) x JOIN messages ON messages.id = x.id
WHERE {{within}} AND status = (SELECT 'queued')
"""


@functools.lru_cache(maxsize=16)
def queued_messages_sql(days: Days | None) -> str:
    return _QUEUED_MESSAGES.replace("{within}", within_days("messages.id", days))


@functools.lru_cache(maxsize=16)
def page_entries_sql(days: Days) -> str:
    """_PAGE_ENTRIES over the day partitions of `days` (`Backlog._pending_days`)."""
    return _PAGE_ENTRIES.replace("{within}", within_days("id", days))


_DISPATCH_RATES = """
SELECT id, CASE WHEN suspended_at IS NOT NULL THEN 0.0 ELSE send_rate END AS rate
FROM accounts WHERE send_rate IS NOT NULL OR suspended_at IS NOT NULL
"""

_BEFORE_ALL = datetime(1, 1, 1, tzinfo=UTC)


class Backlog(StorePart):
    """The read side of the engine's `MessageStore`: recovery, pages and bodies for dispatch."""

    # The days from the oldest partition holding a pending (or scheduled: it becomes pending
    # where it is) message, which the pages read instead of every day of the retention.
    _pending_days: OldestDay | None = None

    async def recover(self) -> Recovered:
        async def _recover(conn: asyncpg.Connection) -> Recovered:
            express = [pending_sms(r) for r in await conn.fetch(_PENDING_EXPRESS)]
            backlogs = [
                (stream_key(r["account_id"], r["shard"]), r["n"])
                for r in await conn.fetch(_PENDING_BULK)
            ]
            return Recovered(express, backlogs)

        return await self.db.run(_recover)

    async def dispatch_rates(self) -> list[tuple[int, float]]:
        rows = await self.db.run(lambda c: c.fetch(_DISPATCH_RATES))
        return [(r["id"], r["rate"]) for r in rows]

    async def page_entries(
        self, requests: Sequence[tuple[int, tuple[int, str], int]]
    ) -> list[list[tuple[int, str, int]]]:
        accounts, after_at, after_id, sizes, shards = [], [], [], [], []
        for key, (at_us, message_id), n in requests:
            account_id, shard = stream_parts(key)
            accounts.append(account_id)
            shards.append(shard)
            if at_us < 0:
                after_at.append(_BEFORE_ALL)
                after_id.append(MIN_UUID)
            else:
                # Exact: asyncpg sends whole microseconds, as PostgreSQL stores them.
                after_at.append(at_micros(at_us))
                after_id.append(uuid.UUID(message_id))
            sizes.append(n)

        if self._pending_days is None:
            self._pending_days = OldestDay(PENDING, SCHEDULED)
        sql = page_entries_sql(await self._pending_days.days(self.db, time.time()))

        async def page(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            async with conn.transaction():
                await conn.execute(_PAGE_SETTINGS)
                rows: list[asyncpg.Record] = await conn.fetch(
                    sql,
                    accounts,
                    after_at,
                    after_id,
                    sizes,
                    list(range(len(requests))),
                    shards,
                )
            return rows

        rows = await self.db.run(page)
        pages: list[list[tuple[int, str, int]]] = [[] for _ in requests]
        for r in rows:
            at_us = micros_of(r["created_at"])
            pages[r["i"]].append((at_us, r["id"], r["segments"]))
        return pages

    async def queued_messages(self, ids: Sequence[str]) -> list[OutboundSms]:
        sql = queued_messages_sql(ids_days(ids))
        rows = await self.db.run(lambda c: c.fetch(sql, list(ids)))
        return [pending_sms(r) for r in rows]
