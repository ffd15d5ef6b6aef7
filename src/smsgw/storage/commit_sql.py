"""The group commit's statements, and the rows they read (outcomes' JSON, COPY records).

The one-statement group and its hand-off twin; the exact way's lock, refusals, insert and
credit writes (with and without hand-off); the outcome callbacks.

Only text and encoders here; storage/commit.py runs them.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from smsgw.engine.messages import Attempt, OutboundSms
from smsgw.engine.ports import WriteGroup, dispatch_shard, micros
from smsgw.storage.rollups import added, copied, moved, upsert
from smsgw.storage.rows import (
    DAY_S,
    MIN_UUID,
    NOT_FINAL,
    Days,
    at_micros,
    days_of,
    id_floor_s,
    within_days,
)


def _ids(days: Days | None) -> str:
    """`m.id` bounded to `days` by literals (rows.within_days)."""
    return within_days("m.id", days)


def _id_range(column: str, low: str, high: str) -> str:
    """`column` bounded by two uuid parameters (PostgreSQL prunes by them as it runs)."""
    return f"{column} >= {low}::uuid AND {column} < {high}::uuid"


# A group commit of accepts and outcomes is one statement (one_statement) when every account
# can cover its holds, however large the group. Otherwise it is four round trips: BEGIN; one
# statement that applies the outcomes and locks the accounts; one that inserts the messages
# and writes the accounts and their ledger rows; COMMIT. Rows travel as one JSON document per
# statement, read back with json_to_recordset (which takes the keys it names and ignores the
# rest): msgspec encodes the structs as they are in about 0.5 µs each, where asyncpg's array
# encoding of `unnest` parameters spent about 15 µs a message in isinstance checks.


# Only a message that is not final yet takes an outcome: exactly one outcome per message,
# whatever retries or recoveries deliver twice, and only under the shard lease it was
# dispatched under (fencing, engine/shards.py).
#
# The plan does not depend on statistics: the outcomes are decoded once (a MATERIALIZED CTE,
# never re-evaluated as the inner side of a join), each message is found by its primary key
# (NOT_FINAL), and the leases of the fenced outcomes' shards are read once per statement, at
# most one row per shard, rather than once per outcome.
def _finish_sql(param: str, *, within: str = "TRUE", only_if: str = "", returning: str = "") -> str:
    """The UPDATE that applies a group's outcomes (a JSON list of _FinishRow in `param`),
    returning each applied one's id, account, price, whether it was sent, its rollup group's
    columns, its new status, reason, time, operator's id and attempts, and the attempt that
    decided it (what _OUTCOME_EVENTS records) (+ `returning`). `within`: a bound on `m.id`,
    the outcomes' days (rows.ids_days, rows.within_days)."""
    return f"""
    WITH outcome AS MATERIALIZED (
        SELECT * FROM json_to_recordset({param}::json)
             AS x(id uuid, status text, reason text, operator text, operator_message_id text,
                  attempts int, at float8, shard int, fence bigint, attempt text,
                  attempt_reason text)
    ), lease AS MATERIALIZED (
        SELECT l.shard, l.token FROM shard_leases l
        WHERE l.shard = ANY (ARRAY(SELECT DISTINCT o.shard FROM outcome o
                                   WHERE o.fence IS NOT NULL))
    )
    UPDATE messages m
    SET status = x.status, reason = x.reason, operator = x.operator,
        operator_message_id = x.operator_message_id, attempts = x.attempts,
        updated_at = to_timestamp(x.at),
        sent_at = CASE WHEN x.status = 'sent' THEN to_timestamp(x.at) END
    FROM outcome x LEFT JOIN lease l ON l.shard = x.shard
    WHERE m.id = x.id AND {within} AND m.status {NOT_FINAL}
      AND (x.fence IS NULL OR x.fence = l.token){only_if}
    RETURNING m.id, m.account_id, m.price, x.status = 'sent' AS sent, m.created_at, m.status,
              m.express, m.operator, m.sender, m.recipient, m.segments, m.reason, m.updated_at,
              m.operator_message_id, m.attempts, x.attempt, x.attempt_reason{returning}"""


# The history of the outcomes `finished` applied (migration 017): the attempt that decided
# one, if any, then the outcome itself, at the outcome's time. Only what the UPDATE returned:
# an outcome delivered twice (after a crash, or a group done again) finds its row final and
# writes nothing. One INSERT for the whole group, in the statement that applies it.
_OUTCOME_EVENTS = """
    INSERT INTO message_events (message_id, at, seq, type, attempt, operator, result,
                                operator_message_id, reason)
    SELECT f.id, f.updated_at, e.seq, e.type, e.attempt, e.operator, e.result, e.omid, e.reason
    FROM finished f CROSS JOIN LATERAL (
        VALUES (1, 'attempt', f.attempts, f.operator, f.attempt, NULL, f.attempt_reason),
               (2, f.status, NULL, CASE WHEN f.status = 'sent' THEN f.operator END, NULL,
                f.operator_message_id, CASE WHEN f.status <> 'sent' THEN f.reason END)
    ) AS e(seq, type, attempt, operator, result, omid, reason)
    WHERE e.seq = 2 OR f.attempt IS NOT NULL"""


# What the outcomes of `finished` captured and released, summed per account, and which
# messages with which prices (in id order: the order of their ledger entries). A message that
# cost nothing (an account whose segments are free) moves no credit: it has no ledger entry.
_PER_ACCOUNT = """
    SELECT account_id,
           coalesce(sum(price) FILTER (WHERE sent), 0) AS captured,
           count(*) FILTER (WHERE sent AND price > 0) AS captured_n,
           coalesce(sum(price) FILTER (WHERE NOT sent), 0) AS released,
           count(*) FILTER (WHERE NOT sent AND price > 0) AS released_n,
           array_agg(id ORDER BY id) FILTER (WHERE sent AND price > 0) AS captured_ids,
           array_agg(price ORDER BY id) FILTER (WHERE sent AND price > 0) AS captured_prices,
           array_agg(id ORDER BY id) FILTER (WHERE NOT sent AND price > 0) AS released_ids,
           array_agg(price ORDER BY id) FILTER (WHERE NOT sent AND price > 0) AS released_prices
    FROM finished GROUP BY account_id"""

# The rollups of the messages the outcomes moved. Only a message not final takes an outcome,
# and `sending` is never written, so each was `queued`; only an outcome (final) writes the
# operator, so it had none.
_FINISHED_MOVED = moved("finished", "'queued'", "NULL::text")


# The accounts come back locked in id order (so concurrent groups cannot deadlock on them),
# with what the outcomes captured and released, summed per account. The text names the
# outcomes' days (rows.ids_days): one text a span of days, made once.
@functools.lru_cache(maxsize=64)
def lock_and_finish(outcomes: Days | None) -> str:
    return _LOCK_AND_FINISH.replace("{finished}", _finish_sql("$2", within=_ids(outcomes)))


_LOCK_AND_FINISH = f"""
WITH finished AS ({{finished}}
), per_account AS ({_PER_ACCOUNT}
), events AS ({_OUTCOME_EVENTS}
), rolled AS ({upsert(_FINISHED_MOVED)}
)
SELECT a.id, a.balance, a.held, a.captured, a.topped_up, a.callback_url,
       f.captured AS out_captured, f.captured_n, f.released AS out_released, f.released_n,
       f.captured_ids::text[], f.captured_prices, f.released_ids::text[], f.released_prices
FROM accounts a LEFT JOIN per_account f ON f.account_id = a.id
WHERE a.id = ANY($1::bigint[])
ORDER BY a.id
FOR UPDATE OF a
"""


class _FinishRow(msgspec.Struct):
    """One outcome as lock_and_finish reads it."""

    id: str
    status: str
    reason: str | None
    operator: str | None
    operator_message_id: str | None
    attempts: int
    at: float
    shard: int
    fence: int | None
    attempt: str | None
    attempt_reason: str | None


_json = msgspec.json.Encoder()

# The accounts' figures ($1-$5) and their ledger rows ($6: a JSON list of
# storage/statement.py's LedgerRow), inserted in the list's order: an account's rows get ids in
# the order their balances follow one another. `at` is when the row was written, the accounts
# locked (not when the transaction began), so times never go back along an account's rows.
_UPDATE_ACCOUNTS = """
updated AS (
    UPDATE accounts a
    SET balance = x.balance, held = x.held, captured = x.captured, topped_up = x.topped_up
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
         AS x(id, balance, held, captured, topped_up)
    WHERE a.id = x.id
), ledger AS (
    INSERT INTO credit_ledger (account_id, kind, amount, messages, balance_after, message_ids,
                               prices, at)
    SELECT x.account_id, x.kind, x.amount, x.messages, x.balance_after, x.message_ids, x.prices,
           clock_timestamp()
    FROM ROWS FROM (json_to_recordset($6::json)
                    AS (account_id bigint, kind text, amount bigint, messages int,
                        balance_after bigint, message_ids uuid[], prices int[]))
         WITH ORDINALITY AS x(account_id, kind, amount, messages, balance_after, message_ids,
                              prices, n)
    ORDER BY x.n
    RETURNING id
)"""

# The accounts' new figures and their ledger rows.
WRITE_CREDIT = f"WITH {_UPDATE_ACCOUNTS} SELECT count(*) FROM ledger"

# The same after a COPY of messages, with their rollups ($7: rollups.copy_rollup).
WRITE_CREDIT_COPIED = (
    f"WITH {_UPDATE_ACCOUNTS}, rolled AS ({upsert(copied('$7'))}) SELECT count(*) FROM ledger"
)

# client_ref is unique per account within a day's partition, by the partition's own unique
# index (migration 019), which the INSERT's ON CONFLICT DO NOTHING honours (one naming the
# index's columns would find no such index on the partitioned parent). Across days it is this
# probe: a message of the account with the ref from the 24 hours before this one, or from
# after it up to an hour (a group of the next day that committed first, while this one waited
# for the account's lock), an index probe in each of at most two partitions (the id range
# prunes the rest), run only for a message that has a ref. It reads what was committed when
# the statement began: the exact way runs it after the accounts are locked, so no group of the
# same account can store the ref meanwhile; one_statement's snapshot is older than its locks,
# so a group with refs takes the exact way within an hour of a midnight, while the day either
# side of it may be written (commit.py, _one_statement).
#
# The id range is the whole group's (`GroupBounds`: from a day before its first message to an
# hour after its last), given as parameters: PostgreSQL chooses its partitions once for the
# statement. A range computed from each message's own time made it prune the partitions again
# for every message (about 10 µs each), as it did in REF_TAKEN. A group's messages are made
# within moments of each other: its range is theirs.
#
# A LATERAL subquery with a LIMIT, so a probe of a day's client_ref index per message: as a NOT
# EXISTS, PostgreSQL could (and did, on PostgreSQL 18 with a generic plan) make it an anti join
# that reads every message of the range, a day of them, to hash their refs, for any group with
# one ref. A message without a ref probes with a NULL, which finds nothing without a descent.
_REF_USED = """
    SELECT 1 AS hit FROM messages p
    WHERE p.account_id = x.account_id AND p.client_ref = x.client_ref AND {within}
    LIMIT 1"""


def _insert_sql(param: str, refs: str, *, only_if: str = "TRUE") -> str:
    """The INSERT of a group's messages (a JSON list of OutboundSms in `param`), each
    `queued`, or `scheduled` with a `send_at`, returning the id, account, price and rollup
    group's columns of each one inserted. `refs`: the bound on `p.id` of the group's
    client_ref probe (`GroupBounds.refs` as parameters, or its days as literals)."""
    return f"""
    INSERT INTO messages (id, account_id, recipient, sender, body, segments, price, express,
                          client_ref, status, deadline, created_at, updated_at, callback_url,
                          dispatch_shard, validity_s, send_at)
    SELECT x.id, x.account_id, x."to", x.sender, x."text", x.segments, x.price, x.express,
           x.client_ref, CASE WHEN x.send_at IS NULL THEN 'queued' ELSE 'scheduled' END,
           to_timestamp(x.deadline), to_timestamp(x.created_at), to_timestamp(x.created_at),
           x.callback_url, x.shard, x.validity, to_timestamp(x.send_at)
    FROM json_to_recordset({param}::json)
         AS x(id uuid, account_id bigint, "to" text, sender text, "text" text, segments int,
              price int, express bool, client_ref text, deadline float8, created_at float8,
              callback_url text, shard smallint, validity int, send_at float8)
    LEFT JOIN LATERAL ({_REF_USED.format(within=refs)}) used ON TRUE
    WHERE {only_if} AND used.hit IS NULL
    ON CONFLICT DO NOTHING
    RETURNING id, account_id, price, created_at, status, express, operator, sender, recipient,
              segments"""


# The messages, the accounts and the ledger in one statement. A message whose client_ref is
# taken is not inserted (the unique index decides, exact across nodes): the caller sees it
# missing from `inserted` and corrects the credit (commit.py, _undo_duplicates), which is rare.
WRITE_GROUP = f"""
WITH inserted AS ({_insert_sql("$7", _id_range("p.id", "$8", "$9"))}
), rolled AS ({upsert(added("inserted"))}
), {_UPDATE_ACCOUNTS}
SELECT (SELECT count(*) FROM inserted) AS stored,
       (SELECT array_agg(id::text) FROM inserted) AS inserted,
       (SELECT array_agg(id) FROM ledger) AS ledger
"""

# The same on a node among several: the messages of shards another node leases are handed
# to it in the same statement (smsgw_handoff, migration 004: it takes its shared advisory
# locks and reads the owners with statements of its own, so after the locks). A message the
# insert skipped (its client_ref taken) is handed off too; its hand-off finds no message when
# claimed, and the caller leaves it out of the NOTIFY. A scheduled message is not handed off:
# it waits in the store until the shard's owner promotes it (storage/scheduled.py), and the
# shards the caller passes are those of the others, in the same order (`handed_off`).
WRITE_GROUP_HANDOFF = (
    WRITE_GROUP.rstrip().removesuffix("AS ledger")
    + """AS ledger,
       h.owners, h.ids
FROM (SELECT array_agg(owner) AS owners, array_agg(message_id::text) AS ids
      FROM smsgw_handoff($10, $11,
                         ARRAY(SELECT value::int FROM json_array_elements_text($12::json)),
                         ARRAY(SELECT (value->>'id')::uuid FROM json_array_elements($7::json)
                               WHERE value->>'send_at' IS NULL)))
     AS h
"""
)

# The same without the insert, for a group whose messages went in by COPY (their rollups in
# $11, as in WRITE_CREDIT_COPIED).
WRITE_CREDIT_HANDOFF = f"""
WITH {_UPDATE_ACCOUNTS}, rolled AS ({upsert(copied("$11"))})
SELECT (SELECT array_agg(id) FROM ledger) AS ledger, h.owners, h.ids
FROM (SELECT array_agg(owner) AS owners, array_agg(message_id::text) AS ids
      FROM smsgw_handoff($7, $8, $9::int[], $10::uuid[])) AS h
"""

# The common group, accepts and outcomes, in one statement and so one round trip (autocommit: its
# own transaction). It locks the group's accounts in id order (smsgw_lock_accounts, migration
# 021: a query of its own, as a re-check of a changed row inside this statement broke its
# partition pruning in PostgreSQL 18.6, which crashed), and goes on only when every one
# exists and its balance covers all of the group's holds for it before any of the group's releases,
# which the node cannot know yet; otherwise it changes nothing and says `ok` false, and the group is
# done the exact way (the transaction of GroupCommit._commit_group). The accounts are updated
# relative to their locked rows, the holds from the messages inserted (a taken client_ref holds
# nothing), so the figures are exact whatever other nodes did. Written only when all of its parts
# apply: `ok` gates the outcomes and the insert, and all the rest follows from what they returned.
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
# limit that way, as the groups that follow count them all. The id bounds keep the count to
# the hour's day partitions: the group's (`GroupBounds.hour`, parameters, so the partitions
# are chosen once for the statement: _REF_USED says why), from two hours before its first
# message (rows.ID_SLACK: an hour more) to an hour after its last.
_RECIPIENT_KEYS = """
    SELECT x.account_id, x."to" AS recipient, count(*) AS n, min(x.created_at) AS at
    FROM json_to_recordset($1::json) AS x(account_id bigint, "to" text, created_at float8)
    GROUP BY 1, 2"""
_SEEN_IN_HOUR = """
    SELECT count(*) AS seen, min(w.created_at) AS oldest FROM (
        SELECT m.created_at FROM messages m
        WHERE m.account_id = k.account_id AND m.recipient = k.recipient
          AND m.created_at > to_timestamp(k.at) - interval '1 hour'
          AND {within}
        LIMIT {per_hour}) w"""
_CROWDED = f"""
    SELECT FROM ({_RECIPIENT_KEYS}) k
    JOIN locked l ON l.id = k.account_id
    CROSS JOIN LATERAL ({_SEEN_IN_HOUR.format(per_hour="l.per_hour", within="{hour}")}) r
    WHERE $4::int IS NOT NULL
      AND (r.seen + k.n > l.per_hour
           OR (2 * (r.seen + k.n) > l.per_hour
               AND l.version <> (SELECT a.xmin FROM accounts a WHERE a.id = l.id)))
    LIMIT 1"""

_HOUR_PARAMS = _id_range("m.id", "$3", "$4")

# The group's recipients past their limit, read after the group's accounts are locked (the
# exact way): how many more each may take (`room`) and when the oldest of its hour's messages
# leaves the hour (seconds after the group's first message to it).
_RECIPIENT_ROOM = f"""
SELECT k.account_id, k.recipient, greatest(l.per_hour - r.seen, 0) AS room,
       extract(epoch FROM r.oldest) + 3600 - k.at AS retry_after
FROM keys k
CROSS JOIN LATERAL (SELECT coalesce(a.recipient_limit_per_hour, $2::int) AS per_hour
                    FROM accounts a WHERE a.id = k.account_id) l
CROSS JOIN LATERAL ({_SEEN_IN_HOUR.format(per_hour="l.per_hour + 1", within=_HOUR_PARAMS)}) r
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
# blocked (`blocked`: for every message, not just bulk). $1 is `refusal_keys`: only the three
# fields read, decoded once (a group's whole messages as JSON cost PostgreSQL about 2.5 µs a
# message to decode, each time a statement reads them). $3-$4: `GroupBounds.hour`.
REFUSALS = f"""
WITH keys AS MATERIALIZED (
    SELECT x.a AS account_id, x.t AS recipient, count(*) AS n, min(x.c) AS at
    FROM json_to_recordset($1::json) AS x(a bigint, t text, c float8)
    GROUP BY 1, 2
)
SELECT 'room' AS kind, r.account_id, r.recipient, r.room, r.retry_after::float8, FALSE AS blocked
FROM ({_RECIPIENT_ROOM}) r
WHERE $2::int IS NOT NULL
UNION ALL
SELECT 'stop', k.account_id, k.recipient, NULL, NULL,
       EXISTS (SELECT FROM blocklist b WHERE b.number = k.recipient)
FROM keys k
WHERE EXISTS (SELECT FROM blocklist b WHERE b.number = k.recipient)
   OR EXISTS (SELECT FROM opt_outs o WHERE o.account_id = k.account_id AND o.number = k.recipient)
"""


class GroupBounds(NamedTuple):
    """The span of a group's messages (their first and last `created_at`), and the id ranges
    its probes read from it, as parameters (so each statement chooses its partitions once):
    `refs`, a day before the first to an hour after the last (_REF_USED, and REF_TAKEN's
    `ref_ranges`); `hour`, two hours before the first to an hour after the last
    (_SEEN_IN_HOUR). No messages (outcomes alone): empty ranges, nothing is probed."""

    first: float | None
    last: float | None

    @classmethod
    def of(cls, items: Sequence[OutboundSms]) -> GroupBounds:
        if not items:
            return cls(None, None)
        return cls(min(s.created_at for s in items), max(s.created_at for s in items))

    def _range(self, before_s: float) -> tuple[uuid.UUID, uuid.UUID]:
        if self.first is None or self.last is None:
            return MIN_UUID, MIN_UUID
        return id_floor_s(self.first - before_s), id_floor_s(self.last + 3_600)

    @property
    def refs(self) -> tuple[uuid.UUID, uuid.UUID]:
        return self._range(DAY_S)

    @property
    def hour(self) -> tuple[uuid.UUID, uuid.UUID]:
        return self._range(7_200)

    def _days(self, before_s: float) -> Days | None:
        if self.first is None or self.last is None:
            return None
        return days_of(self.first - before_s, self.last + 3_600)

    @property
    def statement_days(self) -> StatementDays:
        """The days of `hour` and `refs`, for `one_statement` (its outcomes' days: none)."""
        return StatementDays(self._days(7_200), self._days(DAY_S), None)

    def ref_ranges(self) -> list[uuid.UUID]:
        """REF_TAKEN's $2-$5: `refs`, but for the group's own day when it has only one."""
        low, high = self.refs
        if self.first is None or self.last is None:
            return [low, high, high, high]
        day = self.first // DAY_S * DAY_S
        if self.last >= day + DAY_S:  # across a midnight: every day of it
            return [low, high, high, high]
        return [low, id_floor_s(day), id_floor_s(day + DAY_S), high]


class StatementDays(NamedTuple):
    """The day partitions `one_statement` reads, as literals in its text: the hourly limit's
    probe (`GroupBounds.hour`'s days), the client_ref probe (`GroupBounds.refs`'s) and the
    messages the outcomes finish (`ids_days`). None: no day."""

    hour: Days | None
    refs: Days | None
    outcomes: Days | None


class _RefusalKey(msgspec.Struct):
    """What REFUSALS reads of a message: its account, number and time."""

    a: int
    t: str
    c: float


def refusal_keys(items: Sequence[OutboundSms]) -> str:
    """REFUSALS' $1: each message's account, number and time as a JSON list."""
    return _json.encode([_RefusalKey(s.account_id, s.to, s.created_at) for s in items]).decode()


_OK_FINISHED = _finish_sql(
    "$2",
    within="{outcomes}",
    only_if=" AND (SELECT ok FROM ok)",
    returning=", m.client_ref, m.callback_url",
)
_OK_INSERTED = _insert_sql("$1", "{refs}", only_if="(SELECT ok FROM ok)")
# An account's ledger rows go in as the exact way applies a group (storage/statement.py):
# captures, releases, then holds, each with the balance after it.
_ONE_WRITES = f"""
WITH locked AS MATERIALIZED (
    SELECT * FROM smsgw_lock_accounts($3::bigint[], $4::int)
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
), rolled AS ({upsert(_FINISHED_MOVED + " UNION ALL " + added("inserted"))}
), delta AS (
    SELECT l.id, l.balance,
           coalesce(h.held, 0) AS held, coalesce(h.held_n, 0) AS held_n,
           coalesce(f.captured, 0) AS captured, coalesce(f.captured_n, 0) AS captured_n,
           coalesce(f.released, 0) AS released, coalesce(f.released_n, 0) AS released_n,
           h.held_ids, h.held_prices, f.captured_ids, f.captured_prices, f.released_ids,
           f.released_prices
    FROM locked l
    LEFT JOIN (
        SELECT account_id, sum(price) AS held, count(*) AS held_n,
               array_agg(id ORDER BY id) AS held_ids, array_agg(price ORDER BY id) AS held_prices
        FROM inserted WHERE price > 0 GROUP BY account_id
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
    INSERT INTO credit_ledger (account_id, kind, amount, messages, balance_after, message_ids,
                               prices, at)
    SELECT d.id, k.kind, k.amount, k.n, k.after, k.ids, k.prices, clock_timestamp()
    FROM delta d CROSS JOIN LATERAL (
        VALUES (1, 'capture', d.captured, d.captured_n, d.balance, d.captured_ids,
                d.captured_prices),
               (2, 'release', d.released, d.released_n, d.balance + d.released, d.released_ids,
                d.released_prices),
               (3, 'hold', d.held, d.held_n, d.balance + d.released - d.held, d.held_ids,
                d.held_prices)
    ) AS k(step, kind, amount, n, after, ids, prices)
    WHERE k.amount > 0
    ORDER BY d.id, k.step
), callbacks AS (
    INSERT INTO callback_outbox (message_id, account_id, url, status, reason, client_ref, at)
    SELECT f.id, f.account_id, coalesce(f.callback_url, l.callback_url), f.status, f.reason,
           f.client_ref, f.updated_at
    FROM finished f JOIN locked l ON l.id = f.account_id
    WHERE coalesce(f.callback_url, l.callback_url) IS NOT NULL
), events AS ({_OUTCOME_EVENTS}
)
"""

# The last of one_statement. On a node among several, the messages of shards another node
# leases are handed to it, as in WRITE_GROUP_HANDOFF: all of the group's, or none when `ok`
# is false.
_ONE_HANDOFF = """,
     (SELECT array_agg(x.owner) AS owners, array_agg(x.message_id::text) AS handed
      FROM ok, smsgw_handoff(
          $5, $6,
          CASE WHEN ok.ok THEN ARRAY(SELECT value::int FROM json_array_elements_text($7::json))
          END,
          CASE WHEN ok.ok THEN ARRAY(SELECT (value->>'id')::uuid
                                     FROM json_array_elements($1::json)
                                     WHERE value->>'send_at' IS NULL)
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


@functools.lru_cache(maxsize=64)
def one_statement(handoff: bool, days: StatementDays) -> str:
    """The group's one statement (with the hand-off on a node among several), its probes and
    its outcomes bounded to their days (`StatementDays`) by literals. $1: the messages (JSON),
    $2: the outcomes (`finished_json`), $3: the account ids, $4: the default hourly limit per
    recipient (NULL: none checked); with the hand-off, $5-$7: the node, its advisory lock
    class and the shards of the messages handed off (JSON)."""
    return (
        (_ONE_WRITES + _one_result(handoff))
        .replace("{hour}", within_days("m.id", days.hour))
        .replace("{refs}", within_days("p.id", days.refs))
        .replace("{outcomes}", within_days("m.id", days.outcomes))
    )


# Messages of a group taken back (their client_ref taken, or an atomic sibling's), and their
# rollups.
UNDO_INSERTS = f"""
WITH gone AS (
    DELETE FROM messages WHERE id = ANY($1::uuid[])
    RETURNING account_id, created_at, status, express, operator, sender, recipient, segments,
              price
){upsert(added("gone", -1))}
"""

# Whether a message of a group to be stored by COPY has a client_ref its account used in the
# 24 hours before it, or just after (as _REF_USED; a COPY cannot skip a row): then the group is
# done the INSERT way, which answers that message a duplicate. Run after the accounts are
# locked, and only for a group with refs. The group's messages were made within moments of each
# other, so one id range serves them all (`GroupBounds.ref_ranges`): its partitions are chosen
# once, where a range per message made PostgreSQL prune the partitions again for each (20 ms a
# group of 2,000, the most of what the group commit spent beside the COPY). The range leaves out the
# group's own day when all its messages are of one day: that day's unique index refuses the
# COPY of a ref used in it. $1: the refs (`ref_keys`); $2-$5: two id ranges.
REF_TAKEN = """
SELECT EXISTS (
    SELECT FROM json_to_recordset($1::json) AS x(account_id bigint, client_ref text)
    CROSS JOIN LATERAL (
        -- A probe of each day's client_ref index per ref (LATERAL ... LIMIT: never a hash
        -- of a day's rows, which the id range alone would let the planner choose).
        SELECT FROM messages p
        WHERE p.account_id = x.account_id AND p.client_ref = x.client_ref
          AND (p.id >= $2::uuid AND p.id < $3::uuid OR p.id >= $4::uuid AND p.id < $5::uuid)
        LIMIT 1
    ) used)
"""


class _RefKey(msgspec.Struct):
    """What REF_TAKEN reads of a message."""

    account_id: int
    client_ref: str


def ref_keys(items: Sequence[OutboundSms]) -> str | None:
    """REF_TAKEN's $1: the refs of the messages that have one, as a JSON list; None when
    none has one."""
    keys = [_RefKey(s.account_id, s.client_ref) for s in items if s.client_ref is not None]
    return _json.encode(keys).decode() if keys else None


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
    "validity_s",
    "send_at",
)


def copy_records(stored: Sequence[OutboundSms]) -> list[tuple[Any, ...]]:
    """The messages as COPY rows (in `COPY_COLUMNS` order), `queued` (`scheduled` with a
    `send_at`). Times are whole microseconds exactly as `to_timestamp` stores them (the
    Scheduler's paging cursors compare them); a group's messages mostly share their accept
    time, so each is converted once."""
    times: dict[float, datetime] = {}

    def at(t: float) -> datetime:
        found = times.get(t)
        if found is None:
            found = times[t] = at_micros(micros(t))
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
            "queued" if s.send_at is None else "scheduled",
            None if s.deadline is None else at(s.deadline),
            at(s.created_at),
            at(s.created_at),
            s.callback_url,
            s.shard,
            s.validity,
            None if s.send_at is None else at(s.send_at),
        )
        for s in stored
    ]


def handed_off(stored: Sequence[OutboundSms]) -> list[OutboundSms]:
    """The messages of a group that may be handed to another node: not the scheduled ones
    (they wait in the store until due), in their order (the statements' id lists skip the
    same ones)."""
    return [s for s in stored if s.send_at is None]


# A callback outbox row for each outcome of this group that has a callback URL (the message's,
# else its account's) and that this transaction applied: `xmin` is the current transaction's
# id exactly for the rows it wrote, so an outcome delivered twice after a crash (already
# final, not updated) writes none. Only run when some outcome of the group has a URL. A join
# from the ids (each once: an outcome may come twice in a group) finds each in its day's
# partition, whatever plan the statement is cached with (`id = ANY($1)` in a generic plan
# probes every partition: backlog._QUEUED_MESSAGES).
OUTCOME_CALLBACKS = """
INSERT INTO callback_outbox (message_id, account_id, url, status, reason, client_ref, at)
SELECT m.id, m.account_id, coalesce(m.callback_url, a.callback_url), m.status, m.reason,
       m.client_ref, m.updated_at
FROM (SELECT DISTINCT id FROM unnest($1::uuid[]) AS u(id)) x
JOIN messages m ON m.id = x.id JOIN accounts a ON a.id = m.account_id
WHERE m.xmin = pg_current_xact_id()::xid
  AND coalesce(m.callback_url, a.callback_url) IS NOT NULL
"""


def finished_json(group: WriteGroup) -> str:
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
            o.attempt,
            # A temporary failure's own reason (the outcome's may be the deadline's).
            o.sms.last_reason if o.attempt == "temporary" else o.reason,
        )
        for o in group.outcomes
    ]
    return _json.encode(finished).decode()


# Attempts failed for now (a JSON list of _AttemptRow): each message's attempt count, and its
# history's `attempt` row, in one statement, fenced as outcomes are. Only an attempt newer
# than the row's count is recorded, so one recorded twice (a group done again) writes one row.
# The row keeps the count, so a message recovered after a crash goes on counting.
@functools.lru_cache(maxsize=64)
def record_attempts(days: Days | None) -> str:
    """The attempts' statement, for messages made in `days` (`ids_days`)."""
    return _RECORD_ATTEMPTS.replace("{within}", _ids(days))


_RECORD_ATTEMPTS = f"""
WITH attempt AS MATERIALIZED (
    SELECT * FROM json_to_recordset($1::json)
         AS x(id uuid, attempt int, operator text, reason text, at float8, shard int,
              fence bigint)
), lease AS MATERIALIZED (
    SELECT l.shard, l.token FROM shard_leases l
    WHERE l.shard = ANY (ARRAY(SELECT DISTINCT a.shard FROM attempt a WHERE a.fence IS NOT NULL))
), tried AS (
    UPDATE messages m SET attempts = x.attempt
    FROM attempt x LEFT JOIN lease l ON l.shard = x.shard
    WHERE m.id = x.id AND {{within}} AND m.status {NOT_FINAL} AND m.attempts < x.attempt
      AND (x.fence IS NULL OR x.fence = l.token)
    RETURNING m.id, x.attempt, x.operator, x.reason, x.at
)
INSERT INTO message_events (message_id, at, seq, type, attempt, operator, result, reason)
SELECT t.id, to_timestamp(t.at), 1, 'attempt', t.attempt, t.operator, 'temporary', t.reason
FROM tried t
"""


class _AttemptRow(msgspec.Struct):
    """One attempt as record_attempts reads it."""

    id: str
    attempt: int
    operator: str
    reason: str | None
    at: float
    shard: int
    fence: int | None


def attempts_json(attempts: Sequence[Attempt]) -> list[str]:
    """record_attempts' $1 for each statement the attempts take: one while no message has two
    (a row is updated once per statement), else one more for each later attempt of one."""
    layers: list[list[_AttemptRow]] = []
    seen: dict[str, int] = {}
    for a in attempts:
        n = seen[a.sms.id] = seen.get(a.sms.id, -1) + 1
        if n == len(layers):
            layers.append([])
        row = _AttemptRow(
            a.sms.id, a.sms.attempts, a.operator, a.reason, a.at, dispatch_shard(a.sms), a.sms.fence
        )
        layers[n].append(row)
    return [_json.encode(layer).decode() for layer in layers]
