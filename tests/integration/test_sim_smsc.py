"""The simulated SMSC on 127.0.0.1 with a client that stops reading: what the socket does not
take at once is sent later, in order, and nothing is lost."""

from __future__ import annotations

import trio

from smsgw.connectors.operators.smpp.pdu import (
    BindTransceiver,
    BindTransceiverResp,
    DeliverSm,
    PduReader,
    SubmitSm,
    SubmitSmResp,
    encode,
)
from smsgw.sim.smsc import SimulatedSmsc, SmscProfile

SUBMITS = 40_000


async def test_a_client_that_stops_reading_gets_every_answer_in_order() -> None:
    profile = SmscProfile(
        window=SUBMITS, p_temporary=0, p_permanent=0, latency_ms=0, receipt_delay_ms=0
    )
    smsc = SimulatedSmsc(profile)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(smsc.serve)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(encode(BindTransceiver(sequence_number=1, system_id="t")))
        submits = b"".join(
            encode(SubmitSm(sequence_number=n, destination_addr="447900", registered_delivery=1))
            for n in range(2, SUBMITS + 2)
        )
        await stream.send_all(submits)
        # Not read for a while: the answers (megabytes) outgrow the socket's buffers.
        with trio.fail_after(10):
            while True:
                if smsc.counts["receipts_sent"] == SUBMITS:
                    break
                await trio.sleep(0.05)
        reader = PduReader()
        responses: list[int] = []
        receipts = 0
        with trio.fail_after(10):
            while len(responses) < SUBMITS or receipts < SUBMITS:
                reader.feed(await stream.receive_some(65_536))
                for pdu in reader:
                    if isinstance(pdu, SubmitSmResp):
                        assert pdu.command_status == 0
                        responses.append(pdu.sequence_number)
                    elif isinstance(pdu, DeliverSm):
                        receipts += 1
                    else:
                        assert isinstance(pdu, BindTransceiverResp)
        assert responses == list(range(2, SUBMITS + 2))
        assert smsc.counts["accepted"] == SUBMITS
        await stream.aclose()
        nursery.cancel_scope.cancel()
