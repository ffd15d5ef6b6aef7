"""SmppOperator against an SMSC this project did not write: the npm `smpp` package, scripted
in tests/smsc_peer/smsc.js, which checks every submit_sm it gets (data_coding, UDH, TON/NPI)
and reports each as a JSON line."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from smsgw.connectors.operators.smpp.client import SmppOperator
from smsgw.connectors.operators.smpp.config import parse_smpp_url
from smsgw.engine.messages import DeliveryReport, OutboundSms, SendResult

PEER = Path(__file__).resolve().parent.parent / "smsc_peer"
GSM_161 = "".join(chr(ord("a") + i % 26) for i in range(161))
PERSIAN_71 = "".join("سلام دنیا"[i % 9] for i in range(71))

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="Node.js (node and npm) is not installed: the npm smpp peer cannot run",
)


def sms(n: int, text: str, sender: str = "smsgw") -> OutboundSms:
    return OutboundSms(
        id=f"m{n}",
        account_id=1,
        to=f"+4915100000{n:03d}",
        sender=sender,
        text=text,
        segments=1,
        price=5,
        express=False,
        created_at=0.0,
    )


@pytest.fixture(scope="module")
def peer_installed() -> None:
    """`npm ci` from the lock file when node_modules is missing (a fresh clone)."""
    if not (PEER / "node_modules" / "smpp").is_dir():
        subprocess.run(
            ["npm", "ci", "--prefix", str(PEER), "--no-audit", "--no-fund"],
            check=True,
            timeout=300,
            capture_output=True,
        )


class Peer:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.port = 0

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


async def eventually(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


@asynccontextmanager
async def peer_and_client(
    *peer_args: str,
    query: str = "",
    on_receipts: Any = None,
    command: Sequence[str] = ("node", str(PEER / "smsc.js")),
) -> AsyncIterator[tuple[Peer, SmppOperator]]:
    """A peer SMSC process (`command`, the npm one unless given) and a client bound to it."""
    peer = Peer()
    process = await trio.lowlevel.open_process([*command, *peer_args], stdout=subprocess.PIPE)
    assert process.stdout is not None
    stdout = process.stdout
    started = trio.Event()

    async def read() -> None:
        buffer = b""
        async for chunk in stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                event = json.loads(line)
                peer.events.append(event)
                if event["event"] == "listening":
                    peer.port = event["port"]
                    started.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with trio.fail_after(20):
                await started.wait()
            url = f"smpp://smsgw:secret@127.0.0.1:{peer.port}?{query}"
            operator = SmppOperator(
                parse_smpp_url(url), name="peer", on_receipts=on_receipts, reconnect_base=0.05
            )
            async with trio.open_nursery() as client:
                await client.start(operator.run)
                with trio.fail_after(10):
                    await operator.wait_bound()
                yield peer, operator
                await operator.aclose()
            nursery.cancel_scope.cancel()
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()


def check_parts_and_receipts(
    peer: Peer, results: list[SendResult], reports: list[DeliveryReport]
) -> None:
    """What a peer saw of a 161-character GSM text, a 71-character Persian one and a short one
    from a number, sent as `results`, and the receipts it sent back (`reports`): every
    submit_sm passed its checks, the long texts went as two parts under one reference, the
    sources had the right TON/NPI, and each receipt came back under its message's id."""
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
        # IEI 00, length 03, then reference, total, number: one reference, 2 parts, 1 and 2.
        assert len({u[4:6] for u in udhs}) == 1
        assert [u[6:] for u in udhs] == ["0201", "0202"]
        ordered = sorted(parts, key=lambda p: p["udh"][0])
        assert "".join(p["text"] for p in ordered) == text
    assert gsm[0]["source"] == [5, 0, "smsgw"]
    assert short[0]["source"] == [1, 1, "15550001111"] and short[0]["udh"] == []
    assert short[0]["text"] == "hi" and short[0]["data_coding"] == 0
    # Receipts (text form, and text with TLVs) came back under the ids the client returned.
    assert {r.operator_message_id for r in reports} == {r.operator_message_id for r in results}
    assert all(r.status == "delivered" for r in reports)
    assert {e["status"] for e in peer.of("deliver_sm_resp")} == {0}


@pytest.mark.usefixtures("peer_installed")
async def test_long_gsm_and_persian_texts_arrive_as_checked_parts() -> None:
    reports: list[DeliveryReport] = []

    async def on_receipts(name: str, got: list[DeliveryReport]) -> None:
        reports.extend(got)

    async with peer_and_client(on_receipts=on_receipts) as (peer, operator):
        with trio.fail_after(10):
            results = await operator.send_batch(
                [sms(1, GSM_161), sms(2, PERSIAN_71), sms(3, "hi", sender="+15550001111")]
            )
        assert [r.kind for r in results] == ["sent"] * 3
        await eventually(lambda: len(peer.of("deliver_sm_resp")) == 3)
    check_parts_and_receipts(peer, results, reports)
    assert {e["tlvs"] for e in peer.of("deliver_sm_resp")} == {True, False}
    assert len(peer.of("unbind")) == 1


@pytest.mark.usefixtures("peer_installed")
async def test_a_slow_throttling_peer_slows_the_bind_and_parts_go_again() -> None:
    async with peer_and_client("--throttle-every", "4", "--slow-ms", "20", query="window=4") as (
        peer,
        operator,
    ):
        with trio.fail_after(20):
            results = await operator.send_batch([sms(n, GSM_161) for n in range(10)])
        rate = operator.sessions[0].rate.rate
    assert [r.kind for r in results] == ["sent"] * 10
    check_throttled(peer.of("submit_sm"), rate)


def check_throttled(submits: list[dict[str, Any]], rate: float) -> None:
    """Ten 2-part messages through a peer that throttles: the bind slowed down, and only the
    throttled parts went again (20 parts accepted, each once)."""
    throttled = [s for s in submits if s["status"] == 0x58]
    assert throttled and rate < 100
    accepted = [s for s in submits if s["status"] == 0]
    assert len(accepted) == 20 and len(submits) == 20 + len(throttled)


@pytest.mark.usefixtures("peer_installed")
async def test_reconnects_after_the_peer_drops_mid_window() -> None:
    async with peer_and_client("--drop-after", "3", "--slow-ms", "50", query="window=10") as (
        peer,
        operator,
    ):
        with trio.fail_after(20):
            first = await operator.send_batch([sms(n, "hello") for n in range(8)])
            await operator.wait_bound()
            second = await operator.send_batch([sms(n, "again") for n in range(8, 12)])
    lost = [r for r in first if r.kind != "sent"]
    assert lost and {r.reason for r in lost} <= {"smpp_connection_lost", "smpp_not_sent"}
    assert [r.kind for r in second] == ["sent"] * 4
    assert len(peer.of("bind_transceiver")) >= 2
