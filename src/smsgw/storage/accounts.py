"""The `smsgw accounts` commands' reads and changes, straight on PostgreSQL (no node needed)."""

from __future__ import annotations

from typing import Any

from smsgw.engine.ports import WriteGroup
from smsgw.storage.database import Database
from smsgw.storage.pg import PgStore

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
    account = (await PgStore(db).commit_group(group)).creates[0]
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
    return (await PgStore(db).commit_group(group)).topups[0]


async def set_suspended(db: Database, account_id: int, suspended: bool) -> dict[str, Any] | None:
    """Suspend or resume the account, as `POST /v1/accounts/{id}/suspend` does (every node
    learns it from the accounts trigger's notification); the account after it, None for no
    such account."""
    if await PgStore(db).set_suspended(account_id, suspended) is None:
        return None
    return await show_account(db, account_id)


async def replace_key(db: Database, account_id: int, key_hash: bytes) -> bool:
    """Give the account a new API key (its hash); the old one stops working (on every node,
    through the accounts trigger's notification). False for no such account."""
    status = await db.run(
        lambda c: c.execute("UPDATE accounts SET key_hash = $2 WHERE id = $1", account_id, key_hash)
    )
    return bool(status == "UPDATE 1")
