"""Statements that lock a row and then read day partitions, run as a busy node runs them: the
locked row changed by another transaction after the statement's snapshot (PostgreSQL re-checks
it, EvalPlanQual) and a cached generic plan. PostgreSQL 18.6 pruned the partitions wrong after
such a re-check in the same statement (no rows, or a crash; benchmarks/reports/2026-12-07-2cores
has a reproduction without the gateway): the group commit's one statement now locks its accounts
in a query of its own (test_group_commit.py tests it so); the cancel, whose join prunes by the
message it locked, is tested here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import trio

from smsgw.engine.ports import WriteGroup
from smsgw.storage.cancel import CANCEL_SQL
from smsgw.storage.pg import PgStore
from tests.integration.helpers import assert_rollups_exact, open_database, outbound


async def while_the_account_changes(
    database_url: str,
    schema: str,
    account_id: int,
    statement: Callable[[asyncpg.Connection, int], Awaitable[Any]],
    rounds: int,
) -> list[Any]:
    """Run `statement(node, round)` `rounds` times on a session with generic plans, each time
    while another session has changed the account and commits during the statement's wait."""

    async def run() -> list[Any]:
        other = await asyncpg.connect(database_url)
        node = await asyncpg.connect(database_url)
        try:
            for conn in (other, node):
                await conn.execute(f"SET search_path TO {schema}")
            await node.execute("SET plan_cache_mode = force_generic_plan")
            results = []
            for n in range(rounds):
                change = other.transaction()
                await change.start()
                await other.execute(
                    "UPDATE accounts SET balance = balance + 1, topped_up = topped_up + 1"
                    " WHERE id = $1",
                    account_id,
                )
                waiting = asyncio.ensure_future(statement(node, n))
                await asyncio.sleep(0.1)  # the statement has its snapshot and waits
                await change.commit()
                results.append(await waiting)
            return results
        finally:
            await other.close()
            await node.close()

    return await trio.to_thread.run_sync(asyncio.run, run())


async def test_a_cancel_cancels_when_its_account_changed_after_its_snapshot(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        create = WriteGroup()
        create.creates.append(("acme", 100_000, b"k" * 32))
        [account] = (await store.commit_group(create)).creates
        later = time.time() + 3_600
        scheduled = [msgspec.structs.replace(outbound(account.id), send_at=later) for _ in range(6)]
        group = WriteGroup()
        group.accepts.append((scheduled, False))
        await store.commit_group(group)

    async def cancel(node: asyncpg.Connection, n: int) -> tuple[bool, str]:
        row = await node.fetchrow(CANCEL_SQL, account.id, scheduled[n].id, None)
        return row["cancelled"], row["status"]

    results = await while_the_account_changes(database_url, schema, account.id, cancel, 6)
    assert results == [(True, "cancelled")] * 6
    assert await assert_rollups_exact(database_url, schema) > 0
