"""PostgreSQL through asyncpg on trio-asyncio: migrations, group commits and reads.

Every public coroutine here is a trio coroutine that crosses into asyncio once (about 0.3 ms
of bridging), so each one does a whole unit of work on the asyncio side: a group commit is one
crossing and one transaction, however many requests it carries.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
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
from smsgw.engine.messages import (
    AcceptResult,
    Account,
    AccountRecord,
    AccountSettings,
    OutboundSms,
    Outcome,
    Settled,
)
from smsgw.engine.ports import (
    CommitInDoubt,
    GroupResult,
    IdempotencyClaim,
    MessageQuery,
    Recovered,
    SummaryRow,
    WriteGroup,
    dispatch_shard,
    micros,
)
from smsgw.storage.database import Database, Refused
from smsgw.storage.delivery import CallbackOutbox, apply_deliveries, callbacks_of

log = logging.getLogger("smsgw.storage")

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

# A group commit of accepts and outcomes is one statement (_ONE_STATEMENT) when every account
# can cover its holds, however large the group. Otherwise it is four round trips: BEGIN; one
# statement that applies the outcomes and locks the accounts; one that inserts the messages
# and writes the accounts and their ledger rows; COMMIT. Rows travel as one JSON document per
# statement, read back with json_to_recordset (which takes the keys it names and ignores the
# rest): msgspec encodes the structs as they are in about 0.5 µs each, where asyncpg's array
# encoding of `unnest` parameters spent about 15 µs a message in isinstance checks.


# A message not final yet, tested on a row already found otherwise: `status IN ('queued',
# 'sending')` with values the planner cannot read while it plans (each one an InitPlan). From
# the literal list it would prove the predicate of the partial index messages_pending (and of
# messages_account_status) and could choose to scan that index instead of probing the primary
# key; it prices that scan by the last ANALYZE, and one taken while few messages were pending
# prices a scan of every pending message as a scan of none (issue 29: an outcome UPDATE that
# walked all pending messages once per outcome). Written so, messages are reached by their
# primary key whatever the statistics say.
NOT_FINAL = "IN ((SELECT 'queued'), (SELECT 'sending'))"


# Only a message that is not final yet takes an outcome: exactly one outcome per message,
# whatever retries or recoveries deliver twice, and only under the shard lease it was
# dispatched under (fencing, engine/shards.py).
#
# The plan does not depend on statistics: the outcomes are decoded once (a MATERIALIZED CTE,
# never re-evaluated as the inner side of a join), each message is found by its primary key
# (NOT_FINAL), and the leases of the fenced outcomes' shards are read once per statement, at
# most one row per shard, rather than once per outcome.
def _finish_sql(param: str, *, only_if: str = "", returning: str = "") -> str:
    """The UPDATE that applies a group's outcomes (a JSON list of _FinishRow in `param`),
    returning each applied one's account, price and whether it was sent (+ `returning`)."""
    return f"""
    WITH outcome AS MATERIALIZED (
        SELECT * FROM json_to_recordset({param}::json)
             AS x(id uuid, status text, reason text, operator text, operator_message_id text,
                  attempts int, at float8, shard int, fence bigint)
    ), lease AS MATERIALIZED (
        SELECT l.shard, l.token FROM shard_leases l
        WHERE l.shard = ANY (ARRAY(SELECT DISTINCT o.shard FROM outcome o
                                   WHERE o.fence IS NOT NULL))
    )
    UPDATE messages m
    SET status = x.status, reason = x.reason, operator = x.operator,
        operator_message_id = x.operator_message_id, attempts = x.attempts,
        updated_at = to_timestamp(x.at)
    FROM outcome x LEFT JOIN lease l ON l.shard = x.shard
    WHERE m.id = x.id AND m.status {NOT_FINAL}
      AND (x.fence IS NULL OR x.fence = l.token){only_if}
    RETURNING m.account_id, m.price, x.status = 'sent' AS sent{returning}"""


# What the outcomes of `finished` captured and released, summed per account.
_PER_ACCOUNT = """
    SELECT account_id,
           coalesce(sum(price) FILTER (WHERE sent), 0) AS captured,
           count(*) FILTER (WHERE sent) AS captured_n,
           coalesce(sum(price) FILTER (WHERE NOT sent), 0) AS released,
           count(*) FILTER (WHERE NOT sent) AS released_n
    FROM finished GROUP BY account_id"""

# The accounts come back locked in id order (so concurrent groups cannot deadlock on them),
# with what the outcomes captured and released, summed per account.
_LOCK_AND_FINISH = f"""
WITH finished AS ({_finish_sql("$2")}
), per_account AS ({_PER_ACCOUNT}
)
SELECT a.id, a.balance, a.held, a.captured, a.topped_up, a.callback_url,
       f.captured AS out_captured, f.captured_n, f.released AS out_released, f.released_n
FROM accounts a LEFT JOIN per_account f ON f.account_id = a.id
WHERE a.id = ANY($1::bigint[])
ORDER BY a.id
FOR UPDATE OF a
"""


class _FinishRow(msgspec.Struct):
    """One outcome as _LOCK_AND_FINISH reads it."""

    id: str
    status: str
    reason: str | None
    operator: str | None
    operator_message_id: str | None
    attempts: int
    at: float
    shard: int
    fence: int | None


_json = msgspec.json.Encoder()

_UPDATE_ACCOUNTS = """
updated AS (
    UPDATE accounts a
    SET balance = x.balance, held = x.held, captured = x.captured, topped_up = x.topped_up
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
         AS x(id, balance, held, captured, topped_up)
    WHERE a.id = x.id
), ledger AS (
    INSERT INTO credit_ledger (account_id, kind, amount, messages)
    SELECT * FROM unnest($6::bigint[], $7::text[], $8::bigint[], $9::int[])
    RETURNING id
)"""

# The accounts' new figures and their ledger rows.
_WRITE_CREDIT = f"WITH {_UPDATE_ACCOUNTS} SELECT count(*) FROM ledger"


def _insert_sql(param: str, *, only_if: str = "TRUE", returning: str = "") -> str:
    """The INSERT of a group's messages (a JSON list of OutboundSms in `param`), each
    `queued`, returning the id of each one inserted (+ `returning`)."""
    return f"""
    INSERT INTO messages (id, account_id, recipient, sender, body, segments, price, express,
                          client_ref, status, deadline, created_at, updated_at, callback_url,
                          dispatch_shard)
    SELECT x.id, x.account_id, x."to", x.sender, x."text", x.segments, x.price, x.express,
           x.client_ref, 'queued', to_timestamp(x.deadline), to_timestamp(x.created_at),
           to_timestamp(x.created_at), x.callback_url, x.shard
    FROM json_to_recordset({param}::json)
         AS x(id uuid, account_id bigint, "to" text, sender text, "text" text, segments int,
              price int, express bool, client_ref text, deadline float8, created_at float8,
              callback_url text, shard smallint)
    WHERE {only_if}
    ON CONFLICT (account_id, client_ref) WHERE client_ref IS NOT NULL DO NOTHING
    RETURNING id{returning}"""


# The messages, the accounts and the ledger in one statement. A message whose client_ref is
# taken is not inserted (the unique index decides, exact across nodes): the caller sees it
# missing from `inserted` and corrects the credit (_undo_duplicates), which is rare.
_WRITE_GROUP = f"""
WITH inserted AS ({_insert_sql("$10")}
), {_UPDATE_ACCOUNTS}
SELECT (SELECT count(*) FROM inserted) AS stored,
       (SELECT array_agg(id::text) FROM inserted) AS inserted,
       (SELECT array_agg(id) FROM ledger) AS ledger
"""

# The same on a node among several: the messages of shards another node leases are handed
# to it in the same statement (smsgw_handoff, migration 004: it takes its shared advisory
# locks and reads the owners with statements of its own, so after the locks). A message the
# insert skipped (its client_ref taken) is handed off too; its hand-off finds no message when
# claimed, and the caller leaves it out of the NOTIFY.
_WRITE_GROUP_HANDOFF = (
    _WRITE_GROUP.rstrip().removesuffix("AS ledger")
    + """AS ledger,
       h.owners, h.ids
FROM (SELECT array_agg(owner) AS owners, array_agg(message_id::text) AS ids
      FROM smsgw_handoff($11, $12,
                         ARRAY(SELECT value::int FROM json_array_elements_text($13::json)),
                         ARRAY(SELECT (value->>'id')::uuid FROM json_array_elements($10::json))))
     AS h
"""
)

# The same without the insert, for a group whose messages went in by COPY.
_WRITE_CREDIT_HANDOFF = f"""
WITH {_UPDATE_ACCOUNTS}
SELECT (SELECT array_agg(id) FROM ledger) AS ledger, h.owners, h.ids
FROM (SELECT array_agg(owner) AS owners, array_agg(message_id::text) AS ids
      FROM smsgw_handoff($10, $11, $12::int[], $13::uuid[])) AS h
"""

# The common group, accepts and outcomes, in one statement and so one round trip (autocommit: its
# own transaction). It locks the group's accounts in id order, and goes on only when every one
# exists and its balance covers all of the group's holds for it before any of the group's releases,
# which the node cannot know yet; otherwise it changes nothing and says `ok` false, and the group is
# done the exact way (_commit's transaction). The accounts are updated relative to their locked
# rows, the holds from the messages inserted (a taken client_ref holds nothing), so the figures are
# exact whatever other nodes did. Written only when all of its parts apply: `ok` gates the outcomes
# and the insert, and all the rest follows from what they returned.
# The hourly limit per recipient number (an account's `recipient_limit_per_hour`, else the
# node's default in $4; NULL: not checked here) counts the account's messages to the number
# stored in the last hour, on every node, so it holds across nodes and restarts. Each node's
# RecipientLimiter refuses a flood in memory first; the store has the last word.
#
# The counts come from the statement's snapshot, taken before it waited for the account
# locks, so a group another node committed meanwhile is not counted. Whether one did shows in
# the locked row: its version (xmin) differs from the snapshot's. A recipient is `crowded`
# when the group would take it past its limit by the snapshot's count, or past half of it
# while the account changed since the snapshot; then the statement changes nothing and the
# group is done the exact way, whose counts are read after the locks. A group that missed
# another node's messages to a number can so add at most half the limit on top of them, and
# only while the number is below half of it: in practice a number's messages never reach the
# limit that way, as the groups that follow count them all.
_RECIPIENT_KEYS = """
    SELECT x.account_id, x."to" AS recipient, count(*) AS n, min(x.created_at) AS at
    FROM json_to_recordset($1::json) AS x(account_id bigint, "to" text, created_at float8)
    GROUP BY 1, 2"""
_SEEN_IN_HOUR = """
    SELECT count(*) AS seen, min(w.created_at) AS oldest FROM (
        SELECT m.created_at FROM messages m
        WHERE m.account_id = k.account_id AND m.recipient = k.recipient
          AND m.created_at > to_timestamp(k.at) - interval '1 hour'
        LIMIT {per_hour}) w"""
_CROWDED = f"""
    SELECT FROM ({_RECIPIENT_KEYS}) k
    JOIN locked l ON l.id = k.account_id
    CROSS JOIN LATERAL ({_SEEN_IN_HOUR.format(per_hour="l.per_hour")}) r
    WHERE $4::int IS NOT NULL
      AND (r.seen + k.n > l.per_hour
           OR (2 * (r.seen + k.n) > l.per_hour
               AND l.version <> (SELECT a.xmin FROM accounts a WHERE a.id = l.id)))
    LIMIT 1"""

# The group's recipients past their limit, read after the group's accounts are locked (the
# exact way): how many more each may take (`room`) and when the oldest of its hour's messages
# leaves the hour (seconds after the group's first message to it).
_RECIPIENT_ROOM = f"""
SELECT k.account_id, k.recipient, greatest(l.per_hour - r.seen, 0) AS room,
       extract(epoch FROM r.oldest) + 3600 - k.at AS retry_after
FROM ({_RECIPIENT_KEYS}) k
CROSS JOIN LATERAL (SELECT coalesce(a.recipient_limit_per_hour, $2::int) AS per_hour
                    FROM accounts a WHERE a.id = k.account_id) l
CROSS JOIN LATERAL ({_SEEN_IN_HOUR.format(per_hour="l.per_hour + 1")}) r
WHERE r.seen + k.n > l.per_hour
"""

# Opt-outs and the blocklist (migration 010) are checked here too, in the statement that
# stores the messages, so they hold on every node from the moment a number is added, with no
# query of their own: an index probe per message, that for most numbers finds nothing. The
# gateway's blocklist stops every message; an account's opt-outs stop its bulk, not its
# express (an opted-out person still needs login codes). A group with a stopped message changes
# nothing here and is done the exact way, which refuses that message alone (`opted_out`).
_STOPPED_ANY = """
    SELECT FROM json_to_recordset($1::json) AS x(account_id bigint, "to" text, express bool)
    WHERE EXISTS (SELECT FROM blocklist b WHERE b.number = x."to")
       OR (NOT x.express
           AND EXISTS (SELECT FROM opt_outs o
                       WHERE o.account_id = x.account_id AND o.number = x."to"))
    LIMIT 1"""

# The exact way's refusals, in one round trip: the recipients past their hourly limit
# (_RECIPIENT_ROOM, when $2 is not NULL), and the numbers opted out of their account or
# blocked (`blocked`: for every message, not just bulk).
_REFUSALS = f"""
SELECT 'room' AS kind, r.account_id, r.recipient, r.room, r.retry_after::float8, FALSE AS blocked
FROM ({_RECIPIENT_ROOM}) r
WHERE $2::int IS NOT NULL
UNION ALL
SELECT 'stop', k.account_id, k.recipient, NULL, NULL,
       EXISTS (SELECT FROM blocklist b WHERE b.number = k.recipient)
FROM (SELECT DISTINCT x.account_id, x."to" AS recipient
      FROM json_to_recordset($1::json) AS x(account_id bigint, "to" text)) k
WHERE EXISTS (SELECT FROM blocklist b WHERE b.number = k.recipient)
   OR EXISTS (SELECT FROM opt_outs o WHERE o.account_id = k.account_id AND o.number = k.recipient)
"""

_OK_FINISHED = _finish_sql(
    "$2",
    only_if=" AND (SELECT ok FROM ok)",
    returning=", m.id, m.status, m.reason, m.client_ref, m.updated_at, m.callback_url",
)
_OK_INSERTED = _insert_sql("$1", only_if="(SELECT ok FROM ok)", returning=", account_id, price")
_ONE_WRITES = f"""
WITH locked AS MATERIALIZED (
    SELECT a.id, a.balance, a.callback_url, a.xmin AS version,
           coalesce(a.recipient_limit_per_hour, $4::int) AS per_hour
    FROM accounts a
    WHERE a.id = ANY($3::bigint[]) ORDER BY a.id FOR UPDATE
), crowded AS ({_CROWDED}
), stopped AS ({_STOPPED_ANY}
), ok AS (
    SELECT count(*) = cardinality($3::bigint[])
           AND coalesce(bool_and(l.balance >= coalesce(n.amount, 0)), TRUE)
           AND NOT EXISTS (SELECT FROM crowded)
           AND NOT EXISTS (SELECT FROM stopped) AS ok
    FROM locked l LEFT JOIN (
        SELECT x.account_id, sum(x.price) AS amount
        FROM json_to_recordset($1::json) AS x(account_id bigint, price int)
        GROUP BY x.account_id
    ) n ON n.account_id = l.id
), finished AS ({_OK_FINISHED}
), inserted AS ({_OK_INSERTED}
), delta AS (
    SELECT l.id, l.balance,
           coalesce(h.held, 0) AS held, coalesce(h.held_n, 0) AS held_n,
           coalesce(f.captured, 0) AS captured, coalesce(f.captured_n, 0) AS captured_n,
           coalesce(f.released, 0) AS released, coalesce(f.released_n, 0) AS released_n
    FROM locked l
    LEFT JOIN (
        SELECT account_id, sum(price) AS held, count(*) AS held_n
        FROM inserted GROUP BY account_id
    ) h ON h.account_id = l.id
    LEFT JOIN ({_PER_ACCOUNT}
    ) f ON f.account_id = l.id
), updated AS (
    UPDATE accounts a
    SET balance = a.balance - d.held + d.released,
        held = a.held + d.held - d.captured - d.released,
        captured = a.captured + d.captured
    FROM delta d
    WHERE a.id = d.id AND (d.held > 0 OR d.captured > 0 OR d.released > 0)
    RETURNING a.id, a.balance
), ledger AS (
    INSERT INTO credit_ledger (account_id, kind, amount, messages)
    SELECT d.id, k.kind, k.amount, k.n
    FROM delta d CROSS JOIN LATERAL (VALUES ('hold', d.held, d.held_n),
                                            ('capture', d.captured, d.captured_n),
                                            ('release', d.released, d.released_n))
         AS k(kind, amount, n)
    WHERE k.amount > 0
), callbacks AS (
    INSERT INTO callback_outbox (message_id, account_id, url, status, reason, client_ref, at)
    SELECT f.id, f.account_id, coalesce(f.callback_url, l.callback_url), f.status, f.reason,
           f.client_ref, f.updated_at
    FROM finished f JOIN locked l ON l.id = f.account_id
    WHERE coalesce(f.callback_url, l.callback_url) IS NOT NULL
)
"""

# The last of _ONE_STATEMENT. On a node among several, the messages of shards another node
# leases are handed to it, as in _WRITE_GROUP_HANDOFF: all of the group's, or none when `ok`
# is false.
_ONE_HANDOFF = """,
     (SELECT array_agg(x.owner) AS owners, array_agg(x.message_id::text) AS handed
      FROM ok, smsgw_handoff(
          $5, $6,
          CASE WHEN ok.ok THEN ARRAY(SELECT value::int FROM json_array_elements_text($7::json))
          END,
          CASE WHEN ok.ok THEN ARRAY(SELECT (value->>'id')::uuid
                                     FROM json_array_elements($1::json))
          END) AS x) AS h"""


def _one_result(handoff: bool) -> str:
    return f"""
SELECT (SELECT ok FROM ok) AS ok,
       (SELECT count(*) FROM inserted) AS stored,
       (SELECT array_agg(id::text) FROM inserted) AS inserted,
       b.ids, b.balances{", h.owners, h.handed" if handoff else ""}
FROM (SELECT array_agg(d.id) AS ids, array_agg(coalesce(u.balance, d.balance)) AS balances
      FROM delta d LEFT JOIN updated u ON u.id = d.id) AS b{_ONE_HANDOFF if handoff else ""}
"""


_ONE_STATEMENT = _ONE_WRITES + _one_result(False)
_ONE_STATEMENT_HANDOFF = _ONE_WRITES + _one_result(True)

# A group that stores at least this many messages writes them by binary COPY, PostgreSQL's
# fastest way in (2,000 rows: about a quarter less time than the json_to_recordset INSERT);
# smaller groups (single-message accepts) keep the INSERT, one round trip fewer. A COPY cannot
# skip a taken client_ref, so a group that meets one (a client retrying a batch) fails as a
# whole and is done again the INSERT way.
COPY_MIN_ROWS = 200
COPY_COLUMNS = (
    "id",
    "account_id",
    "recipient",
    "sender",
    "body",
    "segments",
    "price",
    "express",
    "client_ref",
    "status",
    "deadline",
    "created_at",
    "updated_at",
    "callback_url",
    "dispatch_shard",
)


# A group commit's server process, ended when its fate is in doubt (same database only; a
# role may end its own sessions).
_END_SESSION = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE pid = $1 AND datname = current_database() AND pid <> pg_backend_pid()
"""
_SESSION_ALIVE = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)"


class _CopyConflict(Refused):
    """A COPY of a group's messages met a taken client_ref: nothing of the group was stored."""


def copy_records(stored: Sequence[OutboundSms]) -> list[tuple[Any, ...]]:
    """The messages as COPY rows (in `COPY_COLUMNS` order), `queued`. Times are whole
    microseconds exactly as `to_timestamp` stores them (the Scheduler's paging cursors compare
    them); a group's messages mostly share their accept time, so each is converted once."""
    times: dict[float, datetime] = {}

    def at(t: float) -> datetime:
        found = times.get(t)
        if found is None:
            found = times[t] = _at_micros(micros(t))
        return found

    return [
        (
            s.id,
            s.account_id,
            s.to,
            s.sender,
            s.text,
            s.segments,
            s.price,
            s.express,
            s.client_ref,
            "queued",
            None if s.deadline is None else at(s.deadline),
            at(s.created_at),
            at(s.created_at),
            s.callback_url,
            s.shard,
        )
        for s in stored
    ]


# A callback outbox row for each outcome of this group that has a callback URL (the message's,
# else its account's) and that this transaction applied: `xmin` is the current transaction's
# id exactly for the rows it wrote, so an outcome delivered twice after a crash (already
# final, not updated) writes none. Only run when some outcome of the group has a URL.
_OUTCOME_CALLBACKS = """
INSERT INTO callback_outbox (message_id, account_id, url, status, reason, client_ref, at)
SELECT m.id, m.account_id, coalesce(m.callback_url, a.callback_url), m.status, m.reason,
       m.client_ref, m.updated_at
FROM messages m JOIN accounts a ON a.id = m.account_id
WHERE m.id = ANY($1::uuid[]) AND m.xmin = pg_current_xact_id()::xid
  AND coalesce(m.callback_url, a.callback_url) IS NOT NULL
"""

# What dispatch needs of a stored message (pending_sms makes it an OutboundSms).
PENDING_COLUMNS = """
messages.id::text, account_id, recipient, sender, body, segments, price, express, client_ref,
extract(epoch FROM created_at)::float8 AS created_at,
extract(epoch FROM deadline)::float8 AS deadline, attempts, callback_url, dispatch_shard"""

_PENDING_EXPRESS = f"""
SELECT {PENDING_COLUMNS} FROM messages
WHERE status IN ('queued', 'sending') AND express ORDER BY created_at
"""

_PENDING_BULK = """
SELECT account_id, count(*) AS n FROM messages
WHERE status IN ('queued', 'sending') AND NOT express GROUP BY account_id
"""

# Each account's next queued bulk messages after its cursor: a backward range scan of
# messages_account_status per account, all accounts in one statement. That index only: the
# status index's predicate is stated as such, and 'queued' is a value the planner cannot read
# while it plans (NOT_FINAL says why), so messages_pending, which a literal 'queued' would make
# a candidate, is not one (after an ANALYZE taken while few messages were pending, a walk of
# every pending message of every account looked cheaper than each account's own range).
_PAGE_ENTRIES = """
SELECT x.i, m.created_at, m.id::text, m.segments
FROM unnest($1::bigint[], $2::timestamptz[], $3::uuid[], $4::int[], $5::int[])
     AS x(account_id, after_at, after_id, n, i)
CROSS JOIN LATERAL (
    SELECT created_at, id, segments FROM messages
    WHERE account_id = x.account_id AND NOT express
      AND status NOT IN ('sent', 'delivered') AND status = (SELECT 'queued')
      AND (created_at, id) > (x.after_at, x.after_id)
    ORDER BY created_at, id LIMIT x.n
) m
ORDER BY x.i, m.created_at, m.id
"""

# By primary key (a literal 'queued' would make messages_pending a candidate: NOT_FINAL).
_QUEUED_MESSAGES = f"""
SELECT {PENDING_COLUMNS} FROM messages WHERE id = ANY($1::uuid[]) AND status = (SELECT 'queued')
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BEFORE_ALL = datetime(1, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)


def _at_micros(us: int) -> datetime:
    """The time `us` microseconds after the Unix epoch, exact (asyncpg sends whole
    microseconds, as PostgreSQL stores them)."""
    return _EPOCH + us * _ONE_MICROSECOND


def _settings(r: asyncpg.Record) -> AccountSettings:
    return AccountSettings(
        send_rate=r["send_rate"],
        express_deadline_ms=r["express_deadline_ms"],
        recipient_limit_per_hour=r["recipient_limit_per_hour"],
        api_rate=r["api_rate"],
        default_country=r["default_country"],
        senders=tuple(r["senders"] or ()),
        default_sender=r["default_sender"],
        suspended=r["suspended"],
        price_per_segment=r["price_per_segment"],
        express_surcharge=r["express_surcharge"],
    )


_SETTINGS_COLUMNS = (
    "send_rate, express_deadline_ms, recipient_limit_per_hour, api_rate, default_country,"
    " senders, default_sender, suspended_at IS NOT NULL AS suspended, price_per_segment,"
    " express_surcharge"
)


_DISPATCH_RATES = """
SELECT id, CASE WHEN suspended_at IS NOT NULL THEN 0.0 ELSE send_rate END AS rate
FROM accounts WHERE send_rate IS NOT NULL OR suspended_at IS NOT NULL
"""

_RECORD_COLUMNS = (
    "id, name, balance, held, captured, topped_up, callback_url,"
    " extract(epoch FROM created_at)::float8 AS created,"
    f" extract(epoch FROM suspended_at)::float8 AS suspended_since, {_SETTINGS_COLUMNS}"
)


def _record(r: asyncpg.Record) -> AccountRecord:
    return AccountRecord(
        id=r["id"],
        name=r["name"],
        balance=r["balance"],
        held=r["held"],
        captured=r["captured"],
        topped_up=r["topped_up"],
        created_at=r["created"],
        suspended_at=r["suspended_since"],
        callback_url=r["callback_url"],
        settings=_settings(r),
    )


def pending_sms(r: asyncpg.Record) -> OutboundSms:
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
        callback_url=r["callback_url"],
        shard=r["dispatch_shard"],
    )


class Handoff(NamedTuple):
    """Set on a PgStore of a node among several: messages stored for shards this node does
    not lease are handed to their owner in the same transaction (migration 004)."""

    node_id: str
    lock_class: int
    channel: str
    # Where the express outcomes this node commits are announced to every node (for a
    # `"wait": true` request on whichever node accepted the message); "" for nowhere.
    settled_channel: str = ""


# What a group commit's time is recorded under (Database.run: /metrics and slow-statement logs).
_COMMIT = "PgStore.commit_group"


class PgStore(CallbackOutbox):
    """The engine's `MessageStore` on PostgreSQL, plus the reads the HTTP layer needs, and
    the callback outbox (`CallbackOutbox`, storage/delivery.py)."""

    def __init__(
        self,
        db: Database,
        *,
        handoff: Handoff | None = None,
        recipient_limit: int | None = None,
    ) -> None:
        self.db = db
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
        finished = _finished_json(group) if ids else ""
        if ids and self._one_statement(group, copy):
            done = await self._commit_one(conn, group, account_ids, finished)
            if done is not None:
                return done
        wake: list[str] = []  # NOTIFY payloads for the hand-offs, sent once committed
        async with conn.transaction():
            creates = [await self._create(conn, *c) for c in group.creates]

            book = CreditBook()
            messages: dict[int, list[int]] = {}  # account -> [held, captured, released] counts
            account_urls: dict[int, str] = {}  # the group's accounts that have a callback_url
            if ids:
                rows = await conn.fetch(_LOCK_AND_FINISH, account_ids, finished)
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
                    messages[account_id] = [0, r["captured_n"], r["released_n"]]
                wanted = callbacks_of(group.outcomes, account_urls)
                if wanted:
                    await conn.execute(_OUTCOME_CALLBACKS, wanted)

            topups: list[int | None] = []
            for account_id, amount in group.topups:
                topups.append(book.topup(account_id, amount) if account_id in book else None)

            accepts: list[list[AcceptResult]] = []
            stored: list[OutboundSms] = []
            room, stops = await self._refusals(conn, group) if group.accepts else (None, None)
            for items, atomic in group.accepts:
                results = hold_within_limits(book, items, atomic, room, stops)
                accepts.append(results)
                if all(res.accepted for res in results):
                    held = items
                else:
                    held = [s for s, r in zip(items, results, strict=True) if r.accepted]
                stored.extend(held)
                if len(held) == 1:  # POST /v1/messages: most groups' accepts
                    messages.setdefault(held[0].account_id, [0, 0, 0])[0] += 1
                else:
                    for account_id, n in Counter(s.account_id for s in held).items():
                        messages.setdefault(account_id, [0, 0, 0])[0] += n
            if not stored:
                await _write_credit(conn, book, messages)
            elif copy and len(stored) >= COPY_MIN_ROWS:
                try:
                    await conn.copy_records_to_table(
                        "messages", records=copy_records(stored), columns=COPY_COLUMNS
                    )
                except asyncpg.UniqueViolationError as exc:
                    raise _CopyConflict(str(exc)) from exc
                if self.handoff is None:
                    await _write_credit(conn, book, messages)
                else:
                    row = await conn.fetchrow(
                        _WRITE_CREDIT_HANDOFF,
                        *_credit_args(book, messages),
                        self.handoff.node_id,
                        self.handoff.lock_class,
                        [dispatch_shard(s) for s in stored],
                        [s.id for s in stored],
                    )
                    if row["ids"]:
                        wake = _handed_payloads(row["owners"], row["ids"], stored)
            else:
                written = [a for a, d in book.deltas.items() if d]
                args = [*_credit_args(book, messages), _json.encode(stored).decode()]
                if self.handoff is None:
                    row = await conn.fetchrow(_WRITE_GROUP, *args)
                else:
                    shards = _json.encode([dispatch_shard(s) for s in stored]).decode()
                    row = await conn.fetchrow(
                        _WRITE_GROUP_HANDOFF,
                        *args,
                        self.handoff.node_id,
                        self.handoff.lock_class,
                        shards,
                    )
                if row["stored"] < len(stored):
                    inserted = set(row["inserted"] or ())
                    await _undo_duplicates(conn, book, group, accepts, inserted, messages)
                    # The credit just written counted holds that were taken back: write it
                    # again, every account written above (its figures are absolute), and
                    # replace the ledger rows.
                    await conn.execute(
                        "DELETE FROM credit_ledger WHERE id = ANY($1::bigint[])", row["ledger"]
                    )
                    await conn.fetchval(_WRITE_CREDIT, *_credit_args(book, messages, written))
                    stored = _still_accepted(group, accepts)
                if self.handoff is not None and row["ids"]:
                    wake = _handed_payloads(row["owners"], row["ids"], stored)
            # After the outcomes: a `sent` and its DLR in the same group apply in that order.
            deliveries = await apply_deliveries(conn, group.deliveries) if group.deliveries else []
        if group.written is not None:
            group.written()
        await self._notify(conn, wake, group.outcomes)
        return GroupResult(accepts, topups, creates, deliveries)

    async def _notify(
        self, conn: asyncpg.Connection, wake: list[str], outcomes: Sequence[Outcome]
    ) -> None:
        """Wake the owners of handed-off messages, and tell every node the express outcomes
        just committed (a `"wait": true` request may wait for one on any node). After the
        commit, in a transaction of its own that writes nothing: a NOTIFY in the group's
        transaction would hold PostgreSQL's database-wide notify lock through the group's
        commit (and its WAL flush), serialising every node's group commits. A lost hand-off
        waits for the poll; a lost outcome lets its waiter time out at the deadline. The
        group is committed whatever happens here, so nothing may raise."""
        if self.handoff is None:
            return
        channels = [self.handoff.channel] * len(wake)
        payloads = list(wake)
        if self.handoff.settled_channel:
            settled = settled_payloads([o for o in outcomes if o.sms.express])
            channels += [self.handoff.settled_channel] * len(settled)
            payloads += settled
        if not payloads:
            return
        try:
            await conn.execute(
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)",
                channels,
                payloads,
            )
        except Exception as exc:
            log.warning("could not notify hand-offs or outcomes (the poll takes them): %s", exc)

    async def _commit_one(
        self, conn: asyncpg.Connection, group: WriteGroup, ids: list[int], finished: str
    ) -> GroupResult | None:
        """The group by _ONE_STATEMENT (`finished`: its outcomes' JSON); None when it changed
        nothing (an account missing, or one whose balance may not cover its holds), for the
        exact way to do."""
        stored = [sms for items, _ in group.accepts for sms in items]
        args = [_json.encode(stored).decode(), finished, ids, self.recipient_limit]
        if self.handoff is None:
            row = await conn.fetchrow(_ONE_STATEMENT, *args)
        else:
            shards = _json.encode([dispatch_shard(s) for s in stored]).decode()
            row = await conn.fetchrow(
                _ONE_STATEMENT_HANDOFF,
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
        wake: list[str] = []
        if self.handoff is not None and row["handed"]:
            if inserted is not None:
                stored = [s for s in stored if s.id in inserted]
            wake = _handed_payloads(row["owners"], row["handed"], stored)
        await self._notify(conn, wake, group.outcomes)
        return GroupResult(accepts, [], [])

    async def _refusals(
        self, conn: asyncpg.Connection, group: WriteGroup
    ) -> tuple[Room | None, Stops | None]:
        """Read after the accounts are locked (no other group can store messages of theirs
        until this one commits): the group's recipients past their hourly limit, (account,
        number) -> [messages it may still take, seconds until one more fits], unless the
        store checks no limit; and its numbers opted out or blocked, (account, number) ->
        blocked (True: on the gateway's blocklist, stops express too). None: none."""
        items = [sms for items, _ in group.accepts for sms in items]
        rows = await conn.fetch(_REFUSALS, _json.encode(items).decode(), self.recipient_limit)
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
        """Whether _ONE_STATEMENT can do this group: only accepts and outcomes, not a batch
        for COPY, and no atomic batch that names a client_ref (a taken one would take back
        its siblings: the exact way does that)."""
        if group.creates or group.topups or group.deliveries:
            return False
        n = 0
        for items, atomic in group.accepts:
            n += len(items)
            if atomic and len(items) > 1 and any(s.client_ref is not None for s in items):
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
                "INSERT INTO credit_ledger (account_id, kind, amount) VALUES ($1, 'topup', $2)",
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

    async def recover(self) -> Recovered:
        async def _recover(conn: asyncpg.Connection) -> Recovered:
            express = [pending_sms(r) for r in await conn.fetch(_PENDING_EXPRESS)]
            backlogs = [(r["account_id"], r["n"]) for r in await conn.fetch(_PENDING_BULK)]
            return Recovered(express, backlogs)

        return await self.db.run(_recover)

    async def dispatch_rates(self) -> list[tuple[int, float]]:
        rows = await self.db.run(lambda c: c.fetch(_DISPATCH_RATES))
        return [(r["id"], r["rate"]) for r in rows]

    async def page_entries(
        self, requests: Sequence[tuple[int, tuple[int, str], int]]
    ) -> list[list[tuple[int, str, int]]]:
        accounts, after_at, after_id, sizes = [], [], [], []
        for account_id, (at_us, message_id), n in requests:
            accounts.append(account_id)
            if at_us < 0:
                after_at.append(_BEFORE_ALL)
                after_id.append(_MIN_UUID)
            else:
                # Exact: asyncpg sends whole microseconds, as PostgreSQL stores them.
                after_at.append(_at_micros(at_us))
                after_id.append(uuid.UUID(message_id))
            sizes.append(n)
        rows = await self.db.run(
            lambda c: c.fetch(
                _PAGE_ENTRIES, accounts, after_at, after_id, sizes, list(range(len(requests)))
            )
        )
        pages: list[list[tuple[int, str, int]]] = [[] for _ in requests]
        for r in rows:
            at_us = (r["created_at"] - _EPOCH) // _ONE_MICROSECOND
            pages[r["i"]].append((at_us, r["id"], r["segments"]))
        return pages

    async def queued_messages(self, ids: Sequence[str]) -> list[OutboundSms]:
        rows = await self.db.run(lambda c: c.fetch(_QUEUED_MESSAGES, list(ids)))
        return [pending_sms(r) for r in rows]

    async def update_settings(
        self, account_id: int, settings: AccountSettings
    ) -> AccountSettings | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                "UPDATE accounts SET send_rate = $2, express_deadline_ms = $3,"
                " recipient_limit_per_hour = $4, api_rate = $5, default_country = $6,"
                " price_per_segment = $7, express_surcharge = $8"
                f" WHERE id = $1 RETURNING {_SETTINGS_COLUMNS}",
                account_id,
                settings.send_rate,
                settings.express_deadline_ms,
                settings.recipient_limit_per_hour,
                settings.api_rate,
                settings.default_country,
                settings.price_per_segment,
                settings.express_surcharge,
            )
        )
        return None if row is None else _settings(row)

    async def update_senders(
        self, account_id: int, senders: Sequence[str], default: str | None
    ) -> AccountSettings | None:
        """Replace the senders the account may use (none: any) and its default sender; the
        account's settings after it, None for no such account. Every node learns them from
        the accounts trigger's notification (migration 010)."""
        row = await self.db.run(
            lambda c: c.fetchrow(
                "UPDATE accounts SET senders = $2, default_sender = $3"
                f" WHERE id = $1 RETURNING {_SETTINGS_COLUMNS}",
                account_id,
                list(senders) or None,
                default,
            )
        )
        return None if row is None else _settings(row)

    # --- opt-outs and the blocklist (migration 010) -----------------------------------------
    # account_id None: the gateway's blocklist; else that account's opt-outs. The group
    # commit reads them (_STOPPED), so a number added here is refused by every node's next
    # group.

    async def add_stops(self, account_id: int | None, numbers: Sequence[str]) -> int:
        """Add E.164 `numbers`; how many were not on the list yet."""
        if account_id is None:
            sql = "INSERT INTO blocklist (number) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING"
            status = await self.db.run(lambda c: c.execute(sql, list(numbers)))
        else:
            sql = (
                "INSERT INTO opt_outs (account_id, number) SELECT $2, unnest($1::text[])"
                " ON CONFLICT DO NOTHING"
            )
            status = await self.db.run(lambda c: c.execute(sql, list(numbers), account_id))
        return int(status.rsplit(" ", 1)[-1])

    async def remove_stop(self, account_id: int | None, number: str) -> bool:
        """Take `number` off the list; False when it was not on it."""
        if account_id is None:
            status = await self.db.run(
                lambda c: c.execute("DELETE FROM blocklist WHERE number = $1", number)
            )
        else:
            status = await self.db.run(
                lambda c: c.execute(
                    "DELETE FROM opt_outs WHERE account_id = $1 AND number = $2",
                    account_id,
                    number,
                )
            )
        return bool(status == "DELETE 1")

    async def stops(
        self, account_id: int | None, after: str | None, limit: int
    ) -> list[tuple[str, datetime]]:
        """A page of the list in number order, after the number `after` (None: from the
        start): (number, created_at)."""
        if account_id is None:
            sql = (
                "SELECT number, created_at FROM blocklist WHERE number > coalesce($1, '')"
                " ORDER BY number LIMIT $2"
            )
            rows = await self.db.run(lambda c: c.fetch(sql, after, limit))
        else:
            sql = (
                "SELECT number, created_at FROM opt_outs"
                " WHERE account_id = $3 AND number > coalesce($1, '') ORDER BY number LIMIT $2"
            )
            rows = await self.db.run(lambda c: c.fetch(sql, after, limit, account_id))
        return [(r["number"], r["created_at"]) for r in rows]

    # --- reads (one query each; not on the accept path) ------------------------------------

    async def account_by_key_hash(self, key_hash: bytes) -> Account | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                f"SELECT id, name, balance, held, callback_url, {_SETTINGS_COLUMNS}"
                " FROM accounts WHERE key_hash = $1",
                key_hash,
            )
        )
        if row is None:
            return None
        return Account(
            row["id"],
            row["name"],
            row["balance"],
            row["held"],
            callback_url=row["callback_url"],
            settings=_settings(row),
        )

    async def accounts_page(
        self, after_id: int, limit: int, name: str | None = None
    ) -> list[AccountRecord]:
        rows = await self.db.run(
            lambda c: c.fetch(
                f"SELECT {_RECORD_COLUMNS} FROM accounts WHERE id > $1"
                " AND ($3::text IS NULL OR strpos(lower(name), lower($3)) > 0)"
                " ORDER BY id LIMIT $2",
                after_id,
                limit,
                name,
            )
        )
        return [_record(r) for r in rows]

    async def account_record(self, account_id: int) -> AccountRecord | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                f"SELECT {_RECORD_COLUMNS} FROM accounts WHERE id = $1", account_id
            )
        )
        return None if row is None else _record(row)

    async def set_suspended(self, account_id: int, suspended: bool) -> AccountRecord | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                "UPDATE accounts SET suspended_at ="
                " CASE WHEN $2 THEN coalesce(suspended_at, now()) END"
                f" WHERE id = $1 RETURNING {_RECORD_COLUMNS}",
                account_id,
                suspended,
            )
        )
        return None if row is None else _record(row)

    async def account(self, account_id: int) -> Account | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                "SELECT id, name, balance, held, callback_url FROM accounts WHERE id = $1",
                account_id,
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
                delivered=r["delivered"],
                undelivered=r["undelivered"],
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
    " express, attempts, operator, operator_message_id, client_ref, created_at, updated_at,"
    " callback_url"
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
       count(*) FILTER (WHERE status IN ('sent', 'delivered', 'undelivered')) AS sent,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status IN ('queued', 'sending')) AS pending,
       count(*) FILTER (WHERE status = 'delivered') AS delivered,
       count(*) FILTER (WHERE status = 'undelivered') AS undelivered,
       coalesce(sum(segments), 0)::bigint AS segments,
       coalesce(sum(price) FILTER (WHERE status IN ('sent', 'delivered', 'undelivered')), 0)
           ::bigint AS cost,
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


def _finished_json(group: WriteGroup) -> str:
    """The group's outcomes as the JSON list _finish_sql reads."""
    finished = [
        _FinishRow(
            o.sms.id,
            o.status,
            o.reason,
            o.operator,
            o.operator_message_id,
            o.attempts,
            o.at,
            dispatch_shard(o.sms),
            o.sms.fence,
        )
        for o in group.outcomes
    ]
    return _json.encode(finished).decode()


def _one_answers(
    group: WriteGroup, balances: dict[int, int], inserted: set[str] | None
) -> list[list[AcceptResult]]:
    """The answers of a group _ONE_STATEMENT did: each item accepted, but for those not
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


def _handed_payloads(
    owners: Sequence[str], ids: Sequence[str], stored: list[OutboundSms]
) -> list[str]:
    """The NOTIFY payloads that carry the handed-off messages to their owners: only messages
    still stored (not a duplicate's, nor an atomic sibling's taken back)."""
    by_id = {s.id: s for s in stored}
    handed: dict[str, list[OutboundSms]] = {}
    for owner, message_id in zip(owners, ids, strict=True):
        sms = by_id.get(message_id)
        if sms is not None:
            handed.setdefault(owner, []).append(sms)
    return handoff_payloads(handed) if handed else []


# NOTIFY payloads must stay under 8,000 bytes.
_PAYLOAD_LIMIT = 7_900
_sms_encoder = msgspec.json.Encoder()


def _packed(head: bytes, parts: Sequence[bytes]) -> list[str]:
    """`head` + a JSON list of `parts`, as many payloads as it takes to keep each within a
    NOTIFY's limit (each part fits one on its own)."""
    payloads: list[str] = []
    chunk: list[bytes] = []
    size = len(head) + 2
    for part in parts:
        if size + len(part) + 1 > _PAYLOAD_LIMIT and chunk:
            payloads.append((head + b"[" + b",".join(chunk) + b"]").decode())
            chunk, size = [], len(head) + 2
        chunk.append(part)
        size += len(part) + 1
    if chunk:
        payloads.append((head + b"[" + b",".join(chunk) + b"]").decode())
    return payloads


def settled_payloads(outcomes: Sequence[Outcome]) -> list[str]:
    """JSON lists of `Settled`, each within a NOTIFY's payload limit."""
    return _packed(b"", [_sms_encoder.encode(Settled.of(o)) for o in outcomes])


def handoff_payloads(handed: dict[str, list[OutboundSms]]) -> list[str]:
    """`owner` + newline + a JSON list of the messages handed to it, cut to fit a NOTIFY (in
    bytes). The owner dispatches them from the payload without a query; a message too large
    for a payload goes as an empty list ("claim now"), and the owner reads it with its claim.
    No owner ('') means a shard in transit: whoever takes it recovers the message."""
    payloads: list[str] = []
    for owner, items in handed.items():
        if not owner:
            continue
        head = owner.encode() + b"\n"
        encoded = [_sms_encoder.encode(sms) for sms in items]
        fitting = [part for part in encoded if len(head) + len(part) + 2 <= _PAYLOAD_LIMIT]
        payloads += _packed(head, fitting)
        if len(fitting) < len(encoded):
            payloads.append((head + b"[]").decode())
    return payloads


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


def _credit_args(
    book: CreditBook, messages: dict[int, list[int]], accounts: Sequence[int] | None = None
) -> list[list[Any]]:
    """The nine arrays of _UPDATE_ACCOUNTS: each changed account once (or each of `accounts`),
    and one ledger row per account and kind."""
    if accounts is None:
        accounts = [a for a, d in book.deltas.items() if d]
    changed = [(a, book.accounts[a]) for a in accounts]
    for _, credit in changed:
        credit.check()
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
    return [
        [a for a, _ in changed],
        [c.balance for _, c in changed],
        [c.held for _, c in changed],
        [c.captured for _, c in changed],
        [c.topped_up for _, c in changed],
        [r[0] for r in ledger],
        [r[1] for r in ledger],
        [r[2] for r in ledger],
        [r[3] for r in ledger],
    ]


async def _write_credit(
    conn: asyncpg.Connection, book: CreditBook, messages: dict[int, list[int]]
) -> None:
    if any(book.deltas.values()):
        await conn.fetchval(_WRITE_CREDIT, *_credit_args(book, messages))
