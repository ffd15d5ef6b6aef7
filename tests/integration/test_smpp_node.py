"""A node with `--operator-url NAME=smpp://...`: messages go out over SMPP to the simulated
SMSC, its receipts come back through the DLR path, and the node unbinds when it stops."""

from __future__ import annotations

from functools import partial

import msgspec
import trio

from smsgw.runtime.server import Node, run_node
from smsgw.sim.smsc import SimulatedSmsc, SmscProfile
from tests.conftest import bearer, node_options
from tests.integration.helpers import (
    assert_ledger_consistent,
    create_account,
    http_client,
    ledger,
    until,
)

REPORTED = ("delivered", "undelivered")
TEXTS = ["hi", "a" * 161, "س" * 71]


async def test_messages_go_over_smpp_and_receipts_move_them_on(
    database_url: str, schema: str
) -> None:
    smsc = SimulatedSmsc(
        SmscProfile(
            p_temporary=0, p_permanent=0, latency_ms=2, receipt_delay_ms=30, delivered_ratio=0.5
        ),
        record=True,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(smsc.serve)
        options = msgspec.structs.replace(
            node_options(database_url, schema),
            operator_urls=(f"smsc=smpp://gw:pw@127.0.0.1:{port}?binds=2&window=20",),
            dlr_keys=(),
        )
        async with trio.open_nursery() as inner:
            node: Node = await inner.start(partial(run_node, options))
            async with http_client(node.url) as client:
                account = await create_account(client, 10_000)
                key = account["api_key"]
                r = await client.post(
                    "/v1/messages/batch",
                    json={
                        "messages": [
                            {"to": f"+49151234567{i:02d}", "text": TEXTS[i % 3]} for i in range(30)
                        ]
                    },
                    headers=bearer(key),
                )
                assert r.status_code in (200, 202), r.text

                async def all_reported() -> bool:
                    page = await client.get("/v1/messages?limit=1000", headers=bearer(key))
                    items = page.json()["items"]
                    return len(items) == 30 and all(m["status"] in REPORTED for m in items)

                with trio.fail_after(60):
                    await until(all_reported, interval=0.1)
                assert_ledger_consistent(await ledger(database_url, schema))
            # A receipt can overtake the node's record of `sent`: kept as unknown, applied by
            # the reconciler (all 30 messages reached delivered/undelivered above).
            deliveries = node.engine.writer.deliveries
            assert {result for operator, result in deliveries} <= {"applied", "unknown"}
            assert {operator for operator, _ in deliveries} == {"smsc"}
            assert sum(deliveries.values()) == 30
            node.stop.set()
        # 10 short + 10 x 2 GSM + 10 x 2 UCS-2 parts; each message's receipt acknowledged.
        assert smsc.counts["accepted"] == 50
        assert smsc.counts["receipts_acked"] == 30
        assert smsc.counts["unbinds"] == 2
        nursery.cancel_scope.cancel()
