"""SmppOperator against the simulated SMSC on 127.0.0.1: parts, outcomes, throttling,
reconnects, response timeouts, receipts, unbind."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

from smsgw.connectors.operators.smpp.client import SmppOperator
from smsgw.connectors.operators.smpp.config import parse_smpp_url
from smsgw.connectors.operators.smpp.encoding import DATA_CODING_UCS2, ESM_CLASS_UDHI
from smsgw.connectors.operators.smpp.pdu import (
    BindTransceiverResp,
    EnquireLink,
    EnquireLinkResp,
    GenericNack,
    Pdu,
    PduReader,
    Unbind,
    UnbindResp,
    encode,
)
from smsgw.connectors.operators.smpp.status import CommandStatus
from smsgw.engine.messages import DeliveryReport, OutboundSms, SendResult
from smsgw.sim.smsc import SimulatedSmsc, SmscProfile

ALL_OK = SmscProfile(p_temporary=0, p_permanent=0, latency_ms=1, receipt_delay_ms=20)
GSM_161 = "a" * 161
PERSIAN_71 = "س" * 71


def sms(n: int, text: str = "hello", sender: str = "smsgw") -> OutboundSms:
    return OutboundSms(
        id=f"m{n}",
        account_id=1,
        to=f"+4479{n:08d}",
        sender=sender,
        text=text,
        segments=1,
        price=5,
        express=False,
        created_at=0.0,
    )


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


@asynccontextmanager
async def running(
    profile: SmscProfile, query: str = "", **kwargs: object
) -> AsyncIterator[tuple[SimulatedSmsc, SmppOperator]]:
    smsc = SimulatedSmsc(profile, record=True)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(smsc.serve)
        config = parse_smpp_url(f"smpp://test:secret@127.0.0.1:{port}?{query}")
        operator = SmppOperator(config, name="op", reconnect_base=0.05, **kwargs)  # type: ignore[arg-type]
        async with trio.open_nursery() as client:
            await client.start(operator.run)
            with trio.fail_after(5):
                await operator.wait_bound(config.binds)
            yield smsc, operator
            await operator.aclose()
        nursery.cancel_scope.cancel()


async def test_long_and_persian_texts_go_as_parts_with_one_reference() -> None:
    async with running(ALL_OK, "binds=2&window=5") as (smsc, operator):
        with trio.fail_after(10):
            results = await operator.send_batch(
                [sms(1, GSM_161), sms(2, PERSIAN_71), sms(3, "short", sender="+15550001111")]
            )
    assert [r.kind for r in results] == ["sent"] * 3
    assert len({r.operator_message_id for r in results}) == 3
    by_dest: dict[str, list[object]] = {}
    for record in smsc.records:
        by_dest.setdefault(record.pdu.destination_addr, []).append(record.pdu)
    gsm, persian, short = (by_dest[f"4479{n:08d}"] for n in (1, 2, 3))
    assert len(gsm) == 2 and len(persian) == 2 and len(short) == 1
    for parts, coding in ((gsm, 0), (persian, DATA_CODING_UCS2)):
        udhs = sorted(p.short_message[:6] for p in parts)  # type: ignore[attr-defined]
        assert all(p.esm_class == ESM_CLASS_UDHI for p in parts)  # type: ignore[attr-defined]
        assert all(p.data_coding == coding for p in parts)  # type: ignore[attr-defined]
        assert udhs[0][:5] == udhs[1][:5] and udhs[0][3] == udhs[1][3]  # one reference
        assert [u[5] for u in udhs] == [1, 2] and udhs[0][4] == 2
        # A receipt is asked for on the first part only.
        assert sorted(p.registered_delivery for p in parts) == [0, 1]  # type: ignore[attr-defined]
    assert gsm[0].short_message[:6] != persian[0].short_message[:6]  # type: ignore[attr-defined]
    one = short[0]
    assert (one.esm_class, one.data_coding, one.short_message) == (0, 0, b"short")  # type: ignore[attr-defined]
    assert (one.source_addr_ton, one.source_addr_npi, one.source_addr) == (1, 1, "15550001111")  # type: ignore[attr-defined]
    assert (one.dest_addr_ton, one.dest_addr_npi) == (1, 1)  # type: ignore[attr-defined]
    alnum = gsm[0]
    assert (alnum.source_addr_ton, alnum.source_addr_npi, alnum.source_addr) == (5, 0, "smsgw")  # type: ignore[attr-defined]


async def test_sar_and_payload_methods() -> None:
    async with running(ALL_OK, "split=sar") as (smsc, operator):
        assert [r.kind for r in await operator.send_batch([sms(1, GSM_161)])] == ["sent"]
    tlvs = [r.pdu.tlvs for r in smsc.records]
    assert [t.sar_segment_seqnum for t in tlvs] == [1, 2]
    assert {t.sar_total_segments for t in tlvs} == {2} and len(
        {t.sar_msg_ref_num for t in tlvs}
    ) == 1
    async with running(ALL_OK, "split=payload") as (smsc, operator):
        assert [r.kind for r in await operator.send_batch([sms(1, GSM_161)])] == ["sent"]
    assert len(smsc.records) == 1 and smsc.records[0].pdu.tlvs.message_payload == b"a" * 161


async def test_refusals_are_permanent_or_temporary_by_status() -> None:
    async with running(SmscProfile(p_permanent=1.0, latency_ms=1)) as (_, operator):
        results = await operator.send_batch([sms(1), sms(2, GSM_161)])
    assert [r.kind for r in results] == ["permanent", "permanent"]
    assert results[0].reason == "smpp_status:ESME_RINVDSTADR"
    async with running(SmscProfile(p_temporary=1.0, p_permanent=0, latency_ms=1)) as (_, op):
        results = await op.send_batch([sms(1)])
    assert results[0].kind == "temporary" and results[0].reason == "smpp_status:ESME_RSYSERR"


async def test_a_throttling_smsc_lowers_the_bind_rate() -> None:
    profile = SmscProfile(p_temporary=0, p_permanent=0, latency_ms=1, tps=100, receipts=False)
    async with running(profile, "tps=1000&window=20") as (smsc, operator):
        with trio.fail_after(20):
            results = await operator.send_batch([sms(n) for n in range(300)])
        rate = operator.sessions[0].rate.rate
    assert smsc.counts["throttled"] > 0
    assert rate < 1000 / 2  # halved at least once
    # Throttled parts go again within the batch: most make it, the rest are temporary.
    sent = sum(r.kind == "sent" for r in results)
    assert sent >= 100
    assert all(r.kind == "sent" or r.reason == "smpp_status:ESME_RTHROTTLED" for r in results), {
        r.reason for r in results
    }
    assert smsc.counts["accepted"] == sent


async def test_reconnects_after_the_smsc_drops_the_connection() -> None:
    profile = SmscProfile(p_temporary=0, p_permanent=0, latency_ms=50, drop_after=6, receipts=False)
    async with running(profile, "window=10") as (smsc, operator):
        with trio.fail_after(10):
            first = await operator.send_batch([sms(n) for n in range(10)])
            await operator.wait_bound()
            second = await operator.send_batch([sms(n) for n in range(10, 20)])
        assert operator.stats()["reconnects"] >= 1
    assert smsc.counts["drops"] == 1
    lost = [r for r in first if r.kind != "sent"]
    assert lost and {r.reason for r in lost} <= {"smpp_connection_lost", "smpp_not_sent"}
    assert [r.kind for r in second] == ["sent"] * 10


async def test_an_unanswered_part_times_out_as_temporary() -> None:
    profile = SmscProfile(p_temporary=0, p_permanent=0, latency_ms=1e9, receipts=False)
    async with running(profile, "timeout=0.3") as (_, operator):
        with trio.fail_after(5):
            results = await operator.send_batch([sms(1), sms(2)])
    assert [(r.kind, r.reason) for r in results] == [("temporary", "smpp_response_timeout")] * 2


async def test_receipts_are_acknowledged_only_after_the_callback_returned() -> None:
    calls: list[tuple[str, list[DeliveryReport]]] = []
    release = trio.Event()
    called = trio.Event()

    async def on_receipts(name: str, reports: list[DeliveryReport]) -> None:
        calls.append((name, reports))
        called.set()
        await release.wait()

    profile = SmscProfile(p_temporary=0, p_permanent=0, latency_ms=1, receipt_delay_ms=50)
    async with running(profile, on_receipts=on_receipts) as (smsc, operator):
        with trio.fail_after(10):
            results = await operator.send_batch([sms(1), sms(2, GSM_161), sms(3, PERSIAN_71)])
            await called.wait()
            await trio.sleep(0.2)  # more time for an early answer to show
            assert smsc.counts["receipts_sent"] == 3  # one a message: first parts only
            assert smsc.counts["receipts_acked"] == 0
            release.set()
            await eventually(lambda: smsc.counts["receipts_acked"] == 3)
    ids = {r.operator_message_id for r in results}
    reported = {report.operator_message_id for _, reports in calls for report in reports}
    assert reported == ids
    assert {name for name, _ in calls} == {"op"}
    assert sum(len(reports) for _, reports in calls) == 3


async def test_a_failing_callback_leaves_receipts_unacknowledged() -> None:
    async def on_receipts(name: str, reports: list[DeliveryReport]) -> None:
        raise RuntimeError("engine overloaded")

    profile = SmscProfile(p_temporary=0, p_permanent=0, latency_ms=1, receipt_delay_ms=10)
    async with running(profile, on_receipts=on_receipts) as (smsc, operator):
        await operator.send_batch([sms(1)])
        # Answered with an error: sent again.
        await eventually(lambda: smsc.counts["receipts_sent"] >= 2)
    assert smsc.counts["receipts_acked"] == 0


async def test_tx_rx_binds_and_receipts_in_tlv_form() -> None:
    got: list[DeliveryReport] = []

    async def on_receipts(name: str, reports: list[DeliveryReport]) -> None:
        got.extend(reports)

    profile = SmscProfile(
        p_temporary=0,
        p_permanent=0,
        latency_ms=1,
        receipt_delay_ms=10,
        receipt_tlvs=True,
        delivered_ratio=0.0,
    )
    async with running(profile, "bind=tx%2Brx", on_receipts=on_receipts) as (_, operator):
        assert len(operator.sessions) == 2
        results = await operator.send_batch([sms(1)])
        await eventually(lambda: bool(got))
    assert got == [
        DeliveryReport(results[0].operator_message_id or "", "undelivered", got[0].error)
    ]
    assert got[0].error == "UNDELIVERABLE err:001"


async def test_closing_unbinds_every_session() -> None:
    async with running(ALL_OK, "binds=3") as (smsc, operator):
        await operator.send_batch([sms(1)])
    assert smsc.counts["unbinds"] == 3
    assert await operator.send_batch([sms(2)]) == [SendResult("temporary", reason="smpp_closed")]


async def test_the_simulated_smsc_runs_as_its_own_process() -> None:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "smsgw.sim.smsc",
            "--port",
            "0",
            "--p-temporary",
            "0",
            "--p-permanent",
            "0",
        ],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        with trio.fail_after(20):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(4096)
        listening = json.loads(line)
        assert listening["event"] == "listening"
        assert listening["url"].startswith("smpp://127.0.0.1:")
        host_port = listening["url"].removeprefix("smpp://")
        operator = SmppOperator(parse_smpp_url(f"smpp://a:b@{host_port}"), name="op")
        async with trio.open_nursery() as nursery:
            await nursery.start(operator.run)
            with trio.fail_after(10):
                results = await operator.send_batch([sms(1, GSM_161)])
            await operator.aclose()
        assert [r.kind for r in results] == ["sent"]
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def test_it_answers_the_smscs_enquire_link_unbind_and_undecodable_pdus() -> None:
    """A scripted SMSC: after the bind it sends an unknown command, an enquire_link and an
    unbind, and reads what the client answers."""
    answers: list[Pdu] = []
    done = trio.Event()

    async def smsc(stream: trio.SocketStream) -> None:
        reader = PduReader()

        async def next_pdu() -> Pdu:
            while (pdu := reader.next_pdu()) is None:
                reader.feed(await stream.receive_some(4096))
            return pdu

        bind = await next_pdu()
        await stream.send_all(encode(BindTransceiverResp(sequence_number=bind.sequence_number)))
        unknown = struct.pack(">IIII", 16, 0x00000777, 0, 41)
        await stream.send_all(unknown + encode(EnquireLink(sequence_number=42)))
        await stream.send_all(encode(Unbind(sequence_number=43)))
        with trio.move_on_after(5):
            while len(answers) < 3:
                answers.append(await next_pdu())
        done.set()
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, smsc, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        operator = SmppOperator(parse_smpp_url(f"smpp://a:b@127.0.0.1:{port}"), name="op")
        await nursery.start(operator.run)
        with trio.fail_after(10):
            await done.wait()
        await operator.aclose()
        nursery.cancel_scope.cancel()
    assert answers == [
        GenericNack(sequence_number=41, command_status=CommandStatus.ESME_RINVCMDID),
        EnquireLinkResp(sequence_number=42),
        UnbindResp(sequence_number=43),
    ]
