"""One-time codes in PostgreSQL (migration 013): salted hashes, verification, redaction.

The code never reaches the database, not even as a statement parameter (so no server log
of statements can hold it): it is hashed here, HMAC-SHA256 keyed by the row's own 16 random
bytes of salt over the account, the number and the code. A code has at most 10^8 values, so
the hash keeps it from being read off a row or a backup, not from someone who can run the
database's rows through every code within the code's life.

Every call is one crossing into asyncio (storage/database.py, `Database.run`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING

import asyncpg

from smsgw.engine.ports import OtpVerdict
from smsgw.storage.rows import Days, days_of, made_at_s, within_days

if TYPE_CHECKING:
    from smsgw.storage.database import Database

SALT_BYTES = 16
# Rows are kept this long past their expiry, so that verifying a code late is answered
# `expired` rather than `no_code` for a while; then the sweep deletes them.
KEEP_EXPIRED_S = 3600.0

_ISSUE = """
INSERT INTO otp_codes (message_id, account_id, recipient, salt, digest, expires_at, redacted_body)
VALUES ($1::uuid, $2, $3, $4, $5, now() + make_interval(secs => $6), $7)
"""

# The number's live code: its newest row whose message was stored (an accept that was refused,
# or never committed, stored none), locked until the verdict is written.
_LIVE = """
SELECT c.message_id, c.salt, c.digest, c.attempts, c.used, c.expires_at <= now() AS expired,
       m.status
FROM otp_codes c JOIN messages m ON m.id = c.message_id
WHERE c.account_id = $1 AND c.recipient = $2
ORDER BY c.created_at DESC, c.message_id DESC
LIMIT 1
FOR UPDATE OF c
"""

# The request that sent the code knows its outcome: the message's body becomes the redacted
# text if the message is final, and with $2 the code is used up. Not the group commit's
# outcome statement: a separate UPDATE of one row, by primary key.
_SETTLE = """
WITH redacted AS (
    UPDATE messages m SET body = c.redacted_body
    FROM otp_codes c
    WHERE m.id = $1::uuid AND c.message_id = m.id AND NOT c.redacted
      AND m.status NOT IN ('queued', 'sending')
    RETURNING m.id
)
UPDATE otp_codes c
SET used = c.used OR $2, redacted = c.redacted OR EXISTS (SELECT 1 FROM redacted)
WHERE c.message_id = $1::uuid
RETURNING EXISTS (SELECT 1 FROM redacted) AS redacted_now
"""

# The sweep's statements join the codes to their messages by id, which the planner cannot
# prune by: each names the days of the codes it looks at (rows.within_days), read first from
# otp_codes (a small table; a code's message is made with it), so neither is planned over
# every day partition of the retention at every sweep, nor run when no code waits.
# (PostgreSQL 15 has no min() of uuids.)
_OLDEST = """
SELECT message_id::text FROM otp_codes c WHERE {which} ORDER BY message_id LIMIT 1
"""
_UNREDACTED = "NOT c.redacted"
_EXPIRED = "c.expires_at < now() - make_interval(secs => $1)"

# The catch-up for requests that died before `_SETTLE`: final messages not yet redacted, the
# oldest first; rows another node's sweep holds are skipped.
_REDACT_DUE = """
WITH due AS (
    SELECT c.message_id, c.redacted_body
    FROM otp_codes c JOIN messages m ON m.id = c.message_id
    WHERE NOT c.redacted AND {within} AND m.status NOT IN ('queued', 'sending')
    ORDER BY c.created_at
    LIMIT $1
    FOR UPDATE OF c SKIP LOCKED
), bodies AS (
    UPDATE messages m SET body = due.redacted_body FROM due
    WHERE m.id = due.message_id AND {within}
)
UPDATE otp_codes c SET redacted = true FROM due WHERE c.message_id = due.message_id
"""

# Rows expired long ago whose body no longer holds the code, or that have no message (its
# accept was refused, or never committed).
_PURGE = """
DELETE FROM otp_codes WHERE message_id IN (
    SELECT c.message_id FROM otp_codes c
    WHERE c.expires_at < now() - make_interval(secs => $2)
      AND (c.redacted
           OR NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = c.message_id AND {within}))
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
"""


async def _days(conn: asyncpg.Connection, which: str, *args: object) -> Days | None:
    """The days of the messages of the codes `which` selects, from the oldest's to tomorrow
    (a code made since is of a message made since); None: no such code."""
    oldest = await conn.fetchval(_OLDEST.format(which=which), *args)
    if oldest is None:
        return None
    return days_of(made_at_s(oldest), time.time() + 3_600)


def code_digest(salt: bytes, account_id: int, number: str, code: str) -> bytes:
    """HMAC-SHA256 keyed by `salt` over the account, the number and the code: a row's hash
    matches only its own account and number."""
    message = f"{account_id}\x00{number}\x00{code}".encode()
    return hmac.new(salt, message, hashlib.sha256).digest()


def _count(status: str) -> int:
    """The row count of a command tag such as `UPDATE 3`."""
    return int(status.rsplit(" ", 1)[-1])


class PgOtpStore:
    """`OtpStore` (engine/ports.py) on PostgreSQL, shared by every node of the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def issue(
        self,
        account_id: int,
        number: str,
        message_id: str,
        code: str,
        redacted_text: str,
        ttl_s: float,
    ) -> None:
        salt = secrets.token_bytes(SALT_BYTES)
        digest = code_digest(salt, account_id, number, code)
        await self.db.run(
            lambda c: c.execute(
                _ISSUE, message_id, account_id, number, salt, digest, ttl_s, redacted_text
            )
        )

    async def verify(
        self, account_id: int, number: str, code: str, max_attempts: int
    ) -> OtpVerdict:
        async def check(conn: asyncpg.Connection) -> OtpVerdict:
            async with conn.transaction():
                row = await conn.fetchrow(_LIVE, account_id, number)
                if row is None or row["used"] or row["status"] == "failed":
                    return OtpVerdict(False, "no_code")
                if row["expired"]:
                    return OtpVerdict(False, "expired")
                found = code_digest(row["salt"], account_id, number, code)
                if hmac.compare_digest(found, row["digest"]):
                    await conn.execute(
                        "UPDATE otp_codes SET used = true WHERE message_id = $1",
                        row["message_id"],
                    )
                    return OtpVerdict(True)
                attempts = row["attempts"] + 1
                last = attempts >= max_attempts
                await conn.execute(
                    "UPDATE otp_codes SET attempts = $2, used = $3 WHERE message_id = $1",
                    row["message_id"],
                    attempts,
                    last,
                )
                return OtpVerdict(False, "too_many_attempts" if last else "mismatch")

        return await self.db.run(check)

    async def settle(self, message_id: str, *, void: bool) -> bool:
        row = await self.db.run(lambda c: c.fetchrow(_SETTLE, message_id, void))
        return row is not None and bool(row["redacted_now"])

    async def sweep(self, limit: int) -> tuple[int, int]:
        async def both(conn: asyncpg.Connection) -> tuple[int, int]:
            redacted = purged = 0
            days = await _days(conn, _UNREDACTED)
            if days is not None:
                redact = _REDACT_DUE.replace("{within}", within_days("m.id", days))
                redacted = _count(await conn.execute(redact, limit))
            days = await _days(conn, _EXPIRED, KEEP_EXPIRED_S)
            if days is not None:
                purge = _PURGE.replace("{within}", within_days("m.id", days))
                purged = _count(await conn.execute(purge, limit, KEEP_EXPIRED_S))
            return redacted, purged

        return await self.db.run(both)
