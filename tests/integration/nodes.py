"""Node processes for the multi-node tests: `smsgw serve` on 127.0.0.1, so they can be killed
and paused, and the cluster views they answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from smsgw.engine.ports import SHARDS
from smsgw.engine.shards import fair_share
from smsgw.runtime.workers import listening_url
from tests.conftest import ADMIN_KEY, admin
from tests.integration.helpers import db_fetch, http_client, until

TTL = 3.0  # the lease ttl the nodes run with (the default)
SLOW = ("--operator-latency-ms", "2500,3000")


@dataclass
class NodeProcess:
    node_id: str
    process: trio.Process
    url: str


@asynccontextmanager
async def serve_node(
    database_url: str, schema: str, node_id: str, log: Path, *extra: str
) -> AsyncIterator[NodeProcess]:
    """One `smsgw serve --workers 1` node on a free port; killed on the way out."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SMSGW_SCHEMA": schema,
        "SMSGW_ADMIN_KEY": ADMIN_KEY,
    }
    command = [sys.executable, "-m", "smsgw.cli", "serve", "--workers", "1"]
    command += ["--host", "127.0.0.1", "--port", "0", "--node-id", node_id]
    command += ["--operator-name", f"op-{node_id}", "--lease-ttl", str(TTL), *extra]
    with log.open("ab") as err:
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=err, env=env
        )
    try:
        assert process.stdout is not None
        url = await url_or_log(process.stdout, log)
        yield NodeProcess(node_id, process, url)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def url_or_log(stdout: trio.abc.ReceiveStream, log: Path) -> str:
    """The URL a starting `smsgw serve` says it listens on, or an AssertionError with the end
    of its log when it exits first."""
    with trio.fail_after(60):
        url = await listening_url(stdout)
    if url is None:
        text = await trio.Path(log).read_text()
        raise AssertionError(f"smsgw serve exited early:\n{text[-4000:]}")
    return url


async def cluster(client: httpx.AsyncClient) -> dict:
    r = await client.get("/v1/ops/cluster", headers=admin())
    assert r.status_code == 200, r.text
    return r.json()


async def leases_of(client: httpx.AsyncClient) -> dict:
    """The `shard_leases` child's figures on the node `client` talks to, with every lease."""
    r = await client.get("/v1/ops/supervisor?detail=leases", headers=admin())
    assert r.status_code == 200, r.text
    [child] = [c for c in r.json()["children"] if c["name"] == "shard_leases"]
    return child["stats"]


async def pool_of(client: httpx.AsyncClient) -> dict:
    r = await client.get("/v1/ops/supervisor", headers=admin())
    [child] = [c for c in r.json()["children"] if c["name"] == "provider_pool"]
    return child["stats"]


async def balanced(client: httpx.AsyncClient, alive: Sequence[str]) -> bool:
    """Every shard leased, by the live nodes `alive` only, each holding its fair share: at
    most ceil(256 / n) (what a node takes), so at least what the others leave."""
    view = await cluster(client)
    shards = {n["id"]: n["shards"] for n in view["nodes"] if n["alive"]}
    if view["unowned_shards"] or set(shards) != set(alive) or sum(shards.values()) != SHARDS:
        return False
    share = fair_share(len(alive))
    return all(SHARDS - (len(alive) - 1) * share <= n <= share for n in shards.values())


async def create_accounts(client: httpx.AsyncClient, count: int, credit: int) -> list[dict]:
    accounts = []
    for i in range(count):
        r = await client.post(
            "/v1/accounts", json={"name": f"a{i}", "credit": credit}, headers=admin()
        )
        assert r.status_code == 201, r.text
        accounts.append(r.json())
    return accounts


async def pending_count(database_url: str, schema: str) -> int:
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT count(*) AS n FROM messages WHERE status IN ('queued', 'sending')",
    )
    return int(rows[0]["n"])


async def all_final(database_url: str, schema: str, within: float = 30) -> None:
    """Wait until no message is pending (queued or sending); TooSlowError after `within` s."""

    async def none_pending() -> bool:
        return await pending_count(database_url, schema) == 0

    with trio.fail_after(within):
        await until(none_pending, interval=0.1)


@dataclass
class Member:
    node: NodeProcess
    client: httpx.AsyncClient


@asynccontextmanager
async def balanced_nodes(
    database_url: str, schema: str, *ids: str, extra: Sequence[str] = ()
) -> AsyncIterator[list[Member]]:
    """Node processes named `ids` on one database (`extra`: more `serve` arguments), each with
    a client, once they lease their fair shares of the shards; their stderr goes to one log in
    a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        async with AsyncExitStack() as stack:
            members = []
            for node_id in ids:
                node = await stack.enter_async_context(
                    serve_node(database_url, schema, node_id, log, *extra)
                )
                members.append(Member(node, await stack.enter_async_context(http_client(node.url))))
            with trio.fail_after(30):
                await until(lambda: balanced(members[0].client, ids), interval=0.2)
            yield members


async def shard_owners(members: Sequence[Member]) -> dict[int, str]:
    """Shard -> the id of the member node that leases it."""
    return {
        lease["shard"]: m.node.node_id
        for m in members
        for lease in (await leases_of(m.client))["leases"]
    }
