"""Issue 29: a group commit that outlives its callers' and the writer's timeouts is either
known not to have happened or its messages are dispatched; /ready says so meanwhile."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import httpx
import trio

from tests.conftest import admin, bearer
from tests.integration.helpers import (
    RELIABLE,
    TO,
    assert_ledger_consistent,
    create_account,
    db_fetch,
    http_client,
    ledger,
    open_node,
    until,
)


async def hold_account_lock(
    database_url: str,
    schema: str,
    account_id: int,
    locked: threading.Event,
    release: threading.Event,
) -> None:
    """Lock the account's row from a connection of our own until `release` (in a worker
    thread with its own asyncio loop, as db_fetch does)."""

    async def hold() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL search_path TO {schema}")
                await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)
                locked.set()
                while not release.is_set():  # noqa: ASYNC110 (a thread's event)
                    await asyncio.sleep(0.02)
        finally:
            await conn.close()

    await trio.to_thread.run_sync(asyncio.run, hold())


async def answered(answers: list[httpx.Response], n: int) -> bool:
    await trio.lowlevel.checkpoint()
    return len(answers) >= n


async def ready_is(client: httpx.AsyncClient, status: int) -> bool:
    return (await client.get("/ready")).status_code == status


async def test_a_commit_blocked_past_every_timeout_leaves_nothing_stranded(
    database_url: str, schema: str
) -> None:
    async with (
        open_node(
            database_url, schema, RELIABLE, accept_timeout=1.0, writer_commit_timeout=2.0
        ) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 10_000)
        key, account_id = account["api_key"], account["id"]
        assert (await client.get("/ready")).status_code == 200
        locked, release = threading.Event(), threading.Event()
        answers: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_account_lock, database_url, schema, account_id, locked, release)
            try:
                await trio.to_thread.run_sync(locked.wait)

                async def post(n: int) -> None:
                    items = [{"to": TO, "text": f"doubt {n}-{i}"} for i in range(20)]
                    r = await client.post(
                        "/v1/messages/batch", json={"messages": items}, headers=bearer(key)
                    )
                    answers.append(r)

                for n in range(3):
                    nursery.start_soon(post, n)
                await until(lambda: answered(answers, 3))
                # The callers gave up (accept_timeout); the writer's commit is in doubt by now
                # or soon: the node is not ready while it is.
                assert all(r.status_code == 503 for r in answers), [r.text for r in answers]
                with trio.fail_after(10):
                    await until(lambda: ready_is(client, 503))  # READY-CHECK
                await trio.sleep(1.5)
            finally:
                release.set()
        # Back to ready once a commit succeeds again.
        r = await client.post("/v1/messages", json={"to": TO, "text": "after"}, headers=bearer(key))
        assert r.status_code == 202, r.text
        with trio.fail_after(15):
            await until(lambda: ready_is(client, 200))

        async def every_stored_message_final() -> bool:
            rows = await db_fetch(
                database_url,
                schema,
                "SELECT count(*) FILTER (WHERE status NOT IN ('sent', 'failed')) AS open"
                " FROM messages",
            )
            return int(rows[0]["open"]) == 0

        with trio.fail_after(30):
            await until(every_stored_message_final)
        tree = (await client.get("/v1/ops/supervisor", headers=admin())).json()
    [writer] = [c["stats"] for c in tree["children"] if c["name"] == "store_writer"]
    assert writer["doubtful_groups"] >= 1
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT count(*) AS n, count(*) FILTER (WHERE status = 'sent') AS sent FROM messages",
    )
    # Whatever the doubtful groups stored went out once and was charged once.
    assert rows[0]["n"] == rows[0]["sent"]
    assert accounts[account_id]["captured"] == 5 * rows[0]["sent"]
