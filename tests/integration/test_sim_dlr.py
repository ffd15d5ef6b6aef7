"""Simulated operators send delayed delivery reports to the gateway over loopback."""

from __future__ import annotations

from functools import partial

import httpx
import msgspec
import trio

from smsgw.runtime.server import Node, run_node
from smsgw.sim.dlr import DlrEmitter, DlrProfile
from smsgw.sim.operator import SimulatedOperator
from smsgw.sim.operator_server import OperatorApp, serve_operator
from tests.conftest import bearer, node_options
from tests.integration.helpers import (
    RELIABLE,
    assert_ledger_consistent,
    create_account,
    http_client,
    ledger,
    until,
)

QUICK = DlrProfile(delivered_ratio=0.5, delay_ms_median=30.0, delay_ms_p99=200.0, seed=3)
REPORTED = ("delivered", "undelivered")


async def send_and_wait_reported(client: httpx.AsyncClient, key: str, n: int) -> list[str]:
    r = await client.post(
        "/v1/messages/batch",
        json={"messages": [{"to": f"+49151234567{i:02d}", "text": "hi"} for i in range(n)]},
        headers=bearer(key),
    )
    ids = [item["id"] for item in r.json()["results"]]
    assert len(ids) == n

    async def all_reported() -> bool:
        page = await client.get("/v1/messages?limit=1000", headers=bearer(key))
        return all(m["status"] in REPORTED for m in page.json()["items"])

    with trio.fail_after(60):
        await until(all_reported, interval=0.1)
    page = await client.get("/v1/messages?limit=1000", headers=bearer(key))
    return [m["status"] for m in page.json()["items"]]


async def test_in_process_operators_report_delivery(database_url: str, schema: str) -> None:
    options = msgspec.structs.replace(
        node_options(database_url, schema),
        operators=(RELIABLE,),
        operator_dlr=QUICK,
        dlr_keys=(),  # the node makes the simulated operator's key itself
    )
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(partial(run_node, options))
        async with http_client(node.url) as client:
            account = await create_account(client, 10_000)
            statuses = await send_and_wait_reported(client, account["api_key"], 40)
            # Both outcomes occur at a 50% ratio (40 draws: each all-one-way has p = 2^-40).
            assert set(statuses) == {"delivered", "undelivered"}
            assert_ledger_consistent(await ledger(database_url, schema))
        # A receipt that beats its message's `sent` commit is kept `unknown` and applied by the
        # reconciler once the message is sent (storage/delivery.py): every one counts once.
        counted = node.engine.writer.deliveries
        assert set(counted) <= {("sim", "applied"), ("sim", "unknown")}, counted
        assert sum(counted.values()) == 40, counted
        node.stop.set()


async def test_the_operator_server_reports_delivery(
    database_url: str, schema: str, nursery: trio.Nursery
) -> None:
    operator = SimulatedOperator(msgspec.structs.replace(RELIABLE, name="far"))
    app = OperatorApp(operator)
    operator_url = await nursery.start(partial(serve_operator, app, port=0))
    name = "http:" + operator_url.split("://", 1)[1]  # HttpOperator's name for it
    operator.dlr = DlrEmitter(name, QUICK)
    nursery.start_soon(operator.dlr.run)
    options = msgspec.structs.replace(
        node_options(database_url, schema),
        operator_urls=(operator_url,),
        dlr_keys=((name, "far-key"),),
    )
    async with trio.open_nursery() as inner:
        node: Node = await inner.start(partial(run_node, options))
        async with http_client(node.url) as client, http_client(operator_url) as far:
            # The gateway's address is known only now: tell the operator server.
            r = await far.post("/dlr-target", json={"url": "http://example.com", "key": "k"})
            assert r.status_code == 400  # not loopback
            r = await far.post("/dlr-target", json={"url": node.url, "key": "far-key"})
            assert r.status_code == 200, r.text
            account = await create_account(client, 10_000)
            statuses = await send_and_wait_reported(client, account["api_key"], 30)
            assert set(statuses) <= set(REPORTED)
            stats = (await far.get("/stats")).json()
            assert stats["dlr"]["posted"] == 30 and stats["dlr"]["results"] == {"applied": 30}
        node.stop.set()
