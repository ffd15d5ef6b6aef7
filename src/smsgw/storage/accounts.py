"""Accounts in PostgreSQL outside the group commit, and the `smsgw accounts` commands.

PgStore's reads and changes of accounts (settings, senders, suspension, the API key), and the
commands' own, straight on PostgreSQL (no node needed). Creations and top-ups go through the
group commit, for the node's and the commands' alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from smsgw.engine.messages import Account, AccountRecord, AccountSettings
from smsgw.engine.ports import WriteGroup
from smsgw.storage.commit import GroupCommit
from smsgw.storage.database import Database, StorePart


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


class AccountStore(StorePart):
    """PgStore's account reads and changes, each one statement (none on the accept path)."""

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


# What `accounts list` and `show` print: never a key or a secret (those are shown once only).
_COLUMNS = (
    "id, name, balance, held, callback_url, send_rate, express_deadline_ms,"
    " recipient_limit_per_hour, api_rate, default_country, senders, default_sender,"
    " suspended_at IS NOT NULL AS suspended, price_per_segment, express_surcharge"
)


async def list_accounts(db: Database, *, limit: int) -> list[dict[str, Any]]:
    """The first `limit` accounts by id."""
    rows = await db.run(
        lambda c: c.fetch(f"SELECT {_COLUMNS} FROM accounts ORDER BY id LIMIT $1", limit)
    )
    return [dict(r) for r in rows]


async def show_account(db: Database, account_id: int) -> dict[str, Any] | None:
    row = await db.run(
        lambda c: c.fetchrow(f"SELECT {_COLUMNS} FROM accounts WHERE id = $1", account_id)
    )
    return None if row is None else dict(row)


async def create_account(db: Database, name: str, credit: int, key_hash: bytes) -> dict[str, Any]:
    """A new account with `credit`, through the group commit a node uses; its signing
    secret is in the answer (shown only now)."""
    group = WriteGroup()
    group.creates.append((name, credit, key_hash))
    account = (await GroupCommit(db).commit_group(group)).creates[0]
    return {
        "id": account.id,
        "name": account.name,
        "balance": account.balance,
        "signing_secret": account.signing_secret,
    }


async def topup(db: Database, account_id: int, amount: int) -> int | None:
    """Add `amount` (> 0) through the group commit a node uses (so the credit ledger has
    it); the new balance, None for no such account. Raises TopUpTooLarge past the limit."""
    group = WriteGroup()
    group.topups.append((account_id, amount))
    return (await GroupCommit(db).commit_group(group)).topups[0]


async def set_suspended(db: Database, account_id: int, suspended: bool) -> dict[str, Any] | None:
    """Suspend or resume the account, as `POST /v1/accounts/{id}/suspend` does (every node
    learns it from the accounts trigger's notification); the account after it, None for no
    such account."""
    if await AccountStore(db).set_suspended(account_id, suspended) is None:
        return None
    return await show_account(db, account_id)


async def replace_key(db: Database, account_id: int, key_hash: bytes) -> bool:
    """Give the account a new API key (its hash); the old one stops working (on every node,
    through the accounts trigger's notification). False for no such account."""
    status = await db.run(
        lambda c: c.execute("UPDATE accounts SET key_hash = $2 WHERE id = $1", account_id, key_hash)
    )
    return bool(status == "UPDATE 1")
