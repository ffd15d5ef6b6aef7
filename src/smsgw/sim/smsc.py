"""SimulatedSmsc: an SMSC speaking SMPP 3.4 on loopback, for tests, benchmarks and the simulator.

    python -m smsgw.sim.smsc --port 0 [--window 100 --tps 0 --latency-ms 2 --p-temporary 0.03
        --p-permanent 0.02 --receipt-delay-ms 200 --delivered-ratio 0.95 --receipt-tlvs
        --no-receipts --drop-after N --seed 0]

Binds with any system_id and password (transmitter, receiver or transceiver). Each submit_sm
is answered after `latency_ms` (exponentially spread around it): ESME_RMSGQFUL when the bind
already has `window` submit_sm unanswered, ESME_RTHROTTLED over `tps` per bind (0: no cap),
else the outcome mix: `p_temporary` ESME_RSYSERR, `p_permanent` ESME_RINVDSTADR, the rest
accepted with a new message_id. An accepted submit_sm that asks for a receipt
(registered_delivery) gets one after `receipt_delay_ms` as a deliver_sm in the standard text
form (with the receipted_message_id and message_state TLVs too under `--receipt-tlvs`), on a
receiving bind of the same system_id, sent again a second later until answered with status 0.
`--drop-after N` closes the connection that brings the total of PDUs received to N, once.
Prints one line {"event": "listening", "url": "smpp://127.0.0.1:PORT"} when ready; stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import ipaddress
import itertools
import random
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import Literal

import msgspec
import trio

from smsgw.connectors.operators.smpp.pdu import (
    BindReceiver,
    BindReceiverResp,
    BindTransceiver,
    BindTransceiverResp,
    BindTransmitter,
    BindTransmitterResp,
    DeliverSm,
    DeliverSmResp,
    EnquireLink,
    EnquireLinkResp,
    FramingError,
    GenericNack,
    Pdu,
    PduError,
    PduReader,
    SubmitSm,
    SubmitSmResp,
    Tlvs,
    Unbind,
    UnbindResp,
    encode,
    next_sequence_number,
)
from smsgw.connectors.operators.smpp.status import CommandStatus

_S = CommandStatus


class SmscProfile(msgspec.Struct, frozen=True, kw_only=True):
    window: int = 100
    tps: float = 0.0  # per bind; 0: no cap
    latency_ms: float = 2.0
    p_temporary: float = 0.03
    p_permanent: float = 0.02
    receipts: bool = True
    receipt_delay_ms: float = 200.0
    delivered_ratio: float = 0.95
    receipt_tlvs: bool = False
    drop_after: int = 0  # 0: never
    seed: int = 0


class SubmitRecord(msgspec.Struct, frozen=True):
    """A submit_sm as received, and what it was answered."""

    system_id: str
    pdu: SubmitSm
    status: int
    message_id: str


class _Bind:
    """One connection: its bind, the responses it owes, the receipts it was sent."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.system_id = ""
        self.role: Literal["", "tx", "rx", "trx"] = ""
        self.outbox, self.outbox_receive = trio.open_memory_channel[bytes](float("inf"))
        self.later: list[tuple[float, int, bytes]] = []  # (due, order, frame): responses
        self.wake = trio.Event()
        self.unanswered = 0
        self.tokens = 0.0
        self.tokens_at = 0.0
        self.receipts_out: dict[int, tuple[str, bytes]] = {}  # seq -> (system_id, body)
        self.seq = 0
        self.closed = False

    @property
    def receives(self) -> bool:
        return self.role in ("rx", "trx")


class SimulatedSmsc:
    def __init__(self, profile: SmscProfile | None = None, *, record: bool = False) -> None:
        profile = profile if profile is not None else SmscProfile()
        self.profile = profile
        self.record = record
        self.records: list[SubmitRecord] = []
        self.binds: list[_Bind] = []
        self.acked_receipts: list[str] = []  # message ids whose deliver_sm_resp said ok
        self._random = random.Random(profile.seed)
        self._ids = itertools.count(profile.seed * 1_000_000 + 1)
        self._order = itertools.count()
        self._receipts: list[tuple[float, int, str, bytes]] = []  # (due, order, system, pdu)
        self._receipts_wake = trio.Event()
        self._received = 0
        self._dropped = False
        self.counts: dict[str, int] = {
            "binds": 0,
            "submit_sm": 0,
            "accepted": 0,
            "temporary": 0,
            "permanent": 0,
            "throttled": 0,
            "queue_full": 0,
            "receipts_sent": 0,
            "receipts_acked": 0,
            "drops": 0,
            "unbinds": 0,
        }

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on loopback until cancelled; started with the port."""
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the simulated SMSC listens on loopback only, not {host}")
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._handle, port, host=host))
            nursery.start_soon(self._send_receipts)
            task_status.started(listeners[0].socket.getsockname()[1])

    def drop_all(self) -> None:
        """Close every connection now, without an unbind (a network failure)."""
        for bind in list(self.binds):
            self._drop(bind)

    def _drop(self, bind: _Bind) -> None:
        bind.closed = True
        self.counts["drops"] += 1
        bind.wake.set()
        bind.outbox.close()
        # The stream is closed by the handler; shutting the socket down unblocks its reader.
        sock = getattr(bind.stream, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)

    async def _handle(self, stream: trio.SocketStream) -> None:
        bind = _Bind(stream)
        self.binds.append(bind)
        written = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, bind, written)
                nursery.start_soon(self._respond_later, bind)
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await self._read(bind)
                bind.outbox.close()  # what is queued (an unbind_resp) still goes out
                with trio.move_on_after(1.0):
                    await written.wait()
                nursery.cancel_scope.cancel()
        finally:
            bind.closed = True
            self.binds.remove(bind)
            for system_id, body in bind.receipts_out.values():  # unanswered: send again
                self._schedule_receipt(0.2, system_id, body)
            await trio.aclose_forcefully(stream)

    async def _write(self, bind: _Bind, written: trio.Event) -> None:
        try:
            while True:
                frames = [await bind.outbox_receive.receive()]
                while True:
                    try:
                        frames.append(bind.outbox_receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await bind.stream.send_all(b"".join(frames))
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            written.set()

    def _send(self, bind: _Bind, pdu: Pdu) -> None:
        self._put(bind, encode(pdu))

    @staticmethod
    def _put(bind: _Bind, frame: bytes) -> None:
        """Queue a frame for the writer, unless the connection is going away (its reader
        ended: the outbox is closed before the bind is marked closed)."""
        if not bind.closed:
            with contextlib.suppress(trio.ClosedResourceError):
                bind.outbox.send_nowait(frame)

    async def _respond_later(self, bind: _Bind) -> None:
        while not bind.closed:
            if not bind.later:
                await bind.wake.wait()
                bind.wake = trio.Event()
                continue
            due = bind.later[0][0]
            with trio.move_on_at(due):
                await bind.wake.wait()
                bind.wake = trio.Event()
                continue
            now = trio.current_time()
            while bind.later and bind.later[0][0] <= now:
                _, _, frame = heapq.heappop(bind.later)
                bind.unanswered -= 1
                self._put(bind, frame)

    async def _read(self, bind: _Bind) -> None:
        reader = PduReader()
        while not bind.closed:
            data = await bind.stream.receive_some(65_536)
            if not data:
                return
            reader.feed(data)
            while not bind.closed:
                try:
                    pdu = reader.next_pdu()
                except FramingError as exc:
                    self._send(bind, GenericNack(sequence_number=0, command_status=exc.status))
                    return
                except PduError as exc:
                    seq = exc.sequence_number or 0
                    self._send(bind, GenericNack(sequence_number=seq, command_status=exc.status))
                    continue
                if pdu is None:
                    break
                self._received += 1
                if self._on_pdu(bind, pdu):
                    return
                if (
                    self.profile.drop_after
                    and not self._dropped
                    and self._received >= self.profile.drop_after
                ):
                    self._dropped = True
                    self._drop(bind)
                    return

    def _on_pdu(self, bind: _Bind, pdu: Pdu) -> bool:
        """True when the connection is to close (after an unbind)."""
        seq = pdu.sequence_number
        match pdu:
            case BindTransmitter() | BindReceiver() | BindTransceiver():
                resp_cls, role = {
                    BindTransmitter: (BindTransmitterResp, "tx"),
                    BindReceiver: (BindReceiverResp, "rx"),
                    BindTransceiver: (BindTransceiverResp, "trx"),
                }[type(pdu)]
                if bind.role:
                    self._send(bind, resp_cls(sequence_number=seq, command_status=_S.ESME_RALYBND))
                    return False
                bind.role, bind.system_id = role, pdu.system_id  # type: ignore[assignment]
                bind.tokens_at = trio.current_time()
                self.counts["binds"] += 1
                self._send(bind, resp_cls(sequence_number=seq, system_id="simsmsc"))
                if bind.receives:
                    self._receipts_wake.set()
            case SubmitSm():
                self._on_submit(bind, pdu)
            case EnquireLink():
                self._send(bind, EnquireLinkResp(sequence_number=seq))
            case Unbind():
                self.counts["unbinds"] += 1
                self._send(bind, UnbindResp(sequence_number=seq))
                bind.closed = True
                return True
            case DeliverSmResp():
                sent = bind.receipts_out.pop(seq, None)
                if sent is not None:
                    system_id, body = sent
                    if pdu.command_status == 0:
                        self.counts["receipts_acked"] += 1
                        self.acked_receipts.append(_receipt_id(body))
                    else:
                        self._schedule_receipt(1.0, system_id, body)
            case EnquireLinkResp() | UnbindResp() | GenericNack():
                pass
            case _:
                self._send(bind, GenericNack(sequence_number=seq, command_status=_S.ESME_RINVCMDID))
        return False

    def _on_submit(self, bind: _Bind, pdu: SubmitSm) -> None:
        profile = self.profile
        self.counts["submit_sm"] += 1
        now = trio.current_time()
        message_id = ""
        if bind.role not in ("tx", "trx"):
            status = int(_S.ESME_RINVBNDSTS)
        elif bind.unanswered >= profile.window:
            status = _S.ESME_RMSGQFUL
            self.counts["queue_full"] += 1
        elif profile.tps and not self._take_token(bind, now):
            status = _S.ESME_RTHROTTLED
            self.counts["throttled"] += 1
        else:
            draw = self._random.random()
            if draw < profile.p_permanent:
                status = _S.ESME_RINVDSTADR
                self.counts["permanent"] += 1
            elif draw < profile.p_permanent + profile.p_temporary:
                status = _S.ESME_RSYSERR
                self.counts["temporary"] += 1
            else:
                status = _S.ESME_ROK
                message_id = f"{next(self._ids):x}"
                self.counts["accepted"] += 1
                if profile.receipts and pdu.registered_delivery & 0x03:
                    self._schedule_receipt(
                        profile.receipt_delay_ms / 1000, bind.system_id, self._receipt(message_id)
                    )
        if self.record:
            self.records.append(SubmitRecord(bind.system_id, pdu, int(status), message_id))
        resp = SubmitSmResp(
            sequence_number=pdu.sequence_number, command_status=status, message_id=message_id
        )
        delay = self._random.expovariate(1 / profile.latency_ms) / 1000 if profile.latency_ms else 0
        bind.unanswered += 1
        heapq.heappush(bind.later, (now + delay, next(self._order), encode(resp)))
        bind.wake.set()

    def _take_token(self, bind: _Bind, now: float) -> bool:
        rate = self.profile.tps
        bind.tokens = min(max(1.0, rate / 10), bind.tokens + (now - bind.tokens_at) * rate)
        bind.tokens_at = now
        if bind.tokens < 1.0:
            return False
        bind.tokens -= 1.0
        return True

    def _receipt(self, message_id: str) -> bytes:
        """A deliver_sm (sequence number 0) with the receipt of `message_id`."""
        delivered = self._random.random() < self.profile.delivered_ratio
        stamp = datetime.now().strftime("%y%m%d%H%M")
        stat, err = ("DELIVRD", "000") if delivered else ("UNDELIV", "001")
        text = (
            f"id:{message_id} sub:001 dlvrd:{'001' if delivered else '000'} "
            f"submit date:{stamp} done date:{stamp} stat:{stat} err:{err} text:"
        )
        tlvs = Tlvs()
        if self.profile.receipt_tlvs:
            tlvs = Tlvs(receipted_message_id=message_id, message_state=2 if delivered else 5)
        return encode(
            DeliverSm(
                sequence_number=0,
                esm_class=0x04,
                short_message=text.encode("ascii"),
                tlvs=tlvs,
            )
        )

    def _schedule_receipt(self, delay: float, system_id: str, body: bytes) -> None:
        due = trio.current_time() + delay
        heapq.heappush(self._receipts, (due, next(self._order), system_id, body))
        self._receipts_wake.set()

    async def _send_receipts(self) -> None:
        """Send each due receipt on a receiving bind of its system_id (round robin)."""
        turn = itertools.count()
        while True:
            if not self._receipts:
                await self._receipts_wake.wait()
                self._receipts_wake = trio.Event()
                continue
            with trio.move_on_at(self._receipts[0][0]):
                await self._receipts_wake.wait()
                self._receipts_wake = trio.Event()
                continue
            now = trio.current_time()
            while self._receipts and self._receipts[0][0] <= now:
                _, _, system_id, body = heapq.heappop(self._receipts)
                targets = [
                    b
                    for b in self.binds
                    if b.receives and b.system_id == system_id and not b.closed
                ]
                if not targets:
                    self._schedule_receipt(1.0, system_id, body)
                    continue
                bind = targets[next(turn) % len(targets)]
                bind.seq = next_sequence_number(bind.seq)
                bind.receipts_out[bind.seq] = (system_id, body)
                frame = bytearray(body)
                frame[12:16] = bind.seq.to_bytes(4, "big")
                self._put(bind, bytes(frame))
                self.counts["receipts_sent"] += 1


def _receipt_id(body: bytes) -> str:
    text = body.split(b"id:", 1)[1]
    return text.split(b" ", 1)[0].decode("ascii")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smsgw.sim.smsc", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2775)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--tps", type=float, default=0.0)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument("--p-temporary", type=float, default=0.03)
    parser.add_argument("--p-permanent", type=float, default=0.02)
    parser.add_argument("--no-receipts", action="store_true")
    parser.add_argument("--receipt-delay-ms", type=float, default=200.0)
    parser.add_argument("--delivered-ratio", type=float, default=0.95)
    parser.add_argument("--receipt-tlvs", action="store_true")
    parser.add_argument("--drop-after", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            parser.error(f"--host {args.host}: loopback addresses only")
    except ValueError:
        parser.error(f"--host {args.host}: an IP address")
    profile = SmscProfile(
        window=args.window,
        tps=args.tps,
        latency_ms=args.latency_ms,
        p_temporary=args.p_temporary,
        p_permanent=args.p_permanent,
        receipts=not args.no_receipts,
        receipt_delay_ms=args.receipt_delay_ms,
        delivered_ratio=args.delivered_ratio,
        receipt_tlvs=args.receipt_tlvs,
        drop_after=args.drop_after,
        seed=args.seed,
    )
    trio.run(_serve_until_signal, SimulatedSmsc(profile), args.host, args.port)
    return 0


async def _serve_until_signal(smsc: SimulatedSmsc, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(smsc.serve, host, port))
            url = f"smpp://{host}:{bound}"
            print(msgspec.json.encode({"event": "listening", "url": url}).decode(), flush=True)
            async for _ in signals:
                print(msgspec.json.encode({"event": "stopped", **smsc.counts}).decode())
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    sys.exit(main())
