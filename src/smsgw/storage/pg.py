"""PostgreSQL through asyncpg on trio-asyncio: the pool, migrations, group commits and reads.

Every public coroutine here is a trio coroutine that crosses into asyncio once (about 0.3 ms
of bridging), so each one does a whole unit of work on the asyncio side: a group commit is one
crossing and one transaction, however many requests it carries.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Literal, ParamSpec, TypeVar

import asyncpg
import trio
import trio_asyncio

from smsgw.engine.credit import AccountCredit, CreditBook
from smsgw.engine.messages import AcceptResult, Account, AccountSettings, OutboundSms
from smsgw.engine.ports import (
    GroupResult,
    IdempotencyClaim,
    MessageQuery,
    Recovered,
    SummaryRow,
    WriteGroup,
)

log = logging.getLogger("smsgw.storage")

P = ParamSpec("P")
T = TypeVar("T")

# Transient conflicts a group simply runs again.
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Open a trio-asyncio loop unless this task already runs inside one."""
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    async with trio_asyncio.open_loop():
        yield


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release (a round trip per group commit): this code leaves
    no session state behind (no SET, LISTEN or cursors; advisory locks are per transaction)."""


def _bridge(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


class Database:
    """A connection pool in one schema. Create with `await Database.open(url)` inside a
    trio-asyncio loop; close with `await db.close()`."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool = pool
        self.schema = schema

    @classmethod
    async def open(
        cls, url: str, *, schema: str = "public", min_size: int = 2, max_size: int = 6
    ) -> Database:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"bad schema name {schema!r}")

        async def _open() -> asyncpg.Pool:
            if schema != "public":
                conn = await asyncpg.connect(url)
                try:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                finally:
                    await conn.close()
            return await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                reset=_keep_session,
                server_settings={"search_path": schema, "application_name": "smsgw"},
            )

        return cls(await _bridge(_open)(), schema)

    async def close(self) -> None:
        await _bridge(self.pool.close)()

    async def run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `fn(connection)` on the asyncio side: one bridge crossing for all it does."""

        async def _run() -> T:
            async with self.pool.acquire() as conn:
                return await fn(conn)

        return await _bridge(_run)()


# --- migrations ---------------------------------------------------------------------------


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every numbered file in storage/migrations, in order."""
    found = []
    for entry in resources.files("smsgw.storage.migrations").iterdir():
        m = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(db: Database) -> list[str]:
    """Apply the migrations not yet applied; returns their names. Safe when nodes race: an
    advisory lock lets one node migrate while the others wait."""

    async def _migrate(conn: asyncpg.Connection) -> list[str]:
        applied: list[str] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(727274)")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migration_files():
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
                applied.append(name)
        return applied

    return await db.run(_migrate)


# --- the store ----------------------------------------------------------------------------

_LOCK_ACCOUNTS = """
SELECT id, balance, held, captured, topped_up FROM accounts
WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
"""

_INSERT_MESSAGES = """
INSERT INTO messages (id, account_id, recipient, sender, body, segments, price, express,
                      client_ref, status, deadline, created_at, updated_at)
SELECT x.id, x.account_id, x.recipient, x.sender, x.body, x.segments, x.price, x.express,
       x.client_ref, 'queued', to_timestamp(x.deadline), to_timestamp(x.created_at),
       to_timestamp(x.created_at)
FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::int[], $7::int[],
            $8::bool[], $9::text[], $10::float8[], $11::float8[])
     AS x(id, account_id, recipient, sender, body, segments, price, express, client_ref,
          deadline, created_at)
ON CONFLICT (account_id, client_ref) WHERE client_ref IS NOT NULL DO NOTHING
RETURNING id::text
"""

# Only a message that is not final yet takes an outcome: exactly one outcome per message,
# whatever retries or recoveries deliver twice.
_FINISH_MESSAGES = """
UPDATE messages m
SET status = x.status, reason = x.reason, operator = x.operator,
    operator_message_id = x.operator_message_id, attempts = x.attempts,
    updated_at = to_timestamp(x.at)
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::float8[])
     AS x(id, status, reason, operator, operator_message_id, attempts, at)
WHERE m.id = x.id AND m.status IN ('queued', 'sending')
RETURNING m.account_id, m.price, x.status
"""

_UPDATE_ACCOUNTS = """
UPDATE accounts a
SET balance = x.balance, held = x.held, captured = x.captured, topped_up = x.topped_up
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
     AS x(id, balance, held, captured, topped_up)
WHERE a.id = x.id
"""

_INSERT_LEDGER = """
INSERT INTO credit_ledger (account_id, kind, amount, messages)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::int[])
"""

_MESSAGE_FIELDS = """
id::text, account_id, recipient, sender, body, segments, price, express, client_ref,
extract(epoch FROM created_at)::float8 AS created_at,
extract(epoch FROM deadline)::float8 AS deadline, attempts
"""

_PENDING_EXPRESS = f"""
SELECT {_MESSAGE_FIELDS} FROM messages
WHERE status IN ('queued', 'sending') AND express ORDER BY created_at
"""

_PENDING_BULK = """
SELECT account_id, count(*) AS n FROM messages
WHERE status IN ('queued', 'sending') AND NOT express GROUP BY account_id
"""

# Each account's next queued bulk messages after its cursor: a backward range scan of
# messages_account_status per account, all accounts in one statement.
_PAGE_ENTRIES = """
SELECT x.i, m.created_at, m.id::text, m.segments
FROM unnest($1::bigint[], $2::timestamptz[], $3::uuid[], $4::int[], $5::int[])
     AS x(account_id, after_at, after_id, n, i)
CROSS JOIN LATERAL (
    SELECT created_at, id, segments FROM messages
    WHERE account_id = x.account_id AND status = 'queued' AND NOT express
      AND (created_at, id) > (x.after_at, x.after_id)
    ORDER BY created_at, id LIMIT x.n
) m
ORDER BY x.i, m.created_at, m.id
"""

_QUEUED_MESSAGES = f"""
SELECT {_MESSAGE_FIELDS} FROM messages WHERE id = ANY($1::uuid[]) AND status = 'queued'
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BEFORE_ALL = datetime(1, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)


def _sms(r: asyncpg.Record) -> OutboundSms:
    return OutboundSms(
        id=r["id"],
        account_id=r["account_id"],
        to=r["recipient"],
        sender=r["sender"],
        text=r["body"],
        segments=r["segments"],
        price=r["price"],
        express=r["express"],
        client_ref=r["client_ref"],
        created_at=r["created_at"],
        deadline=r["deadline"],
        attempts=r["attempts"],
    )


def _settings(r: asyncpg.Record) -> AccountSettings:
    return AccountSettings(
        send_rate=r["send_rate"],
        express_deadline_ms=r["express_deadline_ms"],
        recipient_limit_per_hour=r["recipient_limit_per_hour"],
        api_rate=r["api_rate"],
    )


_SETTINGS_COLUMNS = "send_rate, express_deadline_ms, recipient_limit_per_hour, api_rate"


class PgStore:
    """The engine's `MessageStore` on PostgreSQL, plus the reads the HTTP layer needs."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        for attempt in range(5):
            try:
                return await self.db.run(lambda conn: self._commit(conn, group))
            except _RETRYABLE as exc:
                log.warning("group commit conflict, retrying (%d): %s", attempt + 1, exc)
                await trio.sleep(0.005 * (attempt + 1))
        return await self.db.run(lambda conn: self._commit(conn, group))

    async def _commit(self, conn: asyncpg.Connection, group: WriteGroup) -> GroupResult:
        async with conn.transaction():
            creates = [await self._create(conn, *c) for c in group.creates]

            ids: set[int] = {a for a, _ in group.topups}
            ids.update(o.sms.account_id for o in group.outcomes)
            for items, _ in group.accepts:
                ids.update(sms.account_id for sms in items)
            book = CreditBook()
            messages: dict[int, list[int]] = {}  # account -> [held, captured, released] counts
            if ids:
                for r in await conn.fetch(_LOCK_ACCOUNTS, sorted(ids)):
                    book.load(
                        r["id"],
                        AccountCredit(r["balance"], r["held"], r["captured"], r["topped_up"]),
                    )

            if group.outcomes:
                outs = group.outcomes
                rows = await conn.fetch(
                    _FINISH_MESSAGES,
                    [o.sms.id for o in outs],
                    [o.status for o in outs],
                    [o.reason for o in outs],
                    [o.operator for o in outs],
                    [o.operator_message_id for o in outs],
                    [o.attempts for o in outs],
                    [o.at for o in outs],
                )
                for r in rows:
                    counts = messages.setdefault(r["account_id"], [0, 0, 0])
                    if r["status"] == "sent":
                        book.capture(r["account_id"], r["price"])
                        counts[1] += 1
                    else:
                        book.release(r["account_id"], r["price"])
                        counts[2] += 1

            topups: list[int | None] = []
            for account_id, amount in group.topups:
                topups.append(book.topup(account_id, amount) if account_id in book else None)

            accepts: list[list[AcceptResult]] = []
            stored: list[OutboundSms] = []
            for items, atomic in group.accepts:
                results = _hold(book, items, atomic)
                accepts.append(results)
                for sms, res in zip(items, results, strict=True):
                    if res.accepted:
                        stored.append(sms)
                        messages.setdefault(sms.account_id, [0, 0, 0])[0] += 1
            if stored:
                rows = await conn.fetch(
                    _INSERT_MESSAGES,
                    [s.id for s in stored],
                    [s.account_id for s in stored],
                    [s.to for s in stored],
                    [s.sender for s in stored],
                    [s.text for s in stored],
                    [s.segments for s in stored],
                    [s.price for s in stored],
                    [s.express for s in stored],
                    [s.client_ref for s in stored],
                    [s.deadline for s in stored],
                    [s.created_at for s in stored],
                )
                if len(rows) < len(stored):
                    inserted = {r[0] for r in rows}
                    await _undo_duplicates(conn, book, group, accepts, inserted, messages)
            await _write_credit(conn, book, messages)
        return GroupResult(accepts, topups, creates)

    async def _create(
        self, conn: asyncpg.Connection, name: str, credit: int, key_hash: bytes
    ) -> Account:
        row = await conn.fetchrow(
            "INSERT INTO accounts (name, key_hash, balance, topped_up) VALUES ($1, $2, $3, $3)"
            " RETURNING id",
            name,
            key_hash,
            credit,
        )
        if credit > 0:
            await conn.execute(
                "INSERT INTO credit_ledger (account_id, kind, amount) VALUES ($1, 'topup', $2)",
                row["id"],
                credit,
            )
        return Account(id=row["id"], name=name, balance=credit, held=0)

    async def recover(self) -> Recovered:
        async def _recover(conn: asyncpg.Connection) -> Recovered:
            express = [_sms(r) for r in await conn.fetch(_PENDING_EXPRESS)]
            backlogs = [(r["account_id"], r["n"]) for r in await conn.fetch(_PENDING_BULK)]
            rates = await conn.fetch(
                "SELECT id, send_rate FROM accounts WHERE send_rate IS NOT NULL"
            )
            return Recovered(express, backlogs, [(r["id"], r["send_rate"]) for r in rates])

        return await self.db.run(_recover)

    async def page_entries(
        self, requests: Sequence[tuple[int, tuple[int, str], int]]
    ) -> list[list[tuple[int, str, int]]]:
        accounts, after_at, after_id, sizes = [], [], [], []
        for account_id, (micros, message_id), n in requests:
            accounts.append(account_id)
            if micros < 0:
                after_at.append(_BEFORE_ALL)
                after_id.append(_MIN_UUID)
            else:
                # Exact: asyncpg sends whole microseconds, as PostgreSQL stores them.
                after_at.append(_EPOCH + micros * _ONE_MICROSECOND)
                after_id.append(uuid.UUID(message_id))
            sizes.append(n)
        rows = await self.db.run(
            lambda c: c.fetch(
                _PAGE_ENTRIES, accounts, after_at, after_id, sizes, list(range(len(requests)))
            )
        )
        pages: list[list[tuple[int, str, int]]] = [[] for _ in requests]
        for r in rows:
            micros = (r["created_at"] - _EPOCH) // _ONE_MICROSECOND
            pages[r["i"]].append((micros, r["id"], r["segments"]))
        return pages

    async def queued_messages(self, ids: Sequence[str]) -> list[OutboundSms]:
        rows = await self.db.run(lambda c: c.fetch(_QUEUED_MESSAGES, list(ids)))
        return [_sms(r) for r in rows]

    async def update_settings(
        self, account_id: int, settings: AccountSettings
    ) -> AccountSettings | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                "UPDATE accounts SET send_rate = $2, express_deadline_ms = $3,"
                f" recipient_limit_per_hour = $4, api_rate = $5 WHERE id = $1"
                f" RETURNING {_SETTINGS_COLUMNS}",
                account_id,
                settings.send_rate,
                settings.express_deadline_ms,
                settings.recipient_limit_per_hour,
                settings.api_rate,
            )
        )
        return None if row is None else _settings(row)

    # --- reads (one query each; not on the accept path) ------------------------------------

    async def account_by_key_hash(self, key_hash: bytes) -> Account | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                f"SELECT id, name, balance, held, {_SETTINGS_COLUMNS} FROM accounts"
                " WHERE key_hash = $1",
                key_hash,
            )
        )
        if row is None:
            return None
        return Account(row["id"], row["name"], row["balance"], row["held"], _settings(row))

    async def account(self, account_id: int) -> Account | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                "SELECT id, name, balance, held FROM accounts WHERE id = $1", account_id
            )
        )
        return None if row is None else Account(**dict(row))

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
        row = await self.db.run(
            lambda c: c.fetchrow(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE account_id = $1 AND client_ref = $2",
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
            )
            for r in rows
        ]

    async def ping(self) -> bool:
        return bool(await self.db.run(lambda c: c.fetchval("SELECT 1")))

    # --- front-door writes (outside the group commit; see FrontDoorStore) -----------------

    async def claim_idempotency_key(
        self, account_id: int, key: str, request_hash: bytes, ttl_s: float
    ) -> IdempotencyClaim:
        async def claim(conn: asyncpg.Connection) -> IdempotencyClaim:
            # The primary key is the arbiter: of concurrent claims one INSERT wins, the others
            # find its row. A record past its ttl counts as absent and is taken over. Bounded:
            # the row can vanish between the two statements only by a release or a purge.
            for _ in range(3):
                if await conn.fetchval(_CLAIM_KEY, account_id, key, request_hash, ttl_s):
                    return IdempotencyClaim("claimed")
                row = await conn.fetchrow(_READ_KEY, account_id, key)
                if row is None:
                    continue
                if row["request_hash"] != request_hash:
                    return IdempotencyClaim("mismatch")
                if row["status"] is None:
                    return IdempotencyClaim("in_progress")
                return IdempotencyClaim("done", row["status"], row["body"])
            return IdempotencyClaim("in_progress")

        return await self.db.run(claim)

    async def finish_idempotency_key(
        self, account_id: int, key: str, status: int, body: bytes
    ) -> None:
        await self.db.run(
            lambda c: c.execute(
                "UPDATE idempotency_keys SET status = $3, body = $4"
                " WHERE account_id = $1 AND key = $2",
                account_id,
                key,
                status,
                body,
            )
        )

    async def release_idempotency_key(self, account_id: int, key: str) -> None:
        await self.db.run(
            lambda c: c.execute(
                "DELETE FROM idempotency_keys"
                " WHERE account_id = $1 AND key = $2 AND status IS NULL",
                account_id,
                key,
            )
        )

    async def purge_idempotency_keys(self, ttl_s: float, limit: int) -> int:
        deleted = await self.db.run(
            lambda c: c.fetchval(
                "WITH gone AS (DELETE FROM idempotency_keys WHERE (account_id, key) IN ("
                " SELECT account_id, key FROM idempotency_keys"
                " WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)"
                " RETURNING 1) SELECT count(*) FROM gone",
                ttl_s,
                limit,
            )
        )
        return int(deleted)

    async def rotate_key(self, account_id: int, old_hash: bytes, new_hash: bytes) -> bool:
        status = await self.db.run(
            lambda c: c.execute(
                "UPDATE accounts SET key_hash = $3 WHERE id = $1 AND key_hash = $2",
                account_id,
                old_hash,
                new_hash,
            )
        )
        return bool(status == "UPDATE 1")


# --- reports ------------------------------------------------------------------------------

# The shape of one message in every read: GET /v1/messages/{id}, pages, exports.
MESSAGE_COLUMNS = (
    "id::text, recipient AS to, sender, body AS text, status, reason, segments, price,"
    " express, attempts, operator, operator_message_id, client_ref, created_at, updated_at"
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
        low.append(((query.created_from, _MIN_UUID), False, time_bound(">=", query.created_from)))
    if query.created_to is not None:
        high.append(((query.created_to, _MIN_UUID), True, time_bound("<", query.created_to)))
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
    if low:
        where.append(max(low, key=lambda b: (b[0], b[1]))[2]())
    if high:
        where.append(min(high, key=lambda b: (b[0], not b[1]))[2]())
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


_MIN_UUID = uuid.UUID(int=0)
_STATUS_LITERAL = re.compile(r"^[a-z_]{1,20}$")

# The CSV export's columns, formatted by PostgreSQL, in the order of the route's header.
_RFC3339 = """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"""
CSV_COLUMNS = (
    "id::text, recipient, sender, body, status, reason, segments, price, express::text,"
    " attempts, operator, operator_message_id, client_ref,"
    f" to_char(created_at AT TIME ZONE 'UTC', {_RFC3339}),"
    f" to_char(updated_at AT TIME ZONE 'UTC', {_RFC3339})"
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
        args.append(created_from)
        where.append(f"created_at >= ${len(args)}")
    if created_to is not None:
        args.append(created_to)
        where.append(f"created_at < ${len(args)}")
    key = "(created_at AT TIME ZONE 'UTC')::date" if group_by == "day" else "status"
    sql = f"""
SELECT {key} AS key,
       count(*) AS messages,
       count(*) FILTER (WHERE status = 'sent') AS sent,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status IN ('queued', 'sending')) AS pending,
       coalesce(sum(segments), 0)::bigint AS segments,
       coalesce(sum(price) FILTER (WHERE status = 'sent'), 0)::bigint AS cost,
       coalesce(sum(price) FILTER (WHERE status IN ('queued', 'sending')), 0)::bigint AS held
FROM messages WHERE {" AND ".join(where)}
GROUP BY 1 ORDER BY 1"""
    return sql, args


# A record older than the ttl is taken over as if it did not exist.
_CLAIM_KEY = """
INSERT INTO idempotency_keys AS k (account_id, key, request_hash)
VALUES ($1, $2, $3)
ON CONFLICT (account_id, key) DO UPDATE
SET request_hash = EXCLUDED.request_hash, status = NULL, body = NULL, created_at = now()
WHERE k.created_at < now() - make_interval(secs => $4)
RETURNING true
"""

_READ_KEY = """
SELECT request_hash, status, body FROM idempotency_keys WHERE account_id = $1 AND key = $2
"""


async def _undo_duplicates(
    conn: asyncpg.Connection,
    book: CreditBook,
    group: WriteGroup,
    accepts: list[list[AcceptResult]],
    inserted: set[str],
    messages: dict[int, list[int]],
) -> None:
    """Some messages were not stored: their client_ref is taken (by an earlier message, or by
    another in this same group). The unique index is the arbiter, exact across requests and
    nodes. Their holds are taken back and they are answered `duplicate_client_ref`; in an atomic
    request the siblings that were stored are removed too (`batch_rejected`): all or none."""
    remove: list[str] = []
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
            messages[sms.account_id][0] -= 1
            reason: Literal["duplicate_client_ref", "batch_rejected"] = (
                "duplicate_client_ref" if i in duplicates else "batch_rejected"
            )
            results[i] = AcceptResult(
                accepted=False, reason=reason, balance=book.accounts[sms.account_id].balance
            )
    if remove:
        await conn.execute("DELETE FROM messages WHERE id = ANY($1::uuid[])", remove)


def _hold(book: CreditBook, items: Sequence[OutboundSms], atomic: bool) -> list[AcceptResult]:
    """Hold credit for each item in order; atomic: all items or none."""
    if any(sms.account_id not in book for sms in items):
        unknown = AcceptResult(accepted=False, reason="unknown_account")
        return [unknown] * len(items)
    if atomic:
        need: dict[int, int] = {}
        for sms in items:
            need[sms.account_id] = need.get(sms.account_id, 0) + sms.price
        if not all(book.can_hold(a, amount) for a, amount in need.items()):
            return [
                AcceptResult(
                    accepted=False,
                    reason="insufficient_credit",
                    balance=book.accounts[s.account_id].balance,
                )
                for s in items
            ]
    # In order; once one hold fails the rest of the request fails too, even an item cheap
    # enough to fit: "the balance ran out at item k" is what a batch client can act on.
    results = []
    spent = False
    for sms in items:
        if not spent and book.hold(sms.account_id, sms.price):
            results.append(AcceptResult(accepted=True))
        else:
            spent = True
            results.append(AcceptResult(accepted=False, reason="insufficient_credit"))
    balances = {sms.account_id: book.accounts[sms.account_id].balance for sms in items}
    return [
        AcceptResult(accepted=r.accepted, reason=r.reason, balance=balances[s.account_id])
        for r, s in zip(results, items, strict=True)
    ]


async def _write_credit(
    conn: asyncpg.Connection, book: CreditBook, messages: dict[int, list[int]]
) -> None:
    """One row update per changed account and one ledger row per account and kind."""
    changed = [(a, book.accounts[a]) for a, d in book.deltas.items() if d]
    if not changed:
        return
    for _, credit in changed:
        credit.check()
    await conn.execute(
        _UPDATE_ACCOUNTS,
        [a for a, _ in changed],
        [c.balance for _, c in changed],
        [c.held for _, c in changed],
        [c.captured for _, c in changed],
        [c.topped_up for _, c in changed],
    )
    ledger: list[tuple[int, str, int, int]] = []
    for account_id, d in book.deltas.items():
        held_n, captured_n, released_n = messages.get(account_id, [0, 0, 0])
        for kind, amount, n in (
            ("topup", d.topped_up, 0),
            ("hold", d.held, held_n),
            ("capture", d.captured, captured_n),
            ("release", d.released, released_n),
        ):
            if amount:
                ledger.append((account_id, kind, amount, n))
    await conn.execute(
        _INSERT_LEDGER,
        [r[0] for r in ledger],
        [r[1] for r in ledger],
        [r[2] for r in ledger],
        [r[3] for r in ledger],
    )
