"""The day partitions (migration 019): made ahead, dropped past the retention, bodies redacted.

Every table listed in `day_partitioned` is partitioned by UTC day on a UUIDv7 column; this
module keeps their partitions. The node holding the upkeep duty (engine/upkeep.py) calls it
about once an hour; `migrate` makes the days ahead at every start, so a node alone, or a test,
never meets a missing partition.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import asyncpg
import trio

from smsgw.engine.ports import Dropped
from smsgw.storage.database import Database, StorePart
from smsgw.storage.rows import DAY_S, Days, day_number

log = logging.getLogger("smsgw.storage")

# Partitions from yesterday (a node's clock a little behind) to this many days ahead.
DAYS_AHEAD = 7

ADD_AHEAD = """
SELECT p.part FROM day_partitioned t
CROSS JOIN generate_series((now() AT TIME ZONE 'UTC')::date - 1,
                           (now() AT TIME ZONE 'UTC')::date + $1::int, interval '1 day') AS d
CROSS JOIN LATERAL (SELECT smsgw_add_day_partition(t.parent, d::date) AS part) p
WHERE p.part IS NOT NULL
"""

# Each listed table's partitions, `messages`' first: a day of the tables that follow it (the
# history, migration 020) is kept while its messages' day is.
_PARTITIONS = """
SELECT t.parent, c.relname AS part, t.pending FROM day_partitioned t
JOIN pg_inherits i ON i.inhparent = to_regclass(quote_ident(t.parent))
JOIN pg_class c ON c.oid = i.inhrelid
ORDER BY t.parent <> 'messages', t.parent, c.relname
"""

# A partition is detached and dropped under a lock on its parent that every statement on the
# parent conflicts with, held for the milliseconds the drop takes. Waiting for it behind a
# long read would stop every statement queued behind the wait: past this, the drop gives up
# (logged) and is tried again at the next round.
_DROP_LOCK_TIMEOUT = "500ms"

# Bodies are redacted this many messages a statement, with this pause between statements, so
# the group commits writing the same table keep their pace.
REDACT_BATCH = 5_000
REDACT_PAUSE_S = 0.05

# One batch: of the messages after the id $1 made before the time $2 (by their ids), the
# next $3 in id order, whose bodies are emptied unless the message is not final yet (its body
# is still to be sent) or the body is empty already. Returns the last id it looked at (NULL:
# none was left). The primary key's order walks one partition after another.
_REDACT = """
WITH batch AS MATERIALIZED (
    SELECT id FROM messages WHERE id > $1::uuid AND id < uuid7_floor($2) ORDER BY id LIMIT $3
), done AS (
    UPDATE messages m SET body = ''
    FROM batch b
    WHERE m.id = b.id AND m.id > $1::uuid AND m.id < uuid7_floor($2) AND m.body <> ''
      AND m.status NOT IN ('queued', 'sending', 'scheduled')
    RETURNING 1
), moved AS (
    UPDATE day_partitioned SET redacted_through = l.id
    FROM (SELECT id FROM batch ORDER BY id DESC LIMIT 1) l
    WHERE parent = 'messages'
    RETURNING l.id
)
SELECT (SELECT id::text FROM moved) AS last, (SELECT count(*) FROM done) AS redacted
"""

_REDACTED_THROUGH = """
SELECT coalesce(redacted_through, '00000000-0000-0000-0000-000000000000')::text
FROM day_partitioned WHERE parent = 'messages'
"""

# The statistics of the days being written. PostgreSQL plans a cached (generic) statement by the
# size each partition had when the plan was made, and keeps the plan until the partition's
# statistics change: planned while today's partition was nearly empty (every morning's first
# minutes, every start), the hourly limit's probe of the group commit walked every message of
# the hour by the primary key instead of the recipient index (20,000 rows a recipient after
# 20,000 messages). Autovacuum analyzes a partition a minute or more after it starts to fill;
# this does it as soon as the partition has grown `factor` times since its last statistics,
# from `min_pages` on: about ten times a day, each plan made again once after it.
_GROWN = """
SELECT p.part FROM unnest($1::text[]) AS p(part)
JOIN pg_class c ON c.oid = to_regclass(quote_ident(p.part))
WHERE pg_relation_size(c.oid)
      >= greatest($2::int, $3::float8 * c.relpages) * current_setting('block_size')::int
"""
_ANALYZE_LOCK_TIMEOUT = "1s"

_DAY = re.compile(r"_(\d{8})$")


def day_of(partition: str) -> date | None:
    """The UTC day of a partition, by its name (parent_YYYYMMDD)."""
    m = _DAY.search(partition)
    return None if m is None else datetime.strptime(m.group(1), "%Y%m%d").date()


# Where messages not final are. A message is made (its id, so its day partition) when it is
# accepted: a queued or scheduled one is only ever written to today's partition (yesterday's,
# for a node's clock a little behind), and an old one only leaves those statuses (a scheduled
# one becomes queued where it is). So a day partition found without a message of a status
# never gets one again, the oldest day holding one only moves forward, and a day found at any
# earlier time is a right lower bound, only a wider one. Statements that look for such
# messages of any day (the Scheduler's pages, the scheduled promotion) name the days from it
# to tomorrow in their text (rows.within_days) instead of reading, and planning, every day
# partition of the retention. Each status is tested as its partial index's predicate says it
# (messages_pending, messages_scheduled): one probe of a small index per partition.
PENDING = "m.status IN ('queued', 'sending')"
SCHEDULED = "m.status = 'scheduled'"
OLDEST_DAY_EVERY_S = 600.0  # how often OldestDay looks again

_MESSAGES_PARTITIONS = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass('messages')
"""


def _oldest_sql(parts: list[str], statuses: Sequence[str]) -> str:
    """The first of `parts` (in day order) holding a message of one of `statuses`."""
    probes = " UNION ALL ".join(
        f"SELECT {i} AS i WHERE "
        + " OR ".join(f'EXISTS (SELECT FROM "{p}" m WHERE {status})' for status in statuses)
        for i, p in enumerate(parts)
    )
    return f"SELECT min(i) FROM ({probes}) o"


async def oldest_day_holding(conn: asyncpg.Connection, today: int, statuses: Sequence[str]) -> int:
    """The oldest day (days since 1970-01-01) whose partition of `messages` holds a message of
    one of `statuses` (PENDING, SCHEDULED), or the day before `today` when none before it
    does."""
    days = sorted(
        (day_number(day), r["relname"])
        for r in await conn.fetch(_MESSAGES_PARTITIONS)
        # Partitions' names are messages_YYYYMMDD (day_of): nothing to quote.
        if (day := day_of(r["relname"])) is not None and day_number(day) < today - 1
    )
    if not days:
        return today - 1
    first = await conn.fetchval(_oldest_sql([p for _, p in days], statuses))
    return today - 1 if first is None else days[first][0]


class OldestDay:
    """`oldest_day_holding` for some statuses, looked up again every OLDEST_DAY_EVERY_S."""

    def __init__(self, *statuses: str) -> None:
        self._statuses = statuses
        self._day: int | None = None
        self._at = -math.inf

    async def days(self, db: Database, now: float) -> Days:
        """The days from the oldest holding one of the statuses to tomorrow (`now`: Unix
        seconds), for rows.within_days."""
        today = int(now // DAY_S)
        if self._day is None or time.monotonic() - self._at > OLDEST_DAY_EVERY_S:
            statuses = self._statuses
            self._day = await db.run(lambda c: oldest_day_holding(c, today, statuses))
            self._at = time.monotonic()
        return min(self._day, today - 1), today + 1


class Partitions(StorePart):
    """The engine's `UpkeepStore` on PostgreSQL."""

    async def add_partitions(self) -> list[str]:
        rows = await self.db.run(lambda c: c.fetch(ADD_AHEAD, DAYS_AHEAD))
        return [r["part"] for r in rows]

    async def drop_partitions(self, before: date) -> Dropped:
        """Drops the day partitions of every listed table whose day is before `before`, but
        those whose table's `day_partitioned.pending` query finds a row that must stay."""
        dropped = Dropped()
        rows = await self.db.run(lambda c: c.fetch(_PARTITIONS))
        for r in rows:
            day = day_of(r["part"])
            if day is None or day >= before:
                continue
            drop = functools.partial(
                drop_partition, parent=r["parent"], part=r["part"], pending=r["pending"]
            )
            if await self.db.run(drop):
                dropped.dropped.append(r["part"])
            else:
                dropped.kept.append(r["part"])
        return dropped

    async def analyze_grown(
        self, days: Sequence[date], *, min_pages: int = 16, factor: float = 4.0
    ) -> list[str]:
        """ANALYZE the partitions of `messages` of `days` that grew `factor` times since
        their last statistics (and to `min_pages` at least); returns their names (_GROWN)."""
        names = [f"messages_{day:%Y%m%d}" for day in days]
        grown = await self.db.run(lambda c: c.fetch(_GROWN, names, min_pages, factor))
        done = []
        for r in grown:
            if await self.db.run(functools.partial(_analyze, part=r["part"])):
                done.append(r["part"])
        return done

    async def redact_bodies(self, before: datetime, limit: int) -> int:
        """Empties the bodies of final messages made before `before` (by their ids),
        REDACT_BATCH a statement, from where the last call stopped
        (`day_partitioned.redacted_through`), until about `limit` are done."""
        redacted = 0
        after = await self.db.run(lambda c: c.fetchval(_REDACTED_THROUGH))
        while redacted < limit:
            row = await self.db.run(functools.partial(_redact_batch, after=after, before=before))
            redacted += row["redacted"]
            if row["last"] is None:
                break
            after = row["last"]
            await trio.sleep(REDACT_PAUSE_S)
        return redacted


async def _redact_batch(conn: asyncpg.Connection, *, after: str, before: datetime) -> Any:
    return await conn.fetchrow(_REDACT, after, before, REDACT_BATCH)


async def _analyze(conn: asyncpg.Connection, *, part: str) -> bool:
    """ANALYZE `part`, unless another session (autovacuum, a DDL) holds it past a second:
    then the next call finds it grown still. False: not done."""
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{_ANALYZE_LOCK_TIMEOUT}'")
            await conn.execute(f'ANALYZE "{part}"')
    except asyncpg.LockNotAvailableError:
        return False
    return True


async def drop_partition(
    conn: asyncpg.Connection, *, parent: str, part: str, pending: str | None
) -> bool:
    """Detach and drop `part` of `parent` unless a row of it is `pending`; False: kept."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{_DROP_LOCK_TIMEOUT}'")
        if pending is not None and await conn.fetchval(
            await conn.fetchval("SELECT format($1, $2::text)", pending, part)
        ):
            log.warning("partition %s is past the retention but holds pending rows: kept", part)
            return False
        await conn.execute(f'ALTER TABLE "{parent}" DETACH PARTITION "{part}"')
        await conn.execute(f'DROP TABLE "{part}"')
    log.info("dropped partition %s, past the retention", part)
    return True
