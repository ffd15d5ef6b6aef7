"""Reads and reports of messages: one message, keyset pages, the CSV export, the summary.

The SQL builders (`messages_sql`, `summary_sql`) are public: the benchmarks and the query
tests build the same statements.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from smsgw.engine.ports import MessageQuery, SummaryRow
from smsgw.storage.database import StorePart
from smsgw.storage.rows import ID_SLACK, MIN_UUID, id_floor

# The shape of one message in every read: GET /v1/messages/{id}, pages, exports.
MESSAGE_COLUMNS = (
    "id::text, recipient AS to, sender, body AS text, status, reason, segments, price,"
    " express, attempts, operator, operator_message_id, client_ref, created_at, updated_at,"
    " callback_url, send_at"
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
        where.append(f"id >= {arg(id_floor(first[0][0] - ID_SLACK))}")
    if high:
        last = min(high, key=lambda b: (b[0], not b[1]))
        where.append(last[2]())
        where.append(f"id < {arg(id_floor(last[0][0] + ID_SLACK))}")
    else:
        # No message is made later than now: the days ahead, made empty, are not read.
        where.append(f"id < {arg(id_floor(datetime.now(UTC) + ID_SLACK))}")
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

# The CSV export's columns, formatted by PostgreSQL, in the order of the route's header.
_RFC3339 = """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"""
CSV_COLUMNS = (
    "id::text, recipient, sender, body, status, reason, segments, price, express::text,"
    " attempts, operator, operator_message_id, client_ref,"
    f" to_char(created_at AT TIME ZONE 'UTC', {_RFC3339}),"
    f" to_char(updated_at AT TIME ZONE 'UTC', {_RFC3339}),"
    f" to_char(send_at AT TIME ZONE 'UTC', {_RFC3339})"
)


def summary_sql(
    account_id: int,
    created_from: datetime | None,
    created_to: datetime | None,
    group_by: Literal["day", "status"],
) -> tuple[str, list[Any]]:
    """Counts and money per UTC day or per status: an index-only scan of the account's range
    (messages_account_recent carries status, segments and price)."""
    args: list[Any] = [account_id]
    where = ["account_id = $1"]
    if created_from is not None:
        args += [created_from, id_floor(created_from - ID_SLACK)]
        where.append(f"created_at >= ${len(args) - 1} AND id >= ${len(args)}")
    if created_to is not None:
        args += [created_to, id_floor(created_to + ID_SLACK)]
        where.append(f"created_at < ${len(args) - 1} AND id < ${len(args)}")
    else:
        args.append(id_floor(datetime.now(UTC) + ID_SLACK))
        where.append(f"id < ${len(args)}")
    key = "(created_at AT TIME ZONE 'UTC')::date" if group_by == "day" else "status"
    sql = f"""
SELECT {key} AS key,
       count(*) AS messages,
       count(*) FILTER (WHERE status IN ('sent', 'delivered', 'undelivered')) AS sent,
       count(*) FILTER (WHERE status IN ('failed', 'expired', 'cancelled')) AS failed,
       count(*) FILTER (WHERE status IN ('scheduled', 'queued', 'sending')) AS pending,
       count(*) FILTER (WHERE status = 'scheduled') AS scheduled,
       count(*) FILTER (WHERE status = 'delivered') AS delivered,
       count(*) FILTER (WHERE status = 'undelivered') AS undelivered,
       count(*) FILTER (WHERE status = 'expired') AS expired,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       coalesce(sum(segments), 0)::bigint AS segments,
       coalesce(sum(price) FILTER (WHERE status IN ('sent', 'delivered', 'undelivered')), 0)
           ::bigint AS cost,
       coalesce(sum(price) FILTER (WHERE status IN ('scheduled', 'queued', 'sending')), 0)
           ::bigint AS held
FROM messages WHERE {" AND ".join(where)}
GROUP BY 1 ORDER BY 1"""
    return sql, args


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
        sql, args = messages_sql(account_id, query)
        rows = await self.db.run(lambda c: c.fetch(sql, *args))
        return [dict(r) for r in rows]

    async def messages_csv(
        self, account_id: int, query: MessageQuery
    ) -> tuple[bytes, tuple[datetime, str] | None]:
        async def page(conn: asyncpg.Connection) -> tuple[bytes, tuple[datetime, str] | None]:
            chunks: list[bytes] = []

            async def collect(chunk: bytes) -> None:
                chunks.append(chunk)

            # One snapshot for both statements: the page is exactly the rows up to its last.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                sql, args = messages_sql(
                    account_id,
                    query,
                    columns="created_at, id::text",
                    offset=query.limit - 1,
                    limit=1,
                )
                last = await conn.fetchrow(sql, *args)
                through = None if last is None else (last[0], last[1])
                sql, args = messages_sql(account_id, query, columns=CSV_COLUMNS, through=through)
                await conn.copy_from_query(sql, *args, output=collect, format="csv")
            return b"".join(chunks), through

        return await self.db.run(page)

    async def summary(
        self,
        account_id: int,
        created_from: datetime | None,
        created_to: datetime | None,
        group_by: Literal["day", "status"],
    ) -> list[SummaryRow]:
        sql, args = summary_sql(account_id, created_from, created_to, group_by)
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

    async def ping(self) -> bool:
        return bool(await self.db.run(lambda c: c.fetchval("SELECT 1")))
