"""Idempotency keys in PostgreSQL (migration 002): claims, kept answers, purges.

A key is claimed for a request, its answer kept for replays, and old keys purged: front-door
writes, outside the group commit.
"""

from __future__ import annotations

import asyncpg

from smsgw.engine.ports import IdempotencyClaim
from smsgw.storage.database import StorePart

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


class IdempotencyKeys(StorePart):
    """PgStore's side of `Idempotency-Key` (the `FrontDoorStore` methods that keep keys)."""

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
