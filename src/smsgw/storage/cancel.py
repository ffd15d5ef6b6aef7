"""Cancelling a scheduled or queued message (POST /v1/messages/{id}/cancel): one statement
that decides it, releases its hold and writes its ledger and callback rows."""

from __future__ import annotations

from collections.abc import Sequence

from smsgw.engine.ports import CancelResult
from smsgw.storage.database import Database
from smsgw.storage.rollups import moved, upsert

# The account is locked first, as every group commit locks its accounts before it touches
# their messages' status, so a cancel and a group commit never wait on each other in a circle
# (a group's attempts touch message rows only, and wait for no account). Only a `scheduled` or
# `queued` row is cancelled: the conditional UPDATE decides, exact across nodes (an outcome
# committed meanwhile makes the row final, a promotion makes a scheduled one queued, and
# PostgreSQL re-reads the row before it updates). The release is a ledger row of one message,
# as a `failed` outcome's is (storage/ledger.py). The callback row and the history's row are
# written in the same statement, as an outcome's are; the ledger row carries the balance
# after the release, as a group commit's do (storage/statement.py). What the statement
# changed its own snapshot does not show, so the answer comes from `cancelled` when it
# cancelled, else from the row as it was. Only a queued message of a shard in $3 (the shards
# the asking node dispatches; NULL: all) is cancelled: the dispatching node's pool is what
# keeps a cancelled message from an operator, so another node's cancel could race a send
# there. A scheduled message is in no node's memory (its promotion and this statement take
# turns on the row), so any node cancels it. The message is locked (after its account) before
# the update, so `before` is its status as the update finds it (a promotion committed since
# the statement's snapshot included): what its rollup leaves.
CANCEL_SQL = f"""
WITH locked AS MATERIALIZED (
    SELECT a.id, a.callback_url FROM accounts a WHERE a.id = $1 FOR UPDATE
), before AS MATERIALIZED (
    SELECT m.id, m.status FROM messages m JOIN locked l ON l.id = m.account_id
    WHERE m.id = $2::uuid
    FOR UPDATE OF m
), cancelled AS (
    UPDATE messages m SET status = 'cancelled', reason = NULL, updated_at = now()
    FROM before b
    WHERE m.id = b.id
      AND (b.status = 'scheduled'
           OR (b.status = 'queued'
               AND ($3::int[] IS NULL
                    OR coalesce(m.dispatch_shard, shard_of(m.account_id)) = ANY($3))))
    RETURNING m.id, m.account_id, m.price, m.status, m.reason, m.client_ref, m.callback_url,
              m.updated_at, b.status AS before, m.created_at, m.express, m.operator, m.sender,
              m.recipient, m.segments
), rolled AS ({upsert(moved("cancelled", "before"))}
), credit AS (
    UPDATE accounts a SET balance = a.balance + c.price, held = a.held - c.price
    FROM cancelled c WHERE a.id = c.account_id
    RETURNING a.balance
), ledger AS (
    INSERT INTO credit_ledger (account_id, kind, amount, messages, balance_after, message_ids,
                               prices, at)
    SELECT c.account_id, 'release', c.price, 1, (SELECT balance FROM credit), ARRAY[c.id],
           ARRAY[c.price], clock_timestamp()
    FROM cancelled c WHERE c.price > 0
), callbacks AS (
    INSERT INTO callback_outbox (message_id, account_id, url, status, reason, client_ref, at)
    SELECT c.id, c.account_id, coalesce(c.callback_url, l.callback_url), c.status, c.reason,
           c.client_ref, c.updated_at
    FROM cancelled c CROSS JOIN locked l
    WHERE coalesce(c.callback_url, l.callback_url) IS NOT NULL
), events AS (
    INSERT INTO message_events (message_id, at, seq, type)
    SELECT c.id, c.updated_at, 2, 'cancelled' FROM cancelled c
)
SELECT TRUE AS cancelled, c.status, c.price FROM cancelled c
UNION ALL
SELECT FALSE, m.status, m.price FROM messages m
WHERE m.id = $2::uuid AND m.account_id = $1 AND NOT EXISTS (SELECT FROM cancelled)
"""


async def cancel_message(
    db: Database, account_id: int, message_id: str, shards: Sequence[int] | None
) -> CancelResult | None:
    """Cancel `message_id` of `account_id` if it is still scheduled, or queued and of one of
    `shards` (None: any), releasing its hold; None when the account has no such message."""
    listed = None if shards is None else list(shards)
    row = await db.run(
        lambda c: c.fetchrow(CANCEL_SQL, account_id, message_id, listed), name="cancel"
    )
    if row is None:
        return None
    return CancelResult(cancelled=row["cancelled"], status=row["status"], price=row["price"])
