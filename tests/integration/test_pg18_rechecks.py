"""Statements that lock a row and then read day partitions, run as a busy node runs them: the
locked row changed by another transaction after the statement's snapshot (PostgreSQL re-checks
it, EvalPlanQual) and a cached generic plan. PostgreSQL 18.6 pruned the partitions wrong after
such a re-check in the same statement (no rows, or a crash; benchmarks/reports/2026-12-07-2cores
has a reproduction without the gateway): the group commit's one statement now locks its accounts
in a query of its own; the cancel, whose join prunes by the message it locked, is tested too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import trio

from smsgw.engine.ports import WriteGroup
from smsgw.storage import commit_sql, rows
from smsgw.storage.cancel import CANCEL_SQL
from smsgw.storage.pg import PgStore
from tests.integration.helpers import (
    assert_rollups_exact,
    open_database,
    outbound,
    store_account,
)
from tests.integration.test_group_commit import outcome


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


async def test_the_one_statement_is_exact_when_its_account_changed_after_its_snapshot(
    database_url: str, schema: str
) -> None:
    """The group commit's one statement, outcomes and accepts of the changed account: with the
    statement's own FOR UPDATE this test fails on PostgreSQL 18.6 (the day partitions the
    outcomes' UPDATE pruned by its join came back wrong, or the server crashed). With the lock
    taken by smsgw_lock_accounts (migration 021) every outcome applies and every message is
    stored."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        account = await store_account(store, 100_000)
        pending = [
            msgspec.structs.replace(outbound(account.id), to=f"+4915122{i:06d}") for i in range(30)
        ]
        group = WriteGroup()
        group.accepts.append((pending, False))
        await store.commit_group(group)

    async def one_statement(node: asyncpg.Connection, n: int) -> tuple[int, int]:
        group = WriteGroup()
        group.outcomes += [outcome(s, "sent") for s in pending[n * 10 : n * 10 + 10]]
        # Each to a number of its own: the hourly limit's probe runs, and refuses none.
        fresh = [
            msgspec.structs.replace(outbound(account.id), to=f"+4915123{n}{i:05d}")
            for i in range(5)
        ]
        group.accepts.append((fresh, False))
        days = commit_sql.GroupBounds.of(fresh).statement_days._replace(
            outcomes=rows.ids_days(o.sms.id for o in group.outcomes)
        )
        row = await node.fetchrow(
            commit_sql.one_statement(False, days),
            msgspec.json.encode(fresh).decode(),
            commit_sql.finished_json(group),
            [account.id],
            20,
        )
        assert row["ok"], row
        sent = await node.fetchval(
            "SELECT count(*) FROM messages WHERE id = ANY($1::uuid[]) AND status = 'sent'",
            [o.sms.id for o in group.outcomes],
        )
        return sent, row["stored"]

    results = await while_the_account_changes(database_url, schema, account.id, one_statement, 3)
    assert results == [(10, 5)] * 3
    assert await assert_rollups_exact(database_url, schema) > 0


async def test_a_cancel_cancels_when_its_account_changed_after_its_snapshot(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        account = await store_account(store, 100_000)
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
