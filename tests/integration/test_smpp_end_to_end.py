"""2,000 messages through a node and two SMPP operators over loopback (issue 22's end-to-end
acceptance): 10% express, 20% Persian, 10% longer than one segment; one SMSC throttles, the
other drops its connection once. Every accepted message ends final, no part is lost, no
message is charged twice, every multi-part message arrives as its parts under one reference,
and receipts move `sent` on to `delivered` or `undelivered`."""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import msgspec
import pytest
import trio

from smsgw.connectors.operators.smpp.encoding import DATA_CODING_UCS2, ESM_CLASS_UDHI
from smsgw.runtime.server import Node, run_node
from smsgw.sim.smsc import SimulatedSmsc, SmscProfile, SubmitRecord
from tests.conftest import bearer, node_options
from tests.integration.helpers import (
    assert_ledger_consistent,
    create_account,
    db_fetch,
    http_client,
    ledger,
    until,
)

pytestmark = pytest.mark.slow

MESSAGES = 2_000
FINAL = ("delivered", "undelivered", "failed")
LONG_GSM = "Your order 4711 has shipped. " * 7  # 203 characters: 2 parts of 153
LONG_PERSIAN = "سفارش شما ارسال شد. " * 5  # 100 characters: 2 parts of 67
PERSIAN = "کد شما ۴۷۱۱ است"


def text_of(i: int) -> str:
    if i % 10 == 3:
        return LONG_GSM if i % 20 == 3 else LONG_PERSIAN  # 10% long, half of them Persian
    if i % 5 == 1:
        return PERSIAN  # and these: 20% Persian in all
    return f"Hello {i}"


def number(i: int) -> str:
    return f"+4915{i:09d}"


def parts_by_reference(records: list[SubmitRecord]) -> dict[tuple[str, int], set[tuple[int, int]]]:
    """Accepted concatenated parts, by (destination, UDH reference): {(part, of)}."""
    found: dict[tuple[str, int], set[tuple[int, int]]] = defaultdict(set)
    for record in records:
        pdu = record.pdu
        if record.status != 0 or not pdu.esm_class & ESM_CLASS_UDHI:
            continue
        udh = pdu.short_message[: pdu.short_message[0] + 1]
        # UDH: length, IEI 0x00 (8-bit reference), IE length 3, reference, total, sequence
        assert udh[1] == 0x00 and udh[2] == 3, udh
        found[(pdu.destination_addr, udh[3])].add((udh[5], udh[4]))
    return found


async def test_two_thousand_messages_through_two_smpp_operators(
    database_url: str, schema: str
) -> None:
    common = {"latency_ms": 3.0, "receipt_delay_ms": 50.0, "p_temporary": 0.02}
    throttling = SimulatedSmsc(
        SmscProfile(**common, p_permanent=0.01, tps=150.0, window=20, seed=1), record=True
    )
    dropping = SimulatedSmsc(
        SmscProfile(**common, p_permanent=0.01, drop_after=400, delivered_ratio=0.9, seed=2),
        record=True,
    )
    async with trio.open_nursery() as nursery:
        port_a = await nursery.start(throttling.serve)
        port_b = await nursery.start(dropping.serve)
        options = msgspec.structs.replace(
            node_options(database_url, schema),
            operator_urls=(
                f"throttling=smpp://gw:pw@127.0.0.1:{port_a}?binds=2&window=20&tps=500",
                f"dropping=smpp://gw:pw@127.0.0.1:{port_b}?binds=2&window=20",
            ),
            dlr_keys=(),
        )
        async with trio.open_nursery() as inner:
            node: Node = await inner.start(partial(run_node, options))
            async with http_client(node.url) as client:
                account = await create_account(client, 1_000_000)
                key = bearer(account["api_key"])
                bulk = [i for i in range(MESSAGES) if i % 10]
                express = [i for i in range(MESSAGES) if i % 10 == 0]

                async def send_bulk(start: int) -> None:
                    chunk = bulk[start : start + 200]
                    body = {"messages": [{"to": number(i), "text": text_of(i)} for i in chunk]}
                    r = await client.post("/v1/messages/batch", json=body, headers=key)
                    assert r.status_code == 202, r.text
                    assert r.json()["accepted"] == len(chunk), r.text

                async def send_express(i: int) -> None:
                    body = {"to": number(i), "text": text_of(i), "express": True}
                    r = await client.post("/v1/messages", json=body, headers=key)
                    assert r.status_code == 202, r.text

                with trio.fail_after(60):
                    async with trio.open_nursery() as sends:
                        for start in range(0, len(bulk), 200):
                            sends.start_soon(send_bulk, start)
                        for i in express:
                            sends.start_soon(send_express, i)
                            await trio.sleep(0.005)

                async def all_final() -> bool:
                    rows = await db_fetch(
                        database_url,
                        schema,
                        "SELECT count(*) AS n FROM messages WHERE status <> ALL($1::text[])",
                        list(FINAL),
                    )
                    return rows[0]["n"] == 0

                with trio.fail_after(120):
                    await until(all_final, interval=0.25)
            node.stop.set()
        nursery.cancel_scope.cancel()

    rows = await db_fetch(
        database_url, schema, "SELECT recipient, status, segments, price, express FROM messages"
    )
    assert len(rows) == MESSAGES
    by_status: dict[str, int] = defaultdict(int)
    for row in rows:
        by_status[row["status"]] += 1
    # Receipts moved every sent message on; the SMSCs' permanent refusals (1%) and the
    # temporary ones that ran out of retries are failed, refunded.
    assert by_status["delivered"] + by_status["undelivered"] >= MESSAGES * 0.95, by_status
    assert sum(1 for r in rows if r["express"]) == MESSAGES // 10
    assert dropping.counts["drops"] == 1 and throttling.counts["throttled"] > 0

    # Charged once: what was captured is exactly the price of the messages that went out.
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    [figures] = accounts.values()
    went_out = sum(r["price"] for r in rows if r["status"] != "failed")
    assert figures["captured"] == went_out and figures["held"] == 0, (figures, went_out)

    # No part lost: each multi-part message that went out is at an SMSC as every one of its
    # parts under one reference (a part sent again after the drop keeps its message whole).
    records = throttling.records + dropping.records
    groups = parts_by_reference(records)
    complete: dict[str, set[int]] = defaultdict(set)
    for (destination, _), parts in groups.items():
        totals = {of for _, of in parts}
        assert len(totals) == 1, (destination, parts)  # one reference, one message
        [of] = totals
        if {n for n, _ in parts} == set(range(1, of + 1)):
            complete[destination].add(of)
    for row in rows:
        if row["status"] != "failed" and row["segments"] > 1:
            destination = row["recipient"].lstrip("+")
            assert row["segments"] in complete[destination], (row, groups)
    assert sum(1 for r in rows if r["segments"] > 1) == MESSAGES // 10
    ucs2 = {r.pdu.destination_addr for r in records if r.pdu.data_coding == DATA_CODING_UCS2}
    assert len(ucs2) >= MESSAGES // 5 * 0.95  # the Persian ones, less those refused at once
    single = {r.pdu.destination_addr for r in records if r.status == 0}
    for row in rows:
        if row["status"] != "failed":
            assert row["recipient"].lstrip("+") in single
