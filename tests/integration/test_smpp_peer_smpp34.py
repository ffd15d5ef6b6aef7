"""SmppOperator against a second SMSC this project did not write: the `smpp34` PyPI package
(a Rust SMPP 3.4 core), scripted in tests/smsc_peer/smpp34_smsc.py, which checks every
submit_sm it gets (data_coding, UDH, TON/NPI) as the npm peer does."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import trio

from smsgw.engine.messages import DeliveryReport
from tests.integration.test_smpp_peer import (
    GSM_161,
    PEER,
    PERSIAN_71,
    eventually,
    peer_and_client,
    sms,
)

pytest.importorskip("smpp34", reason="the smpp34 package (dev extra) is not installed")

COMMAND = (sys.executable, str(PEER / "smpp34_smsc.py"))


async def test_long_gsm_and_persian_texts_arrive_as_checked_parts() -> None:
    reports: list[DeliveryReport] = []

    async def on_receipts(name: str, got: list[DeliveryReport]) -> None:
        reports.extend(got)

    async with peer_and_client(on_receipts=on_receipts, command=COMMAND) as (peer, operator):
        with trio.fail_after(10):
            results = await operator.send_batch(
                [sms(1, GSM_161), sms(2, PERSIAN_71), sms(3, "hi", sender="+15550001111")]
            )
        assert [r.kind for r in results] == ["sent"] * 3
        await eventually(lambda: len(peer.of("deliver_sm_resp")) == 3)
    submits = peer.of("submit_sm")
    assert all(s["problems"] == [] for s in submits), submits
    by_to: dict[str, list[dict[str, Any]]] = {}
    for s in submits:
        by_to.setdefault(s["destination"][2], []).append(s)
    gsm, persian, short = (by_to[f"4915100000{n:03d}"] for n in (1, 2, 3))
    for parts, coding, text in ((gsm, 0, GSM_161), (persian, 8, PERSIAN_71)):
        assert len(parts) == 2
        assert {p["data_coding"] for p in parts} == {coding}
        assert {p["esm_class"] & 0x40 for p in parts} == {0x40}
        udhs = sorted(p["udh"][0] for p in parts)
        assert len({u[4:6] for u in udhs}) == 1  # one reference
        assert [u[6:] for u in udhs] == ["0201", "0202"]
        ordered = sorted(parts, key=lambda p: p["udh"][0])
        assert "".join(p["text"] for p in ordered) == text
    assert gsm[0]["source"] == [5, 0, "smsgw"]
    assert short[0]["source"] == [1, 1, "15550001111"] and short[0]["udh"] == []
    assert short[0]["text"] == "hi" and short[0]["data_coding"] == 0
    # The receipts came back under the ids the client returned, each acknowledged.
    assert {r.operator_message_id for r in reports} == {r.operator_message_id for r in results}
    assert all(r.status == "delivered" for r in reports)
    assert {e["status"] for e in peer.of("deliver_sm_resp")} == {0}


async def test_a_throttling_peer_slows_the_bind_and_parts_go_again() -> None:
    async with peer_and_client("--throttle-every", "4", query="window=4", command=COMMAND) as (
        peer,
        operator,
    ):
        with trio.fail_after(20):
            results = await operator.send_batch([sms(n, GSM_161) for n in range(10)])
        rate = operator.sessions[0].rate.rate
    assert [r.kind for r in results] == ["sent"] * 10
    submits = peer.of("submit_sm")
    throttled = [s for s in submits if s["status"] == 0x58]
    assert throttled and rate < 100
    accepted = [s for s in submits if s["status"] == 0]
    assert len(accepted) == 20 and len(submits) == 20 + len(throttled)
