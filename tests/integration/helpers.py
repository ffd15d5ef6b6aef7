"""Shared integration helpers: nodes with chosen operators, HTTP shortcuts, ledger checks in SQL."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import asyncpg
import httpx
import msgspec
import trio

from smsgw.engine.messages import Account, OutboundSms
from smsgw.engine.ports import WriteGroup
from smsgw.http.context import uuid7
from smsgw.runtime.server import Node, run_node
from smsgw.sim.operator import OperatorProfile
from smsgw.storage.database import Database, asyncio_loop
from smsgw.storage.ledger import LEDGER_SQL
from smsgw.storage.migrate import migrate
from smsgw.storage.pg import PgStore
from tests.conftest import admin, bearer, node_options

FINAL = frozenset({"sent", "failed", "expired", "cancelled"})
FINAL_WITHIN = 60.0  # seconds: retries back off for a few seconds at most
TO = "+4915123456789"

# An operator that takes every message: no refund can ever free credit during a test, so the
# number of accepted messages is decided by the credit alone.
RELIABLE = OperatorProfile(
    name="sim", latency_ms_median=2.0, latency_ms_p99=10.0, p_temporary=0.0, p_permanent=0.0
)
# An operator that refuses about a third of the messages, some only after retries.
FLAKY = OperatorProfile(
    name="sim",
    latency_ms_median=2.0,
    latency_ms_p99=10.0,
    p_temporary=0.15,
    p_permanent=0.3,
    seed=7,
)


@asynccontextmanager
async def open_node(
    database_url: str, schema: str, operator: OperatorProfile, **engine: object
) -> AsyncIterator[Node]:
    """A node like the `node` fixture's, talking to `operator`; stopped gracefully on exit."""
    options = msgspec.structs.replace(
        node_options(database_url, schema, **engine), operators=(operator,)
    )
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(partial(run_node, options))
        try:
            yield node
        finally:
            node.stop.set()


def outbound(account_id: int, price: int = 5, client_ref: str | None = None) -> OutboundSms:
    """A message of `account_id` priced `price` (5 a normal segment), for tests that call the
    store directly; accepted now, its id made just after, as a node makes them (the stored
    days are ranges of ids: migration 019)."""
    created_at = time.time()
    return OutboundSms(
        id=uuid7(),
        account_id=account_id,
        to="+4915123456789",
        sender="smsgw",
        text="hi",
        segments=price // 5,
        price=price,
        express=False,
        created_at=created_at,
        client_ref=client_ref,
    )


async def store_account(store: PgStore, credit: int = 1_000_000) -> Account:
    """A new account with `credit`, made by the store's group commit (no HTTP)."""
    group = WriteGroup()
    group.creates.append(("acme", credit, os.urandom(32)))
    [account] = (await store.commit_group(group)).creates
    return account


@asynccontextmanager
async def open_database(database_url: str, schema: str) -> AsyncIterator[Database]:
    """A migrated Database in `schema`, for tests that call the store directly."""
    async with asyncio_loop():
        db = await Database.open(database_url, schema=schema)
        try:
            await migrate(db)
            yield db
        finally:
            await db.close()


def http_client(url: str, *, connections: int = 100) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=30, limits=httpx.Limits(max_connections=connections)
    )


# --- HTTP ------------------------------------------------------------------------------------


async def create_account(client: httpx.AsyncClient, credit: int, name: str = "acme") -> dict:
    r = await client.post("/v1/accounts", json={"name": name, "credit": credit}, headers=admin())
    assert r.status_code == 201, r.text
    account = r.json()
    assert account["balance"] == credit
    return account


async def send(
    client: httpx.AsyncClient, key: str, text: str = "hello", **fields: Any
) -> httpx.Response:
    body = {"to": TO, "text": text, **fields}
    return await client.post("/v1/messages", json=body, headers=bearer(key))


async def get_account(client: httpx.AsyncClient, key: str) -> dict:
    r = await client.get("/v1/account", headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()


async def wait_final(client: httpx.AsyncClient, key: str, message_id: str) -> dict:
    """Poll one message until it is final (sent, failed, expired, cancelled); fails the test
    after FINAL_WITHIN seconds."""
    with trio.fail_after(FINAL_WITHIN):
        while True:
            r = await client.get(f"/v1/messages/{message_id}", headers=bearer(key))
            assert r.status_code == 200, r.text
            if r.json()["status"] in FINAL:
                return r.json()
            await trio.sleep(0.02)


async def wait_all_final(
    client: httpx.AsyncClient, key: str, message_ids: Iterable[str]
) -> list[dict]:
    """Every message's final row, in the order given; all within FINAL_WITHIN seconds."""
    with trio.fail_after(FINAL_WITHIN):
        return [await wait_final(client, key, message_id) for message_id in message_ids]


async def until(condition: Callable[[], Awaitable[bool]], *, interval: float = 0.05) -> None:
    """Poll `condition` (state outside this process, e.g. PostgreSQL) until it holds; bound it
    with the caller's `trio.fail_after`."""
    # Polling, not an Event: the state lives in another process that cannot wake us.
    while not await condition():  # noqa: ASYNC110
        await trio.sleep(interval)


def assert_problem(r: httpx.Response, status: int) -> dict:
    """`r` is an RFC 9457 problem with this status; returns its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0] == "application/problem+json", r.headers
    problem = r.json()
    assert problem["status"] == status
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    return problem


# --- PostgreSQL, read directly -----------------------------------------------------------------

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def db_fetch(database_url: str, schema: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Run one query in `schema` on a fresh connection, in a worker thread with its own asyncio
    loop (the node's trio-asyncio loop belongs to the node's task)."""
    assert _SCHEMA_NAME.match(schema), schema

    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"SET search_path TO {schema}")
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return await trio.to_thread.run_sync(asyncio.run, fetch())


async def message_count(database_url: str, schema: str) -> int:
    rows = await db_fetch(database_url, schema, "SELECT count(*) AS n FROM messages")
    return int(rows[0]["n"])


async def ledger(database_url: str, schema: str) -> dict[int, dict[str, int]]:
    """Per account: its credit columns, its messages and its ledger, summed by kind."""
    rows = await db_fetch(database_url, schema, LEDGER_SQL)
    return {r["id"]: {k: int(v) for k, v in r.items()} for r in rows}


_ROLLUPS = """
SELECT account_id, bucket, status, express, operator, sender, country, messages, segments, price
FROM message_rollups WHERE messages <> 0 OR segments <> 0 OR price <> 0
"""


async def assert_rollups_exact(database_url: str, schema: str) -> int:
    """The rollups the writes kept (migration 018) equal those rebuilt from a scan of the
    messages (smsgw_rollup_rebuild, the oracle), row for row; returns the messages counted.
    Both read in one transaction under the rebuild's lock, so a node still writing cannot
    change one and not the other."""
    assert _SCHEMA_NAME.match(schema), schema

    async def compare() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"SET search_path TO {schema}")
            async with conn.transaction():
                await conn.execute("LOCK TABLE message_rollups IN EXCLUSIVE MODE")
                kept = [tuple(r.values()) for r in await conn.fetch(_ROLLUPS)]
                await conn.execute("SELECT smsgw_rollup_rebuild(NULL)")
                rebuilt = [tuple(r.values()) for r in await conn.fetch(_ROLLUPS)]
            # By repr: an operator may be None, which does not compare with a name.
            return sorted(kept, key=repr), sorted(rebuilt, key=repr)
        finally:
            await conn.close()

    kept, rebuilt = await trio.to_thread.run_sync(asyncio.run, compare())
    assert kept == rebuilt, {
        "kept, not rebuilt": set(kept) - set(rebuilt),
        "rebuilt, not kept": set(rebuilt) - set(kept),
    }
    assert all(r[7] >= 0 for r in kept), kept
    return sum(r[7] for r in kept)


def assert_ledger_consistent(accounts: dict[int, dict[str, int]]) -> None:
    """The credit identities that must hold in every committed state, for every account."""
    assert accounts, "no accounts"
    for account_id, a in accounts.items():
        where = f"account {account_id}: {a}"
        assert a["balance"] >= 0 and a["held"] >= 0, where
        assert a["topped_up"] - a["captured"] - a["held"] == a["balance"], where
        # Credit columns against the messages they cover.
        assert a["captured"] == a["price_sent"], where
        assert a["held"] == a["price_pending"], where
        # The ledger against the credit columns and the messages.
        assert a["l_topup"] == a["topped_up"], where
        assert a["l_capture"] == a["captured"], where
        assert a["l_hold"] - a["l_capture"] - a["l_release"] == a["held"], where
        assert a["l_hold"] == a["price_all"], where
        assert a["l_release"] == a["price_failed"], where
        assert a["l_hold_n"] == a["n_all"], where
        assert a["l_capture_n"] == a["n_sent"], where
        assert a["l_release_n"] == a["n_failed"], where
        # The statement's rows: chained balances, the newest the balance, prices that add up.
        assert a["l_last_balance"] == a["balance"], where
        assert a["l_chain_breaks"] == 0 and a["l_price_breaks"] == 0, where
