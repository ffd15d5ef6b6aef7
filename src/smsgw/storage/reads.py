"""Reads and reports of messages: one message, its history, keyset pages, the CSV export,
the summary.

The SQL builders (`messages_sql`, `summary_sql`) are public: the benchmarks and the query
tests build the same statements.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
import msgspec

from smsgw.engine.ports import MessageHistory, MessageQuery, SummaryRow
from smsgw.storage.database import StorePart
from smsgw.storage.rollups import BUCKET_S
from smsgw.storage.rows import ID_SLACK, MIN_UUID, id_floor

# The shape of one message in every read: GET /v1/messages/{id}, pages, exports.
MESSAGE_COLUMNS = (
    "id::text, recipient AS to, sender, body AS text, status, reason, segments, price,"
    " express, attempts, operator, operator_message_id, client_ref, created_at, updated_at,"
    " callback_url, send_at, sent_at, delivered_at"
)


def messages_sql(
    account_id: int,
    query: MessageQuery,
    *,
    columns: str = MESSAGE_COLUMNS,
    through: tuple[datetime, str] | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> tuple[str, list[Any]]:
    """One keyset page: an index range scan on (account_id, created_at, id), or on the
    status, recipient or express index when that filter is given, however deep the page.
    `through` also bounds the page by the position of its last row (inclusive)."""
    args: list[Any] = [account_id]

    def arg(value: Any, cast: str = "") -> str:
        args.append(value)
        return f"${len(args)}{cast}"

    where = ["account_id = $1"]
    if query.status is not None:
        # A literal, so the planner can prove the partial status index's predicate.
        if not _STATUS_LITERAL.match(query.status):
            raise ValueError(f"bad status {query.status!r}")
        where.append(f"status = '{query.status}'")
    if query.to is not None:
        where.append(f"recipient = {arg(query.to)}")
    if query.client_ref is not None:
        where.append(f"client_ref = {arg(query.client_ref)}")
    if query.express is not None:
        # A literal, not a parameter: the partial express index must be provable from it.
        where.append("express" if query.express else "NOT express")
    # At most one bound on each side of (created_at, id): the most restrictive of the range,
    # the cursor and the page's end. With a row comparison and a plain one on the same side,
    # PostgreSQL may start the index scan at the wrong one (at the range's start, not at the
    # cursor), and each page would cost more than the one before.
    # A bound: its position, whether it excludes that position, and its SQL. `created_at >= t`
    # is the position (t, the least uuid) included, `created_at < t` that position excluded.
    low: list[tuple[tuple[datetime, uuid.UUID], bool, Callable[[], str]]] = []
    high: list[tuple[tuple[datetime, uuid.UUID], bool, Callable[[], str]]] = []

    def time_bound(op: str, at: datetime) -> Callable[[], str]:
        return lambda: f"created_at {op} {arg(at)}"

    def row_bound(op: str, position: tuple[datetime, str]) -> Callable[[], str]:
        return lambda: f"(created_at, id) {op} ({arg(position[0])}, {arg(position[1], '::uuid')})"

    if query.created_from is not None:
        low.append(((query.created_from, MIN_UUID), False, time_bound(">=", query.created_from)))
    if query.created_to is not None:
        high.append(((query.created_to, MIN_UUID), True, time_bound("<", query.created_to)))
    if query.after is not None:
        key = (query.after[0], uuid.UUID(query.after[1]))
        if query.ascending:
            low.append((key, True, row_bound(">", query.after)))
        else:
            high.append((key, True, row_bound("<", query.after)))
    if through is not None:
        key = (through[0], uuid.UUID(through[1]))
        if query.ascending:
            high.append((key, False, row_bound("<=", through)))
        else:
            low.append((key, False, row_bound(">=", through)))
    # Each bound also bounds the ids (rows.ID_SLACK), so the page reads only the day
    # partitions of its range; not being on the index's leading columns, it cannot move
    # where the index scan starts.
    if low:
        first = max(low, key=lambda b: (b[0], b[1]))
        where.append(first[2]())
        where.append(f"id >= {arg(id_floor(first[0][0], -ID_SLACK))}")
    if high:
        last = min(high, key=lambda b: (b[0], not b[1]))
        where.append(last[2]())
        where.append(f"id < {arg(id_floor(last[0][0], ID_SLACK))}")
    else:
        # No message is made later than now: the days ahead, made empty, are not read.
        where.append(f"id < {arg(id_floor(datetime.now(UTC), ID_SLACK))}")
    direction = "ASC" if query.ascending else "DESC"
    # messages.id, not id: the bare name would be the output column (the id as text), and the
    # index could no longer give the order by itself.
    sql = (
        f"SELECT {columns} FROM messages WHERE {' AND '.join(where)}"
        f" ORDER BY messages.created_at {direction}, messages.id {direction}"
        + (f" OFFSET {int(offset)}" if offset else "")
        + f" LIMIT {arg(query.limit if limit is None else limit)}"
    )
    return sql, args


_STATUS_LITERAL = re.compile(r"^[a-z_]{1,20}$")

# A page reads the day next to where it starts first: newest first, the day before its upper
# end (the cursor, `created_to` or now); oldest first (the export), the day after its lower end
# (the cursor or `created_from`). That is a day or two of partitions. Only when the day holds
# fewer rows than the page is the whole range read, whose plan merges the index ranges of every
# day partition in it (a page over 31 days: 31 index scans started, a p99 six times a day's;
# an export's page planned over every day left of its range). The day's rows all come before
# any row outside it in the page's order, so a page it fills is the range's page.
FIRST_DAY = timedelta(days=1)


def _scopes(query: MessageQuery) -> list[MessageQuery]:
    """The queries a page tries in turn: its first day, when that is narrower, then itself."""
    day = first_day(query, datetime.now(UTC))
    return [query] if day is None else [day, query]


def first_day(query: MessageQuery, now: datetime) -> MessageQuery | None:
    """`query` narrowed to the day where its page starts, when the range is longer; None
    otherwise, and for a page by recipient or client_ref, which a day rarely fills (the whole
    range would be read after it)."""
    if query.to is not None or query.client_ref is not None:
        return None
    if query.ascending:
        bottom = query.created_from
        if query.after is not None:
            bottom = query.after[0] if bottom is None else max(bottom, query.after[0])
        if bottom is None or _LAST - bottom <= FIRST_DAY:  # the calendar's last day
            return None
        end = bottom + FIRST_DAY
        if (query.created_to or now) <= end:
            return None
        return msgspec.structs.replace(query, created_to=end)
    top = query.after[0] if query.after is not None else query.created_to or now
    if query.created_to is not None:
        top = min(top, query.created_to)
    if top - datetime.min.replace(tzinfo=UTC) <= FIRST_DAY:  # the calendar's first day
        return None
    start = top - FIRST_DAY
    if query.created_from is not None and query.created_from >= start:
        return None
    return msgspec.structs.replace(query, created_from=start)


# The CSV export's columns, formatted by PostgreSQL, in the order of the route's header.
_RFC3339 = """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"""
CSV_COLUMNS = (
    "id::text, recipient, sender, body, status, reason, segments, price, express::text,"
    " attempts, operator, operator_message_id, client_ref,"
    f" to_char(created_at AT TIME ZONE 'UTC', {_RFC3339}),"
    f" to_char(updated_at AT TIME ZONE 'UTC', {_RFC3339}),"
    f" to_char(send_at AT TIME ZONE 'UTC', {_RFC3339}),"
    f" to_char(sent_at AT TIME ZONE 'UTC', {_RFC3339}),"
    f" to_char(delivered_at AT TIME ZONE 'UTC', {_RFC3339})"
)


SummaryGrouping = Literal["day", "status", "operator", "sender", "country"]

# The group of a summary row, over the rows `summary_sql` sums (`at`: a bucket's start or a
# message's created_at; {tz}: the time zone of days).
_GROUP_KEY = {
    "day": "(s.at AT TIME ZONE {tz})::date",
    "status": "s.status",
    "operator": "s.operator",
    "sender": "s.sender",
    "country": "s.country",
}
_BUCKET = timedelta(seconds=BUCKET_S)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LAST = datetime.max.replace(tzinfo=UTC)


def _bucket_floor(at: datetime) -> datetime:
    return _EPOCH + (at - _EPOCH) // _BUCKET * _BUCKET


def _bucket_ceil(at: datetime) -> datetime:
    start = _bucket_floor(at)
    if start == at:
        return start
    if start > _LAST - _BUCKET:
        return _LAST  # in the year 9999's last bucket: no whole bucket starts after it
    return start + _BUCKET


def summary_sql(
    account_id: int,
    created_from: datetime | None,
    created_to: datetime | None,
    group_by: SummaryGrouping,
    tz: str = "UTC",
) -> tuple[str, list[Any]]:
    """Counts and money per day (in `tz`, an IANA zone), status, operator, sender or country,
    exact for any range: the rollups (migration 018) of the whole 15-minute buckets in
    [created_from, created_to), plus a scan of the account's messages in the part of a bucket
    at each end that the range cuts (a range of messages_account_created), in one snapshot."""
    args: list[Any] = [account_id]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    def scan(low: datetime | None, high: datetime | None) -> str:
        # The id bounds keep the scan to the days of its range (day partitions, 019).
        where = ["m.account_id = $1"]
        if low is not None:
            where.append(f"m.created_at >= {arg(low)} AND m.id >= {arg(id_floor(low, -ID_SLACK))}")
        if high is not None:
            where.append(f"m.created_at < {arg(high)}")
        upper = datetime.now(UTC) if high is None else high
        where.append(f"m.id < {arg(id_floor(upper, ID_SLACK))}")
        return f"""
    SELECT m.created_at, m.status, m.operator, m.sender, smsgw_calling_code(m.recipient),
           1, m.segments, m.price
    FROM messages m WHERE {" AND ".join(where)}"""

    first = None if created_from is None else _bucket_ceil(created_from)
    last = None if created_to is None else _bucket_floor(created_to)
    if first is not None and last is not None and first >= last:
        parts = [scan(created_from, created_to)]  # no whole bucket: the range is small
    else:
        where = ["r.account_id = $1"]
        if first is not None:
            where.append(f"r.bucket >= {arg(first)}")
        if last is not None:
            where.append(f"r.bucket < {arg(last)}")
        parts = [
            f"""
    SELECT r.bucket, r.status, r.operator, r.sender, r.country, r.messages, r.segments, r.price
    FROM message_rollups r WHERE {" AND ".join(where)}"""
        ]
        if created_from is not None and first is not None and created_from < first:
            parts.append(scan(created_from, first))
        if created_to is not None and last is not None and last < created_to:
            parts.append(scan(last, created_to))
    key = _GROUP_KEY[group_by].format(tz=arg(tz) if group_by == "day" else "")
    sql = f"""
SELECT {key} AS key,
       sum(s.messages)::bigint AS messages,
       coalesce(sum(s.messages) FILTER (WHERE s.status IN ('sent', 'delivered', 'undelivered')),
                0)::bigint AS sent,
       coalesce(sum(s.messages) FILTER (WHERE s.status IN ('failed', 'expired', 'cancelled')),
                0)::bigint AS failed,
       coalesce(sum(s.messages) FILTER (WHERE s.status IN ('scheduled', 'queued', 'sending')),
                0)::bigint AS pending,
       coalesce(sum(s.messages) FILTER (WHERE s.status = 'scheduled'), 0)::bigint AS scheduled,
       coalesce(sum(s.messages) FILTER (WHERE s.status = 'delivered'), 0)::bigint AS delivered,
       coalesce(sum(s.messages) FILTER (WHERE s.status = 'undelivered'), 0)::bigint
           AS undelivered,
       coalesce(sum(s.messages) FILTER (WHERE s.status = 'expired'), 0)::bigint AS expired,
       coalesce(sum(s.messages) FILTER (WHERE s.status = 'cancelled'), 0)::bigint AS cancelled,
       coalesce(sum(s.segments), 0)::bigint AS segments,
       coalesce(sum(s.price) FILTER (WHERE s.status IN ('sent', 'delivered', 'undelivered')), 0)
           ::bigint AS cost,
       coalesce(sum(s.price) FILTER (WHERE s.status IN ('scheduled', 'queued', 'sending')), 0)
           ::bigint AS held
FROM ({" UNION ALL ".join(parts)}
) AS s (at, status, operator, sender, country, messages, segments, price)
GROUP BY 1 HAVING sum(s.messages) > 0 ORDER BY 1"""
    return sql, args


# A message's history (migration 017) in the order it happened, on the table's key. What
# did not happen to an event is NULL, and left out of the answer.
_MESSAGE_OF_EVENTS = (
    "SELECT created_at, send_at FROM messages WHERE id = $1::uuid AND account_id = $2"
)
_EVENTS = """
SELECT type, at, attempt, operator, result, operator_message_id, status, reason, delivery_id,
       http_status, error
FROM message_events WHERE message_id = $1::uuid ORDER BY at, seq
"""


# An export page's statements run under these, in its transaction. Planned for the page's
# bounds each time: the generic plan a cached statement gets after five pages cannot prune the
# day partitions by them, and found the page's last row in 1.1-1.4 s instead of 2 ms over 30
# days (an export of 10M rows is 2,000 pages). And never sorted: bounded by its last row, a
# page's id range is a few hours, over which the planner preferred the primary key and a sort
# of every account's rows in it to the account's own index, which gives the order (22.8
# against 12.9 ms for a page of 5,000 of a heavy account's rows).
EXPORT_SETTINGS = "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_sort = off"


async def export_page(
    conn: asyncpg.Connection, account_id: int, query: MessageQuery
) -> tuple[str, list[Any], tuple[datetime, str] | None]:
    """An export page's CSV query and its arguments, and its last row: looked for in the
    page's first day before the whole range (_scopes); None when the range has no more than
    the rest, which is then the last page. Run under EXPORT_SETTINGS, in the transaction
    whose snapshot the CSV query then reads."""
    last = None
    for scope in _scopes(query):
        sql, args = messages_sql(
            account_id, scope, columns="created_at, id::text", offset=query.limit - 1, limit=1
        )
        last = await conn.fetchrow(sql, *args)
        if last is not None:
            break
    through = None if last is None else (last[0], last[1])
    sql, args = messages_sql(account_id, scope, columns=CSV_COLUMNS, through=through)
    return sql, args, through


class MessageReads(StorePart):
    """PgStore's reads of messages for the HTTP layer (the message half of `Reads`)."""

    async def message(self, account_id: int, message_id: str) -> dict[str, Any] | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1::uuid AND account_id = $2",
                message_id,
                account_id,
            )
        )
        return None if row is None else dict(row)

    async def message_by_client_ref(
        self, account_id: int, client_ref: str
    ) -> dict[str, Any] | None:
        """The account's newest message with this client_ref (a ref is unique for a day
        and the day before it, and may be used again after that: migration 019)."""
        row = await self.db.run(
            lambda c: c.fetchrow(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE account_id = $1 AND client_ref = $2"
                " ORDER BY messages.id DESC LIMIT 1",
                account_id,
                client_ref,
            )
        )
        return None if row is None else dict(row)

    async def messages(self, account_id: int, query: MessageQuery) -> list[dict[str, Any]]:
        async def page(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = []
            for scope in _scopes(query):
                sql, args = messages_sql(account_id, scope)
                rows = await conn.fetch(sql, *args)
                if len(rows) >= query.limit:
                    break
            return rows

        return [dict(r) for r in await self.db.run(page)]

    async def messages_csv(
        self, account_id: int, query: MessageQuery
    ) -> tuple[bytes, tuple[datetime, str] | None]:
        async def page(conn: asyncpg.Connection) -> tuple[bytes, tuple[datetime, str] | None]:
            chunks: list[bytes] = []

            async def collect(chunk: bytes) -> None:
                chunks.append(chunk)

            # One snapshot for both statements: the page is exactly the rows up to its last.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute(EXPORT_SETTINGS)
                sql, args, through = await export_page(conn, account_id, query)
                await conn.copy_from_query(sql, *args, output=collect, format="csv")
            return b"".join(chunks), through

        return await self.db.run(page)

    async def summary(
        self,
        account_id: int,
        created_from: datetime | None,
        created_to: datetime | None,
        group_by: SummaryGrouping,
        tz: str = "UTC",
    ) -> list[SummaryRow]:
        sql, args = summary_sql(account_id, created_from, created_to, group_by, tz)
        rows = await self.db.run(lambda c: c.fetch(sql, *args))
        return [
            SummaryRow(
                key=r["key"].isoformat() if group_by == "day" else r["key"],
                messages=r["messages"],
                sent=r["sent"],
                failed=r["failed"],
                pending=r["pending"],
                segments=r["segments"],
                cost=r["cost"],
                held=r["held"],
                delivered=r["delivered"],
                undelivered=r["undelivered"],
                expired=r["expired"],
                cancelled=r["cancelled"],
                scheduled=r["scheduled"],
            )
            for r in rows
        ]

    async def message_events(self, account_id: int, message_id: str) -> MessageHistory | None:
        async def read(conn: asyncpg.Connection) -> MessageHistory | None:
            # One snapshot: no event of the message is newer than the row read with it.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(_MESSAGE_OF_EVENTS, message_id, account_id)
                if row is None:
                    return None
                events = await conn.fetch(_EVENTS, message_id)
            return MessageHistory(row["created_at"], row["send_at"], [dict(e) for e in events])

        return await self.db.run(read, name="message_events")

    async def ping(self) -> bool:
        return bool(await self.db.run(lambda c: c.fetchval("SELECT 1")))
