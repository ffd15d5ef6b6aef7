"""Opt-outs and the gateway's blocklist in PostgreSQL (migration 010): changes and pages.

account_id None: the gateway's blocklist; else that account's opt-outs. The group commit reads
them (commit_sql.py, `_STOPPED_ANY` and `REFUSALS`), so a number added here is refused by every
node's next group.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from smsgw.storage.database import StorePart


class OptOuts(StorePart):
    """PgStore's side of the opt-out and blocklist routes."""

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
