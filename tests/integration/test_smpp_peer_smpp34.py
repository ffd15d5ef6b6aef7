"""SmppOperator against a second SMSC this project did not write: the `smpp34` PyPI package
(a Rust SMPP 3.4 core), scripted in tests/smsc_peer/smpp34_smsc.py, which checks every
submit_sm it gets (data_coding, UDH, TON/NPI) as the npm peer does."""

from __future__ import annotations

import sys

import pytest
import trio

from smsgw.engine.messages import DeliveryReport
from tests.integration.test_smpp_peer import (
    GSM_161,
    PEER,
    PERSIAN_71,
    check_parts_and_receipts,
    check_throttled,
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
    check_parts_and_receipts(peer, results, reports)


async def test_a_throttling_peer_slows_the_bind_and_parts_go_again() -> None:
    async with peer_and_client("--throttle-every", "4", query="window=4", command=COMMAND) as (
        peer,
        operator,
    ):
        with trio.fail_after(20):
            results = await operator.send_batch([sms(n, GSM_161) for n in range(10)])
        rate = operator.sessions[0].rate.rate
    assert [r.kind for r in results] == ["sent"] * 10
    check_throttled(peer.of("submit_sm"), rate)
