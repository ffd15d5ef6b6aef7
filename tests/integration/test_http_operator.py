"""A node sending to an operator over HTTP: the operator server on 127.0.0.1, real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import msgspec
import trio

from smsgw.runtime.server import Node, run_node
from smsgw.sim.operator import SimulatedOperator
from smsgw.sim.operator_server import OperatorApp, serve_operator
from tests.conftest import bearer, node_options
from tests.integration.helpers import (
    RELIABLE,
    assert_ledger_consistent,
    create_account,
    http_client,
    ledger,
    wait_all_final,
    wait_final,
)


@asynccontextmanager
async def node_with_http_operator(
    database_url: str, schema: str, operator_url: str
) -> AsyncIterator[Node]:
    options = msgspec.structs.replace(
        node_options(database_url, schema), operator_urls=(operator_url,)
    )
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(partial(run_node, options))
        try:
            yield node
        finally:
            node.stop.set()


async def test_accepted_then_sent_through_the_operator_server(
    database_url: str, schema: str, nursery: trio.Nursery
) -> None:
    operator = OperatorApp(SimulatedOperator(msgspec.structs.replace(RELIABLE, name="far")))
    operator_url = await nursery.start(partial(serve_operator, operator, port=0))

    async with (
        node_with_http_operator(database_url, schema, operator_url) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 1_000)
        key = account["api_key"]
        one = await client.post(
            "/v1/messages", json={"to": "+4915123456789", "text": "hi"}, headers=bearer(key)
        )
        assert one.status_code == 202, one.text
        batch = await client.post(
            "/v1/messages/batch",
            json={"messages": [{"to": f"+49151234567{n:02d}", "text": "hi"} for n in range(20)]},
            headers=bearer(key),
        )
        assert batch.status_code == 202, batch.text
        ids = [one.json()["id"]] + [r["id"] for r in batch.json()["results"]]

        finals = await wait_all_final(client, key, ids)

    assert [m["status"] for m in finals] == ["sent"] * 21
    assert {m["operator"] for m in finals} == {f"http:{operator_url.removeprefix('http://')}"}
    assert len({m["operator_message_id"] for m in finals}) == 21
    stats = operator.stats()
    assert stats["sent"] == 21 and stats["duplicates_suppressed"] == 0
    assert 1 <= stats["requests"] <= 21  # windows of several messages per POST
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    assert accounts[account["id"]]["captured"] == 21 * 5


async def test_an_operator_that_comes_back_gets_the_retries(
    database_url: str, schema: str, nursery: trio.Nursery
) -> None:
    """Unreachable at first: every attempt is temporary, and once the operator listens the
    retries go through; nothing is charged twice."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    operator = OperatorApp(SimulatedOperator(RELIABLE))

    async with (
        node_with_http_operator(database_url, schema, f"http://127.0.0.1:{port}") as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 100)
        key = account["api_key"]
        r = await client.post(
            "/v1/messages", json={"to": "+4915123456789", "text": "hi"}, headers=bearer(key)
        )
        assert r.status_code == 202, r.text
        await trio.sleep(0.3)  # the first attempt fails against the closed port
        await nursery.start(partial(serve_operator, operator, port=port))
        final = await wait_final(client, key, r.json()["id"])

    assert final["status"] == "sent"
    assert final["attempts"] >= 2
    assert operator.stats()["sent"] == 1
    assert_ledger_consistent(await ledger(database_url, schema))
