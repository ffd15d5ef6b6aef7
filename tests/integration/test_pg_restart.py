"""Issue 29: PostgreSQL restarted (and killed) under an open-loop load on a `smsgw serve` node.

The node answers 503 with Retry-After (or 429) while the database is away rather than hanging,
`/ready` says 503 meanwhile and 200 after, and the node recovers without a restart: every 202
is stored, every message ends final, the credit ledger is exact. The database is a private
embedded cluster this test stops and starts (`ControlledServer`), never the shared one.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
import trio

from smsgw.engine.ports import CommitInDoubt, WriteGroup
from smsgw.storage.embedded import ControlledServer
from smsgw.storage.pg import PgStore
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    TO,
    assert_ledger_consistent,
    create_account,
    db_fetch,
    http_client,
    ledger,
    open_database,
    outbound,
    until,
)
from tests.integration.nodes import serve_node
from tests.integration.test_commit_doubt import hold_account_lock

pytestmark = pytest.mark.slow

SCHEMA = "t_pg_restart"
ACCOUNTS = 4
RATE = 150  # requests a second, open loop: ~10% are batches of 5, so ~210 messages a second
DURATION = 10.0
BATCH_EVERY = 10
BATCH = 5
MAX_IN_FLIGHT = 600  # requests; past it a scheduled request is skipped (and counted)
# httpx's pool scans its connections for every request it starts or finishes: one client
# with 300 connections spends seconds of CPU after an outage's burst of answers, and the
# load stops while it does. So each client has a few connections.
CLIENTS = 40
DOWN_AT = 3.0  # seconds into the load
DOWN_FOR = 2.0
# An accept waits at most the node's accept timeout (10 s) for its group commit; an answer
# later than this is a hang.
ANSWER_WITHIN = 15.0
RECOVER_WITHIN = 10.0
FINAL_WITHIN = 90.0


@pytest.fixture
def private_pg() -> Iterator[ControlledServer]:
    with tempfile.TemporaryDirectory(prefix="smsgw-pg-restart-") as tmp:
        server = ControlledServer(Path(tmp) / "pgdata")
        server.start()
        try:
            yield server
        finally:
            server.close()


@dataclass
class Load:
    started: float = 0.0
    answers: list[tuple[float, float, int, str | None]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # ids of every 202'd message
    errors: list[str] = field(default_factory=list)  # transport errors and timeouts
    skipped: int = 0
    in_flight: int = 0


async def request(clients: list[httpx.AsyncClient], keys: list[str], i: int, load: Load) -> None:
    key = keys[i % len(keys)]
    client = clients[i % len(clients)]
    sent_at = trio.current_time()
    load.in_flight += 1
    try:
        if i % BATCH_EVERY == 0:
            items = [{"to": TO, "text": f"b{i}.{j}"} for j in range(BATCH)]
            r = await client.post(
                "/v1/messages/batch", json={"messages": items}, headers=bearer(key)
            )
            if r.status_code == 202:
                load.accepted += [x["id"] for x in r.json()["results"] if x["status"] == "queued"]
        else:
            body = {"to": TO, "text": f"m{i}", "express": i % 20 == 1}
            r = await client.post("/v1/messages", json=body, headers=bearer(key))
            if r.status_code == 202:
                load.accepted.append(r.json()["id"])
        now = trio.current_time()
        load.answers.append(
            (sent_at - load.started, now - sent_at, r.status_code, r.headers.get("retry-after"))
        )
    except httpx.HTTPError as exc:
        load.errors.append(f"{sent_at - load.started:.2f}s: {type(exc).__name__}: {exc}")
    finally:
        load.in_flight -= 1


async def open_loop(clients: list[httpx.AsyncClient], keys: list[str], load: Load) -> None:
    """RATE requests a second for DURATION seconds, each started on schedule whatever the
    answers before it (bounded by MAX_IN_FLIGHT)."""
    async with trio.open_nursery() as nursery:
        for i in range(int(RATE * DURATION)):
            await trio.sleep_until(load.started + i / RATE)
            if load.in_flight >= MAX_IN_FLIGHT:
                load.skipped += 1
                continue
            nursery.start_soon(request, clients, keys, i, load)


async def watch_ready(
    client: httpx.AsyncClient, seen: list[tuple[float, int]], t0: float, why: list[str]
) -> None:
    while True:  # until cancelled by the test
        try:
            r = await client.get("/ready", timeout=5)
            status = r.status_code
            if status != 200:
                why.append(f"{trio.current_time() - t0:.1f} s: {r.text[:300]}")
        except httpx.HTTPError as exc:
            status = 0  # a hang is no answer; asserted against below
            why.append(f"{trio.current_time() - t0:.1f} s: {type(exc).__name__}")
        seen.append((trio.current_time() - t0, status))
        await trio.sleep(0.1)


async def not_final(url: str) -> int:
    rows = await db_fetch(
        url, SCHEMA, "SELECT count(*) AS n FROM messages WHERE status IN ('queued', 'sending')"
    )
    return int(rows[0]["n"])


@pytest.mark.parametrize("fault", ["restart", "kill"])
async def test_postgresql_restart_under_load(private_pg: ControlledServer, fault: str) -> None:
    url = private_pg.url
    with tempfile.TemporaryDirectory(prefix="smsgw-pg-restart-log-") as tmp:
        log = Path(tmp) / "serve.log"
        extra = ("--recipient-limit-per-hour", "1000000")
        async with (
            serve_node(url, SCHEMA, "pgr-0", log, *extra) as node,
            http_client(node.url) as client,
            AsyncExitStack() as stack,
        ):
            per_client = MAX_IN_FLIGHT // CLIENTS
            clients = [
                await stack.enter_async_context(http_client(node.url, connections=per_client))
                for _ in range(CLIENTS)
            ]
            accounts = [await create_account(client, 10**7, f"a{i}") for i in range(ACCOUNTS)]
            keys = [a["api_key"] for a in accounts]
            spare = await create_account(client, 10**7, "spare")  # its key is never used before
            load = Load()
            ready: list[tuple[float, int]] = []
            unready: list[str] = []  # why /ready said no, each time
            down_at = up_at = 0.0
            with trio.fail_after(DURATION + ANSWER_WITHIN + RECOVER_WITHIN + 30):
                async with trio.open_nursery() as watching:
                    load.started = trio.current_time()
                    watching.start_soon(watch_ready, client, ready, load.started, unready)
                    async with trio.open_nursery() as loading:
                        loading.start_soon(open_loop, clients, keys, load)
                        await trio.sleep(DOWN_AT)
                        if fault == "restart":
                            await trio.to_thread.run_sync(private_pg.stop, "fast")
                        else:
                            await trio.to_thread.run_sync(private_pg.kill)
                        down_at = trio.current_time() - load.started
                        await trio.sleep(0.5)
                        # Reads of the store while it is away: a key not looked up before,
                        # a message list. 503 with Retry-After, as for accepts (they were 500s).
                        away = [
                            await client.post(
                                "/v1/messages",
                                json={"to": TO, "text": "away"},
                                headers=bearer(spare["api_key"]),
                            ),
                            await client.get("/v1/messages?limit=1", headers=bearer(keys[0])),
                        ]
                        await trio.sleep(DOWN_FOR - 0.5)
                        await trio.to_thread.run_sync(private_pg.start)
                        up_at = trio.current_time() - load.started
                        try:
                            with trio.fail_after(RECOVER_WITHIN):
                                await until(lambda: ready_after(ready, up_at), interval=0.1)
                        except trio.TooSlowError:
                            # Say why, for a failure seen once in many runs (CI).
                            print_timeline(load, ready, down_at, up_at)
                            print_node_log(log)
                            raise AssertionError(
                                f"not ready {RECOVER_WITHIN} s after the restart: "
                                + " | ".join(unready[-5:])
                            ) from None
                    # Every request answered; /ready once more, then stop watching.
                    await trio.sleep(0.5)
                    watching.cancel_scope.cancel()

            print_timeline(load, ready, down_at, up_at)
            print_node_log(log)
            assert node.process.returncode is None, "the node died: " + log.read_text()[-3000:]
            assert not load.errors, load.errors[:10]
            assert load.skipped == 0, f"{load.skipped} requests skipped: answers too slow"
            statuses = {s for _, _, s, _ in load.answers}
            assert statuses <= {202, 429, 503}, statuses
            assert all(ra for _, _, s, ra in load.answers if s != 202), "no Retry-After"
            assert [(r.status_code, "retry-after" in r.headers) for r in away] == [(503, True)] * 2
            slowest = max(took for _, took, _, _ in load.answers)
            assert slowest < ANSWER_WITHIN, slowest
            refused = [a for a in load.answers if a[2] != 202]
            assert refused, "the outage refused nothing: was PostgreSQL down at all?"
            # Accepts flow again after the database is back.
            assert any(s == 202 and t > up_at + 1.0 for t, _, s, _ in load.answers)
            # /ready: 503 while the database is away (no hang, no 200), 200 after.
            while_down = [s for t, s in ready if down_at + 0.5 < t < up_at]
            assert while_down and set(while_down) == {503}, ready
            assert ready[-1][1] == 200, ready[-5:]

            # Nothing accepted is lost, every message ends final, the ledger is exact.
            assert load.accepted
            with trio.fail_after(FINAL_WITHIN):
                await until(lambda: none_pending(url), interval=0.5)
            rows = await db_fetch(
                url,
                SCHEMA,
                "SELECT id::text FROM messages WHERE id = ANY($1::uuid[])",
                load.accepted,
            )
            assert len(rows) == len(set(load.accepted))
            assert_ledger_consistent(await ledger(url, SCHEMA))
            # And the node answers as before, without a restart.
            r = await client.post(
                "/v1/messages", json={"to": TO, "text": "after"}, headers=bearer(keys[0])
            )
            assert r.status_code == 202, r.text
            r = await client.get("/v1/ops/supervisor", headers=admin())
            assert r.status_code == 200


async def ready_after(ready: list[tuple[float, int]], at: float) -> bool:
    await trio.lowlevel.checkpoint()
    return any(t > at and s == 200 for t, s in ready)


async def none_pending(url: str) -> bool:
    return await not_final(url) == 0


def print_timeline(load: Load, ready: list[tuple[float, int]], down: float, up: float) -> None:
    """Per half second: answers by status, the slowest, and /ready (shown on failure)."""
    print(f"PostgreSQL down at {down:.2f} s, started again at {up:.2f} s")
    for slot in range(int((DURATION + ANSWER_WITHIN) * 2)):
        lo, hi = slot / 2, slot / 2 + 0.5
        got = [(took, s) for t, took, s, _ in load.answers if lo <= t < hi]
        seen = sorted({s for t, s in ready if lo <= t < hi})
        if got or seen:
            by = {s: sum(1 for _, x in got if x == s) for s in sorted({s for _, s in got})}
            slowest = max((took for took, _ in got), default=0.0)
            print(f"{lo:5.1f} s  {by}  slowest {slowest:.2f} s  /ready {seen}")


# --- the storage fixes this test found ------------------------------------------------------


async def select_one(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT 1"))


async def test_a_kept_connection_closed_by_a_restart_is_replaced(
    private_pg: ControlledServer,
) -> None:
    """`Database.run` keeps its connection idle for the next call; PostgreSQL restarting
    closes it, asyncpg takes it back and detaches it. The next call must open a new one, not
    fail with "connection has been released back to the pool" (each such failure was a group
    commit answered 503 after PostgreSQL was back)."""
    async with open_database(private_pg.url, SCHEMA) as db:
        assert await db.run(select_one) == 1
        await trio.to_thread.run_sync(private_pg.stop, "fast")
        await trio.to_thread.run_sync(private_pg.start)
        await trio.sleep(0.2)  # the asyncio side sees the connections closed
        assert await db.run(select_one) == 1


async def test_a_commit_whose_session_the_server_ends_is_in_doubt(
    private_pg: ControlledServer,
) -> None:
    """A session ended under a group commit (a shutdown, a crash, a terminated backend: FATAL,
    or asyncpg's "connection was closed in the middle of operation", which is a PostgresError
    too) may have ended after its COMMIT was flushed: the store says it is in doubt, so the
    writer asks what it stored instead of answering 503 for messages that may be stored
    (before, they were stranded: queued, credit held, in no Scheduler)."""
    url = private_pg.url
    async with open_database(url, SCHEMA) as db:
        store = PgStore(db)
        group = WriteGroup()
        group.creates.append(("acme", 100, b"k" * 32))
        [account] = (await store.commit_group(group)).creates
        blocked = WriteGroup()
        blocked.accepts.append(([outbound(account.id)], False))
        locked, release = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        async def commit() -> None:
            try:
                await store.commit_group(blocked)
            except Exception as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_account_lock, url, SCHEMA, account.id, locked, release)
            try:
                await trio.to_thread.run_sync(locked.wait)
                nursery.start_soon(commit)
                with trio.fail_after(10):
                    await until(lambda: lock_waiter_ended(url))
                with trio.fail_after(10):
                    await until(lambda: errored(errors))
            finally:
                release.set()
        [error] = errors
        assert isinstance(error, CommitInDoubt), repr(error)
        assert await store.commit_fate(blocked) == set()


async def lock_waiter_ended(url: str) -> bool:
    """Terminate the smsgw session waiting for a lock, once there is one."""
    rows = await db_fetch(
        url,
        SCHEMA,
        "SELECT pg_terminate_backend(pid) AS ended FROM pg_stat_activity"
        " WHERE application_name = 'smsgw' AND wait_event_type = 'Lock'",
    )
    return any(r["ended"] for r in rows)


async def errored(errors: list[BaseException]) -> bool:
    await trio.lowlevel.checkpoint()
    return bool(errors)


def print_node_log(log: Path) -> None:
    """The node's log without the access lines and the 503s (shown on failure)."""
    skip = ("http.access", "engine unavailable")
    lines = [line for line in log.read_text().splitlines() if not any(s in line for s in skip)]
    print("\n".join(lines[-80:]))
