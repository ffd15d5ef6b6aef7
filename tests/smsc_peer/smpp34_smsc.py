"""An SMSC made with the `smpp34` PyPI package (a Rust SMPP 3.4 core this project did not
write: its framing, sequence windows and PDU codec), the second independent peer of
tests/integration/test_smpp_peer.py. It listens on 127.0.0.1 (port 0 unless given), prints
{"event": "listening", "port": P}, then one JSON line on stdout per submit_sm and receipt.
Every submit_sm is checked (data_coding, UDH, TON/NPI, UCS-2) as tests/smsc_peer/smsc.js
checks it, and its record says what was wrong in `problems`.

    python smpp34_smsc.py [--port P] [--throttle-every N] [--receipt-ms MS]

--throttle-every N  answer every Nth submit_sm ESME_RTHROTTLED
--receipt-ms MS     send a text-form receipt MS after an accepted submit_sm that asked for one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
from typing import Any

import smpp34

ESM_CLASS_RECEIPT = 0x04
ESM_CLASS_UDHI = 0x40


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def check(event: smpp34.SubmitSmEvent) -> tuple[list[str], str | None, list[str]]:
    """(UDH as hex, the text, problems) of a submit_sm."""
    problems: list[str] = []
    coding = event.data_coding
    if coding not in (0, 8):
        problems.append(f"data_coding {coding}")
    body = event.short_message
    udh: list[str] = []
    if event.esm_class & ESM_CLASS_UDHI:
        length = body[0] if body else 0
        header = body[1 : 1 + length]
        udh = [header.hex()]
        if not re.fullmatch(r"0003[0-9a-f]{6}", udh[0]):
            problems.append(f"udh {udh}")
        body = body[1 + length :]
    text: str | None = None
    if coding == 8:
        try:
            text = body.decode("utf-16-be")
        except UnicodeDecodeError:
            problems.append("ucs2")
    elif coding == 0:
        text = body.decode("latin-1")  # GSM 7-bit, unpacked: the basic letters are ASCII
    if (event.dest_addr_ton, event.dest_addr_npi) != (1, 1):
        problems.append("destination TON/NPI")
    if not re.fullmatch(r"[1-9][0-9]{6,14}", event.destination_addr):
        problems.append("destination digits")
    ton, npi, source = event.source_addr_ton, event.source_addr_npi, event.source_addr
    alpha = (ton, npi) == (5, 0) and re.search(r"[^0-9]", source) is not None
    international = (ton, npi) == (1, 1) and source.isdigit()
    short = (ton, npi) == (3, 0) and re.fullmatch(r"[0-9]{1,8}", source) is not None
    if not (alpha or international or short):
        problems.append(f"source TON/NPI {[ton, npi]}")
    return udh, text, problems


async def receipt(esme: smpp34.Esme, message_id: str, delay: float) -> None:
    await asyncio.sleep(delay)
    stamp = "2412011200"
    text = (
        f"id:{message_id} sub:001 dlvrd:001 submit date:{stamp} done date:{stamp}"
        " stat:DELIVRD err:000 text:"
    )
    resp = await esme.deliver_sm(
        "smsgw", text.encode("ascii"), source_addr="4915100000000", esm_class=ESM_CLASS_RECEIPT
    )
    emit({"event": "deliver_sm_resp", "message_id": message_id, "status": resp.command_status})


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--throttle-every", type=int, default=0)
    parser.add_argument("--receipt-ms", type=float, default=50.0)
    args = parser.parse_args()
    port = args.port
    if not port:  # the library takes a port, not 0: find a free one on loopback
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    server = smpp34.Server("127.0.0.1", port, system_id="smpp34")
    await server.start()
    emit({"event": "listening", "port": port})
    sessions: dict[str, smpp34.Esme] = {}
    tasks: set[asyncio.Task[None]] = set()
    submits = 0
    next_id = 1
    while True:
        event = await server.next()
        if isinstance(event, smpp34.Esme):
            sessions[event.session_id] = event
            emit({"event": "bind", "system_id": event.system_id, "receives": event.can_receive})
        elif isinstance(event, smpp34.Unbound):
            sessions.pop(event.session_id, None)
            emit({"event": "unbind"})
        elif isinstance(event, smpp34.SubmitSmEvent):
            submits += 1
            udh, text, problems = check(event)
            record = {
                "event": "submit_sm",
                "n": submits,
                "data_coding": event.data_coding,
                "esm_class": event.esm_class,
                "source": [event.source_addr_ton, event.source_addr_npi, event.source_addr],
                "destination": [event.dest_addr_ton, event.dest_addr_npi, event.destination_addr],
                "registered_delivery": event.registered_delivery,
                "udh": udh,
                "text": text,
                "problems": problems,
            }
            if args.throttle_every and submits % args.throttle_every == 0:
                event.reject(smpp34.ESME_RTHROTTLED)
                emit({**record, "status": smpp34.ESME_RTHROTTLED, "message_id": ""})
                continue
            if problems:
                event.reject(0x0C4)  # ESME_RINVOPTPARAMVAL: refused, visibly
                emit({**record, "status": 0x0C4, "message_id": ""})
                continue
            message_id = f"{next_id:x}"
            next_id += 1
            event.accept(message_id)
            emit({**record, "status": 0, "message_id": message_id})
            esme = sessions.get(event.session_id)
            if esme is not None and event.registered_delivery & 1:
                task = asyncio.create_task(receipt(esme, message_id, args.receipt_ms / 1000))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    asyncio.run(main())
