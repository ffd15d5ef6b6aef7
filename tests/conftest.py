"""Shared fixtures: one PostgreSQL per session, one schema per test, a node on port 0."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import asyncpg
import httpx
import pytest
import trio

from smsgw.engine.node import EngineConfig
from smsgw.runtime.server import Node, NodeOptions, run_node
from smsgw.sim.operator import OperatorProfile

ADMIN_KEY = "test-admin-key"
DLR_KEY = "test-dlr-key-sim"  # the `sim` operator's delivery report key


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """DATABASE_URL when set; otherwise an embedded PostgreSQL for the whole session."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from smsgw.storage.embedded import start_embedded

    with tempfile.TemporaryDirectory(prefix="smsgw-test-pg-") as tmp:
        server = start_embedded(Path(tmp) / "pgdata", cleanup="delete")
        yield server.get_uri("postgres")
        server.cleanup()


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema for this test, dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:16]
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop())


def node_options(database_url: str, schema: str, **engine: object) -> NodeOptions:
    # Most tests send everything to one number: the per-recipient limit (20 an hour by
    # default) is lifted unless a test sets it.
    engine.setdefault("recipient_limit_per_hour", 1_000_000)
    return NodeOptions(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        host="127.0.0.1",
        port=0,
        schema=schema,
        engine=EngineConfig(**engine),  # type: ignore[arg-type]
        operators=(OperatorProfile(name="sim", latency_ms_median=2.0, latency_ms_p99=10.0),),
        shutdown_grace=2.0,
        dlr_keys=(("sim", DLR_KEY),),
    )


@pytest.fixture
async def node(database_url: str, schema: str) -> AsyncIterator[Node]:
    async with trio.open_nursery() as nursery:
        running: Node = await nursery.start(partial(run_node, node_options(database_url, schema)))
        yield running
        running.stop.set()


@pytest.fixture
async def client(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        yield http


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
