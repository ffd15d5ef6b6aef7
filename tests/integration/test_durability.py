"""kill -9 under load: every 202 survives the crash and reaches a final state after a restart."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import ADMIN_KEY, bearer
from tests.integration.helpers import (
    FINAL,
    TO,
    assert_ledger_consistent,
    create_account,
    db_fetch,
    http_client,
    ledger,
    until,
)
from tests.integration.nodes import url_or_log

pytestmark = pytest.mark.slow

SENDERS = 16
ACCOUNTS = 4
CREDIT = 10**6
MAX_REQUESTS_PER_SENDER = 20_000


@dataclass(frozen=True)
class Served:
    process: trio.Process
    url: str
    stderr: Path


@asynccontextmanager
async def serve_cli(database_url: str, schema: str, stderr: Path) -> AsyncIterator[Served]:
    """`smsgw serve --port 0` as a child process; yields once it prints that it is listening.
    The child is killed on the way out, whatever happened."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SMSGW_SCHEMA": schema,
        "SMSGW_ADMIN_KEY": ADMIN_KEY,
    }
    command = [sys.executable, "-m", "smsgw.cli", "serve", "--workers", "1"]
    command += ["--host", "127.0.0.1", "--port", "0"]
    command += ["--recipient-limit-per-hour", "1000000"]  # it sends everything to one number
    with stderr.open("ab") as err:
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=err, env=env
        )
    try:
        assert process.stdout is not None
        url = await url_or_log(process.stdout, stderr)
        yield Served(process, url, stderr)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def smsgw_backends(database_url: str, schema: str) -> set[int]:
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'smsgw'",
    )
    return {r["pid"] for r in rows}


async def pending_count(database_url: str, schema: str) -> int:
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT count(*) AS n FROM messages WHERE status IN ('queued', 'sending')",
    )
    return int(rows[0]["n"])


async def flood(
    client: httpx.AsyncClient,
    keys: list[str],
    accepted: list[tuple[str, str]],
    first_accepted: trio.Event,
    sender: int,
) -> None:
    """Send until the server goes away; record (key, id) of every 202."""
    for i in range(MAX_REQUESTS_PER_SENDER):
        key = keys[(sender + i) % len(keys)]
        try:
            r = await client.post(
                "/v1/messages",
                json={"to": TO, "text": f"sender {sender} message {i}"},
                headers=bearer(key),
            )
        except httpx.TransportError:
            return
        if r.status_code == 202:
            accepted.append((key, r.json()["id"]))
            first_accepted.set()
        else:
            # Shedding load is allowed; anything else is not.
            assert r.status_code == 503, r.text


async def test_kill_9_loses_no_accepted_message(database_url: str, schema: str) -> None:
    with tempfile.TemporaryDirectory(prefix="smsgw-durability-") as tmp:
        stderr = Path(tmp) / "stderr.log"
        accepted: list[tuple[str, str]] = []
        first_accepted = trio.Event()
        others = await smsgw_backends(database_url, schema)

        # 1. Serve, create accounts, flood, and kill -9 with requests in flight.
        async with serve_cli(database_url, schema, stderr) as first:
            async with http_client(first.url) as client:
                accounts = [await create_account(client, CREDIT, f"a{i}") for i in range(ACCOUNTS)]
            keys = [a["api_key"] for a in accounts]
            # A client per sender: a dead connection fails only its own sender.
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for sender in range(SENDERS):
                        client = http_client(first.url, connections=1)
                        nursery.start_soon(
                            _flood_with, client, keys, accepted, first_accepted, sender
                        )
                    with trio.fail_after(30):
                        await first_accepted.wait()
                    await trio.sleep(1.0)  # about a second of accepting, then kill -9
                    theirs = await smsgw_backends(database_url, schema) - others
                    first.process.kill()
            assert await first.process.wait() == -9

        assert accepted, "nothing was accepted before the kill"

        # Wait for PostgreSQL to notice the dead client (any transaction it had open is rolled
        # back); from then on the table is what the restarted node must recover.
        async def gone() -> bool:
            return not (await smsgw_backends(database_url, schema)) & theirs

        with trio.fail_after(30):
            await until(gone)
        pending_at_restart = await pending_count(database_url, schema)
        print(f"accepted {len(accepted)}; pending after the kill {pending_at_restart}")
        assert_ledger_consistent(await ledger(database_url, schema))

        # 2. Restart on the same schema: everything accepted is there and gets finished.
        async with (
            serve_cli(database_url, schema, stderr) as second,
            http_client(second.url) as client,
        ):
            ready = await client.get("/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["recovered"] == pending_at_restart

            async def all_final() -> bool:
                return await pending_count(database_url, schema) == 0

            with trio.fail_after(120):
                await until(all_final, interval=0.1)

            ids = [message_id for _, message_id in accepted]
            stored = await db_fetch(
                database_url,
                schema,
                "SELECT id::text AS id, status FROM messages WHERE id = ANY($1::uuid[])",
                ids,
            )
            assert len(stored) == len(set(ids)) == len(ids)
            assert {r["status"] for r in stored} <= FINAL

            missing: list[tuple[str, int]] = []
            limiter = trio.CapacityLimiter(16)

            async def check(key: str, message_id: str) -> None:
                async with limiter:
                    r = await client.get(f"/v1/messages/{message_id}", headers=bearer(key))
                if r.status_code != 200 or r.json()["status"] not in FINAL:
                    missing.append((message_id, r.status_code))

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for key, message_id in accepted:
                        nursery.start_soon(check, key, message_id)
            assert not missing, missing[:10]

            accounts_after = await ledger(database_url, schema)
            assert_ledger_consistent(accounts_after)
            assert all(a["held"] == 0 for a in accounts_after.values()), accounts_after

            # A clean stop this time.
            second.process.terminate()
            with trio.fail_after(30):
                assert await second.process.wait() == 0, stderr.read_text()[-4000:]


async def _flood_with(
    client: httpx.AsyncClient,
    keys: list[str],
    accepted: list[tuple[str, str]],
    first_accepted: trio.Event,
    sender: int,
) -> None:
    async with client:
        await flood(client, keys, accepted, first_accepted, sender)
