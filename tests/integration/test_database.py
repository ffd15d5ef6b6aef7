"""Database.run on PostgreSQL: connections are kept between runs, and never at the cost of a
caller waiting for the pool, a broken connection, or a transaction left open."""

from __future__ import annotations

import gc

import asyncpg
import pytest
import trio

from smsgw.storage.database import Database
from tests.integration.helpers import db_fetch, open_database


async def backend_pid(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_a_connection_is_kept_for_the_next_run(database_url: str, schema: str) -> None:
    async with open_database(database_url, schema) as db:
        first = await db.run(backend_pid)
        assert [await db.run(backend_pid) for _ in range(5)] == [first] * 5


async def test_more_concurrent_runs_than_connections_all_finish(
    database_url: str, schema: str
) -> None:
    # The pool has at most 6 connections: the other runs wait for one, and a finished run
    # must hand its connection to them rather than keep it.
    async with open_database(database_url, schema) as db:
        done: list[int] = []

        async def one(i: int) -> None:
            await db.run(lambda conn: conn.execute("SELECT pg_sleep(0.05)"))
            done.append(i)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, i)
        assert sorted(done) == list(range(40))
        # And connections are kept again once nobody waits.
        first = await db.run(backend_pid)
        assert await db.run(backend_pid) == first


async def test_a_run_that_failed_gives_its_connection_back(database_url: str, schema: str) -> None:
    async with open_database(database_url, schema) as db:
        first = await db.run(backend_pid)

        async def fails(conn: asyncpg.Connection) -> None:
            await conn.execute("SELECT 1/0")

        with pytest.raises(asyncpg.DivisionByZeroError):
            await db.run(fails)  # on the kept connection
        assert first not in idle_pids(db)
        # The next run takes whatever the pool gives, and works.
        assert await db.run(lambda conn: conn.fetchval("SELECT 1")) == 1


def idle_pids(db: Database) -> list[int]:
    return [conn.get_server_pid() for conn in db._idle]


async def test_a_connection_left_in_a_transaction_is_not_kept(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:

        async def leaves_one_open(conn: asyncpg.Connection) -> int:
            await conn.execute("BEGIN")
            return await backend_pid(conn)

        left = await db.run(leaves_one_open)
        assert left not in idle_pids(db)
        assert await db.run(lambda conn: conn.fetchval("SELECT 1")) == 1


async def test_a_kept_connection_that_was_closed_is_replaced(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:
        first = await db.run(backend_pid)
        # PostgreSQL ends that session while it is idle here (a restart, an admin).
        await db_fetch(database_url, schema, "SELECT pg_terminate_backend($1)", first)
        # The run that takes it before asyncpg has seen the close fails (how depends on when
        # the server's goodbye is read: a connection error, or asyncpg's "another operation
        # is in progress"); the connection is given back then, and the next run works.
        failed = 0
        with trio.fail_after(10):
            while True:
                try:
                    pid = await db.run(backend_pid)
                except Exception:
                    failed += 1
                    assert failed == 1
                    continue
                break
        assert pid != first


async def test_a_release_the_pool_refuses_does_not_end_the_node(
    database_url: str, schema: str
) -> None:
    """A connection is given back to the pool in a task of its own. When asyncpg refuses it
    ("release() called on a free connection holder": PostgreSQL closed it and the pool took it
    back first, seen while PostgreSQL shut down), that task must not end in the exception:
    trio-asyncio raises a task's unretrieved exception into the loop's nursery, and a node
    died that way in benchmarks/chaos.py's pg-restart cycle."""
    async with open_database(database_url, schema) as db:
        pool = db.pool

        class Refusing:
            """The pool, but for a release it refuses as asyncpg did."""

            def __getattr__(self, name: str) -> object:
                return getattr(pool, name)

            async def release(self, conn: asyncpg.Connection, **_: object) -> None:
                raise asyncpg.InternalClientError(
                    "PoolConnectionHolder.release() called on a free connection holder"
                )

        db.pool = Refusing()  # type: ignore[assignment]
        await db.run(lambda conn: conn.execute("BEGIN"))  # left open: given back at once
        for _ in range(5):
            gc.collect()  # an unretrieved exception is reported when its task is collected
            await trio.sleep(0.05)
        db.pool = pool
        assert await db.run(backend_pid) > 0
