"""Delivery reports and status callbacks in PostgreSQL: the DLR statement of the group commit,
the callback outbox, and the account's callback settings. Part of `PgStore` (pg.py)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from smsgw.engine.messages import Account, DeliveryReport, DeliveryResult, Outcome
from smsgw.engine.ports import CallbackJob
from smsgw.storage.database import StorePart
from smsgw.storage.rollups import moved, upsert
from smsgw.storage.rows import DAY_S, ID_SLACK, Days, days_of, within_days_or_all

# The rollups of the messages a DLR moved on: each was `sent` (the UPDATE's condition, checked
# again on the row it locks), and keeps its operator.
_ROLLED = f"""rolled AS ({upsert(moved("applied", "'sent'"))}
)"""


def callbacks_of(outcomes: Sequence[Outcome], account_urls: dict[int, str]) -> list[str]:
    """The ids of the outcomes that have a callback URL (the message's own, else its
    account's); empty when none has, so the common case runs no statement for them."""
    return [
        o.sms.id
        for o in outcomes
        if o.sms.callback_url is not None or o.sms.account_id in account_urls
    ]


# The receipts `applied` moved on, in the messages' history (migration 017): only reports
# that changed a message (a repeated report finds it final and writes nothing).
_RECEIPT_EVENTS = """
    INSERT INTO message_events (message_id, at, seq, type, status, reason)
    SELECT a.id, now(), 3, 'receipt', a.status, a.error FROM applied a"""


# One set-based statement per group for every DLR in it: find each report's message by
# (operator, operator_message_id) on messages_operator_message_id, move `sent` ones on, write
# their callbacks, keep the reports that found no message (when $6), and say what became of each
# one. `found` reads the snapshot before the update, so `before` is the status the report met.
# Only the messages `{{within}}` bounds are looked at: an operator's id says nothing of its
# message's day, and without a range each report probes every day partition's index (90 and
# more with the default retention). `apply_deliveries` looks in the last days first (bounded by
# literals, rows.within_days: the cached plan holds those days alone), then everywhere for the
# few reports not found there.
_APPLY_DELIVERIES = f"""
WITH x AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[])
        AS x(operator, omid, status, error, ord)
), found AS (
    -- A lookup per report on messages_operator_message_id, whatever the planner guesses
    -- about the join (a hash join would read the whole table). Were an operator to reuse an
    -- id, its newest message is the one meant (the index's order: no sort).
    SELECT x.ord, m.id, m.status AS before, x.status AS reported, x.error
    FROM x CROSS JOIN LATERAL (
        SELECT m.id, m.status FROM messages m
        WHERE m.operator = x.operator AND m.operator_message_id = x.omid
          AND {{within}}
        ORDER BY m.created_at DESC
        LIMIT 1
    ) m
), applied AS (
    -- The report's fields come with `found`, not from another join with x: PostgreSQL's
    -- generic plan guesses 10 reports and joined x again as the inner side of a nested loop,
    -- for every message (1,125 reports: 155 ms against 25 with a plan for the group).
    UPDATE messages m
    SET status = f.reported,
        reason = CASE WHEN f.reported = 'undelivered' THEN f.error ELSE m.reason END,
        updated_at = now(),
        delivered_at = CASE WHEN f.reported = 'delivered' THEN now() END
    FROM found f
    WHERE m.id = f.id AND m.status = 'sent' AND {{within}}
    RETURNING f.ord, m.id, m.account_id, m.callback_url, m.client_ref, f.reported AS status,
              f.error, m.created_at, m.express, m.operator, m.sender, m.recipient, m.segments,
              m.price
), events AS ({_RECEIPT_EVENTS}
), {_ROLLED}, outbox AS (
    INSERT INTO callback_outbox (message_id, account_id, url, status, reason, client_ref, at)
    SELECT a.id, a.account_id, coalesce(a.callback_url, acc.callback_url), a.status, a.error,
           a.client_ref, now()
    FROM applied a JOIN accounts acc ON acc.id = a.account_id
    WHERE coalesce(a.callback_url, acc.callback_url) IS NOT NULL
), unmatched AS (
    INSERT INTO dlr_unmatched (operator, operator_message_id, status, error)
    SELECT x.operator, x.omid, x.status, x.error FROM x
    WHERE $6::bool AND NOT EXISTS (SELECT 1 FROM found f WHERE f.ord = x.ord)
)
SELECT x.ord, f.id::text AS message_id, f.before, a.ord IS NOT NULL AS applied
FROM x LEFT JOIN found f ON f.ord = x.ord LEFT JOIN applied a ON a.ord = x.ord
"""


# Where a report's message is looked for first: messages made in the last RECENT_DAYS days (a
# message may wait up to its 72 h validity to be sent, and its report comes after that).
RECENT_DAYS = 4


def recent_days(now: float) -> Days:
    """The days of the messages made in the last RECENT_DAYS days (and ID_SLACK ahead)."""
    return days_of(now - RECENT_DAYS * DAY_S, now + ID_SLACK.total_seconds())


@functools.lru_cache(maxsize=8)
def apply_deliveries_sql(days: Days | None) -> str:
    """_APPLY_DELIVERIES over the messages made in `days`; None: over every message."""
    return _APPLY_DELIVERIES.replace("{within}", within_days_or_all("m.id", days))


async def _apply(
    conn: asyncpg.Connection,
    flat: list[tuple[str, DeliveryReport]],
    picked: list[int],
    days: Days | None,
    *,
    keep_unmatched: bool,
) -> dict[int, Any]:
    """_APPLY_DELIVERIES for the reports `flat[i]` of `picked`, looking at the messages made
    in `days` (None: at all): each report's row, by its place in `flat`."""
    rows = await conn.fetch(
        apply_deliveries_sql(days),
        [flat[i][0] for i in picked],
        [flat[i][1].operator_message_id for i in picked],
        [flat[i][1].status for i in picked],
        [flat[i][1].error for i in picked],
        list(range(len(picked))),
        keep_unmatched,
    )
    return {picked[r["ord"]]: r for r in rows}


async def apply_deliveries(
    conn: asyncpg.Connection, deliveries: Sequence[tuple[str, Sequence[DeliveryReport]]]
) -> list[list[DeliveryResult]]:
    """Every DLR of the group in one statement; one result per report, in order. A report
    repeated within the group is answered from the first one (a row is updated once per
    statement, so the repeat could not be applied anyway)."""
    first: dict[tuple[str, str], int] = {}  # (operator, omid) -> position of its first report
    flat: list[tuple[str, DeliveryReport]] = []
    for operator, reports in deliveries:
        for report in reports:
            flat.append((operator, report))
    unique = []
    for position, (operator, report) in enumerate(flat):
        if first.setdefault((operator, report.operator_message_id), position) == position:
            unique.append(position)

    def in_order(i: int) -> tuple[str, str]:
        return flat[i][0], flat[i][1].operator_message_id

    # In key order: groups on two committers then lock the rows they share in the same order
    # (the statement updates in `ord` order), so they wait for each other instead of
    # deadlocking; a deadlock all the same is retried with the whole group.
    unique.sort(key=in_order)
    # Each report is a key lookup; on a table of modest size the planner prefers one pass
    # over all of `messages` for the update's join (a hash join), which grows with the table.
    # Lookups stay fast at any size. The DLR statement is the group's last, so this setting
    # (undone at commit) changes no other statement's plan.
    await conn.execute("SET LOCAL enable_seqscan = off")
    rows = await _apply(conn, flat, unique, recent_days(time.time()), keep_unmatched=False)
    # The few reports of older messages (or of none): everywhere, and kept if still unknown.
    missing = sorted((i for i, r in rows.items() if r["message_id"] is None), key=in_order)
    if missing:
        rows.update(await _apply(conn, flat, missing, None, keep_unmatched=True))
    answered: dict[int, DeliveryResult] = {}
    for position, r in rows.items():
        report = flat[position][1]
        omid = report.operator_message_id
        if r["applied"]:
            answer = DeliveryResult(omid, "applied", r["message_id"], report.status)
        elif r["message_id"] is None:
            answer = DeliveryResult(omid, "unknown")
        elif r["before"] == report.status:
            answer = DeliveryResult(omid, "duplicate", r["message_id"], r["before"])
        else:
            answer = DeliveryResult(omid, "conflict", r["message_id"], r["before"])
        answered[position] = answer
    results: list[list[DeliveryResult]] = []
    position = 0
    for _, reports in deliveries:
        out = []
        for report in reports:
            key = (flat[position][0], report.operator_message_id)
            head = answered[first[key]]
            if first[key] != position:
                head = _repeat(head, flat[first[key]][1], report)
            out.append(head)
            position += 1
        results.append(out)
    return results


def _repeat(head: DeliveryResult, was: DeliveryReport, report: DeliveryReport) -> DeliveryResult:
    """The answer to a report that repeats an earlier one of the same group."""
    if head.result == "unknown":
        return head
    same = head.result in ("applied", "duplicate") and was.status == report.status
    return DeliveryResult(
        report.operator_message_id,
        "duplicate" if same else "conflict",
        head.message_id,
        head.status,
    )


_CLAIM_CALLBACKS = """
WITH due AS (
    SELECT o.id FROM callback_outbox o
    WHERE o.failed_at IS NULL AND o.next_attempt_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM callback_outbox p
          WHERE p.message_id = o.message_id AND p.failed_at IS NULL AND p.id < o.id)
    ORDER BY o.next_attempt_at
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE callback_outbox o
SET attempts = o.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
FROM due, accounts a
WHERE o.id = due.id AND a.id = o.account_id
RETURNING o.id, o.message_id::text, o.account_id, o.url, o.status, o.reason, o.client_ref,
          extract(epoch FROM o.at)::float8 AS at,
          extract(epoch FROM o.created_at)::float8 AS created_at,
          o.attempts, a.signing_secret
"""

_ANY_UNMATCHED = """
SELECT EXISTS (SELECT FROM dlr_unmatched d
               WHERE d.message_id IS NULL AND d.received_at > now() - make_interval(secs => $1))
"""

# A kept `unknown` report whose message has reached `sent` since: applied as a DLR would have
# been (one per message: the oldest), its callback written, the report marked resolved.
_RECONCILE_DELIVERIES = f"""
WITH pick AS (
    SELECT DISTINCT ON (m.id) d.id AS report_id, m.id, d.status, d.error
    FROM dlr_unmatched d
    JOIN messages m ON m.operator = d.operator AND m.operator_message_id = d.operator_message_id
    WHERE d.message_id IS NULL AND d.received_at > now() - make_interval(secs => $1)
      AND m.status = 'sent'
    ORDER BY m.id, d.id
    LIMIT $2
), applied AS (
    UPDATE messages m
    SET status = p.status,
        reason = CASE WHEN p.status = 'undelivered' THEN p.error ELSE m.reason END,
        updated_at = now(),
        delivered_at = CASE WHEN p.status = 'delivered' THEN now() END
    FROM pick p
    WHERE m.id = p.id AND m.status = 'sent'
    RETURNING p.report_id, m.id, m.account_id, m.callback_url, m.client_ref, p.status, p.error,
              m.created_at, m.express, m.operator, m.sender, m.recipient, m.segments, m.price
), events AS ({_RECEIPT_EVENTS}
), {_ROLLED}, outbox AS (
    INSERT INTO callback_outbox (message_id, account_id, url, status, reason, client_ref, at)
    SELECT a.id, a.account_id, coalesce(a.callback_url, acc.callback_url), a.status, a.error,
           a.client_ref, now()
    FROM applied a JOIN accounts acc ON acc.id = a.account_id
    WHERE coalesce(a.callback_url, acc.callback_url) IS NOT NULL
), resolved AS (
    UPDATE dlr_unmatched d SET message_id = a.id, resolved_at = now()
    FROM applied a WHERE d.id = a.report_id
)
SELECT count(*) FROM applied
"""


# Callback attempts answered: delivered rows deleted, the others rescheduled or given up, in
# one statement, and each attempt in its message's history (migration 017), from the rows the
# statement changed: a settle done again (its first commit's answer lost) finds a delivered row
# deleted, a given-up one given up and a rescheduled one's attempt settled already
# (`settled_attempts`), and writes nothing. A receiver's status
# other than 2xx is the error `http_<status>` (engine/callbacks.py), its `http_status` too.
_SETTLE_CALLBACKS = """
WITH delivered AS (
    DELETE FROM callback_outbox o USING unnest($1::bigint[], $2::int[]) AS x(id, http_status)
    WHERE o.id = x.id
    RETURNING o.id, o.message_id, o.status, o.attempts, x.http_status, NULL::text AS error
), retried AS (
    UPDATE callback_outbox o
    SET next_attempt_at = now() + make_interval(secs => x.delay), last_error = x.error,
        settled_attempts = o.attempts
    FROM unnest($3::bigint[], $4::float8[], $5::text[]) AS x(id, delay, error)
    WHERE o.id = x.id AND o.settled_attempts IS DISTINCT FROM o.attempts
    RETURNING o.id, o.message_id, o.status, o.attempts, x.error
), given_up AS (
    UPDATE callback_outbox o SET failed_at = now(), last_error = x.error
    FROM unnest($6::bigint[], $7::text[]) AS x(id, error)
    WHERE o.id = x.id AND o.failed_at IS NULL
    RETURNING o.id, o.message_id, o.status, o.attempts, x.error
), answered AS (
    SELECT * FROM delivered
    UNION ALL
    SELECT r.id, r.message_id, r.status, r.attempts, NULL, r.error
    FROM (SELECT * FROM retried UNION ALL SELECT * FROM given_up) r
)
INSERT INTO message_events (message_id, at, seq, type, delivery_id, status, attempt,
                            http_status, error)
SELECT a.message_id, clock_timestamp(), 4, 'callback', a.id, a.status, a.attempts,
       coalesce(a.http_status,
                CASE WHEN a.error ~ '^http_[0-9]{3}$' THEN substr(a.error, 6)::int END),
       a.error
FROM answered a
"""


class CallbackOutbox(StorePart):
    """PgStore's side of `CallbackStore` and the account's callback settings."""

    async def claim_callbacks(self, limit: int, lease_s: float) -> list[CallbackJob]:
        rows = await self.db.run(lambda c: c.fetch(_CLAIM_CALLBACKS, limit, lease_s))
        jobs = [
            CallbackJob(
                id=r["id"],
                message_id=r["message_id"],
                account_id=r["account_id"],
                url=r["url"],
                status=r["status"],
                reason=r["reason"],
                client_ref=r["client_ref"],
                at=r["at"],
                created_at=r["created_at"],
                attempts=r["attempts"],
                secret=r["signing_secret"],
            )
            for r in rows
        ]
        jobs.sort(key=lambda j: j.id)
        return jobs

    async def settle_callbacks(
        self,
        delivered: Sequence[tuple[int, int]],
        retry: Sequence[tuple[int, float, str]],
        failed: Sequence[tuple[int, str]],
    ) -> None:
        await self.db.run(
            lambda c: c.execute(
                _SETTLE_CALLBACKS,
                [d[0] for d in delivered],
                [d[1] for d in delivered],
                [r[0] for r in retry],
                [r[1] for r in retry],
                [r[2] for r in retry],
                [f[0] for f in failed],
                [f[1] for f in failed],
            ),
            name="settle_callbacks",
        )

    async def reconcile_deliveries(self, max_age_s: float, limit: int) -> int:
        async def reconcile(conn: asyncpg.Connection) -> int:
            # Planned over every day partition (an operator's id says nothing of the day):
            # only when a kept report waits, not at every round.
            if not await conn.fetchval(_ANY_UNMATCHED, max_age_s):
                return 0
            return int(await conn.fetchval(_RECONCILE_DELIVERIES, max_age_s, limit))

        return await self.db.run(reconcile)

    async def purge_delivery_records(self, older_than_s: float, limit: int) -> int:
        deleted = await self.db.run(
            lambda c: c.fetchval(
                "WITH reports AS (DELETE FROM dlr_unmatched WHERE id IN ("
                " SELECT id FROM dlr_unmatched"
                " WHERE received_at < now() - make_interval(secs => $1) LIMIT $2)"
                " RETURNING 1),"
                " callbacks AS (DELETE FROM callback_outbox WHERE id IN ("
                " SELECT id FROM callback_outbox"
                " WHERE failed_at < now() - make_interval(secs => $1) LIMIT $2)"
                " RETURNING 1)"
                " SELECT (SELECT count(*) FROM reports) + (SELECT count(*) FROM callbacks)",
                older_than_s,
                limit,
            )
        )
        return int(deleted)

    async def set_callback_url(self, account_id: int, url: str | None) -> Account | None:
        row = await self.db.run(
            lambda c: c.fetchrow(
                "UPDATE accounts SET callback_url = $2 WHERE id = $1"
                " RETURNING id, name, balance, held, callback_url",
                account_id,
                url,
            )
        )
        return None if row is None else Account(**dict(row))

    async def rotate_signing_secret(self, account_id: int, secret: str) -> bool:
        status = await self.db.run(
            lambda c: c.execute(
                "UPDATE accounts SET signing_secret = $2 WHERE id = $1", account_id, secret
            )
        )
        return bool(status == "UPDATE 1")
