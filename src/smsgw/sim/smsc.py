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
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import Final, Literal, NamedTuple

import msgspec
import trio

from smsgw.connectors.operators.smpp.pdu import (
    HEADER_LENGTH,
    BindReceiver,
    BindReceiverResp,
    BindTransceiver,
    BindTransceiverResp,
    BindTransmitter,
    BindTransmitterResp,
    CommandId,
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
    Tag,
    Unbind,
    UnbindResp,
    decode,
    encode,
    next_sequence_number,
    submit_sm_registered_delivery,
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


_RESP_HEADER = struct.Struct(">IIII")
_SUBMIT_SM: Final = int(CommandId.SUBMIT_SM)
_DELIVER_SM_RESP: Final = int(CommandId.DELIVER_SM_RESP)
_NEVER = float("inf")


def submit_sm_resp_frame(sequence_number: int, status: int, message_id: bytes) -> bytes:
    """`encode(SubmitSmResp(...))` in one step: the message_id (Latin-1, no NUL, at most 64
    octets) when `status` is 0, else no body, as the spec has it."""
    if status:
        return _RESP_HEADER.pack(HEADER_LENGTH, CommandId.SUBMIT_SM_RESP, status, sequence_number)
    length = HEADER_LENGTH + len(message_id) + 1
    header = _RESP_HEADER.pack(length, CommandId.SUBMIT_SM_RESP, 0, sequence_number)
    return header + message_id + b"\0"


# A receipt's deliver_sm from its header to its sm_length: every field at its default but
# esm_class (a delivery receipt), as the codec writes it.
_RECEIPT_FIELDS = encode(DeliverSm(sequence_number=0, esm_class=0x04))[HEADER_LENGTH:-1]
_RECEIPT_HEAD = struct.Struct(f">IIII{len(_RECEIPT_FIELDS)}sB")
_RECEIPT_STATE_TLVS = (  # message_state: UNDELIVERABLE, DELIVERED
    struct.pack(">HHB", Tag.MESSAGE_STATE, 1, 5),
    struct.pack(">HHB", Tag.MESSAGE_STATE, 1, 2),
)


def receipt_frame(message_id: str, delivered: bool, stamp: str, *, tlvs: bool) -> bytes:
    """The deliver_sm (sequence number 0) with the receipt of `message_id` in the standard
    text form, submitted and done at `stamp` (YYMMDDhhmm); with the receipted_message_id and
    message_state TLVs too when `tlvs`. `encode(DeliverSm(...))` in fewer steps."""
    tail = _receipt_tails(stamp)[delivered]
    return _receipt_frame(message_id.encode("ascii"), delivered, tail, tlvs)


def _receipt_tails(stamp: str) -> tuple[bytes, bytes]:
    """A receipt's text after its id, undelivered and delivered, dated `stamp`."""
    dates = f" submit date:{stamp} done date:{stamp}".encode("ascii")
    return (
        b" sub:001 dlvrd:000" + dates + b" stat:UNDELIV err:001 text:",
        b" sub:001 dlvrd:001" + dates + b" stat:DELIVRD err:000 text:",
    )


def _receipt_frame(message_id: bytes, delivered: bool, tail: bytes, tlvs: bool) -> bytes:
    sm_length = 3 + len(message_id) + len(tail)  # "id:" message_id tail
    length = HEADER_LENGTH + len(_RECEIPT_FIELDS) + 1 + sm_length
    if not tlvs:
        head = _RECEIPT_HEAD.pack(length, CommandId.DELIVER_SM, 0, 0, _RECEIPT_FIELDS, sm_length)
        return b"".join((head, b"id:", message_id, tail))
    length += 4 + len(message_id) + 1 + 5
    head = _RECEIPT_HEAD.pack(length, CommandId.DELIVER_SM, 0, 0, _RECEIPT_FIELDS, sm_length)
    receipted_message_id = struct.pack(">HH", Tag.RECEIPTED_MESSAGE_ID, len(message_id) + 1)
    return b"".join(
        (
            head,
            b"id:",
            message_id,
            tail,
            receipted_message_id,
            message_id,
            b"\0",
            _RECEIPT_STATE_TLVS[delivered],
        )
    )


class _Bind:
    """One connection: its bind, what is queued for it, the receipts it was sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock  # non-blocking
        self.system_id = ""
        self.role: Literal["", "tx", "rx", "trx"] = ""
        self.pending: list[bytes] = []  # frames queued since the last flush, in order
        self.unsent = bytearray()  # what the socket did not take yet: the writer's to send
        self.blocked = trio.Event()  # set when `unsent` grew from empty or the outbox closed
        self.outbox_closed = False
        self.broken = False  # a send failed: nothing more is sent
        self.unanswered = 0
        self.tokens = 0.0
        self.tokens_at = 0.0
        self.receipts_out: dict[int, _Receipt] = {}  # seq -> the receipt sent with it
        self.seq = 0
        self.closed = False

    @property
    def receives(self) -> bool:
        return self.role in ("rx", "trx")


class _Receipt(NamedTuple):
    system_id: str
    frame: bytes  # with sequence number 0
    message_id: bytes


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
        self._turn = itertools.count()
        # Responses owed, (due, order, bind, frame); receipts sent the first time, all
        # `receipt_delay_ms` after their submit_sm and so in order of due time already; and
        # receipts sent again, (due, order, receipt). One timer task releases all three.
        self._later: list[tuple[float, int, _Bind, bytes]] = []
        self._receipts: deque[tuple[float, _Receipt]] = deque()
        self._receipts_again: list[tuple[float, int, _Receipt]] = []
        self._timer = trio.CancelScope()
        self._dirty: list[_Bind] = []  # binds with frames queued since the last flush
        self._wake_at = _NEVER
        self._stamp_minute = -1
        self._receipt_tails: tuple[bytes, bytes] = (b"", b"")  # (undelivered, delivered)
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
        address = ipaddress.ip_address(host)
        if not address.is_loopback:
            raise ValueError(f"the simulated SMSC listens on loopback only, not {host}")
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(128)
            listener.setblocking(False)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._release)
                    task_status.started(listener.getsockname()[1])
                    while True:
                        await trio.lowlevel.wait_readable(listener)
                        try:
                            conn, _ = listener.accept()
                        except (BlockingIOError, ConnectionAbortedError):
                            continue
                        conn.setblocking(False)
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        nursery.start_soon(self._handle, conn)
            finally:
                trio.lowlevel.notify_closing(listener)

    def drop_all(self) -> None:
        """Close every connection now, without an unbind (a network failure)."""
        for bind in list(self.binds):
            self._drop(bind)

    def _drop(self, bind: _Bind) -> None:
        bind.closed = True
        self.counts["drops"] += 1
        bind.outbox_closed = True
        bind.blocked.set()
        # The socket is closed by the handler; shutting it down unblocks its reader.
        with contextlib.suppress(OSError):
            bind.sock.shutdown(socket.SHUT_RDWR)

    async def _handle(self, sock: socket.socket) -> None:
        bind = _Bind(sock)
        self.binds.append(bind)
        written = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, bind, written)
                with contextlib.suppress(OSError):
                    await self._read(bind)
                bind.outbox_closed = True
                self._flush(bind)  # what is queued (an unbind_resp) still goes out
                bind.blocked.set()
                with trio.move_on_after(1.0):
                    await written.wait()
                nursery.cancel_scope.cancel()
        finally:
            bind.closed = True
            self.binds.remove(bind)
            for receipt in bind.receipts_out.values():  # unanswered: send again
                self._schedule_again(0.2, receipt)
            trio.lowlevel.notify_closing(sock)
            sock.close()

    @staticmethod
    async def _write(bind: _Bind, written: trio.Event) -> None:
        """Send what the socket did not take at once, as it becomes writable, until the
        outbox is closed and nothing is left (or a send failed)."""
        sock, unsent = bind.sock, bind.unsent
        while True:
            if not unsent or bind.broken:
                if bind.outbox_closed or bind.broken:
                    break
                await bind.blocked.wait()
                bind.blocked = trio.Event()
                continue
            await trio.lowlevel.wait_writable(sock)
            try:
                del unsent[: sock.send(unsent)]
            except BlockingIOError:
                pass
            except OSError:
                bind.broken = True
        written.set()

    def _send(self, bind: _Bind, pdu: Pdu) -> None:
        self._put(bind, encode(pdu))

    def _put(self, bind: _Bind, frame: bytes) -> None:
        """Queue a frame, unless the connection is going away (its reader ended: the outbox
        is closed before the bind is marked closed). It is sent at the next flush."""
        if not (bind.closed or bind.outbox_closed):
            if not bind.pending:
                self._dirty.append(bind)
            bind.pending.append(frame)

    def _flush_all(self) -> None:
        for bind in self._dirty:
            self._flush(bind)
        self._dirty.clear()

    @staticmethod
    def _flush(bind: _Bind) -> None:
        """Send what is queued, in one send: at once if the socket takes it, else through the
        connection's writer. A failed send marks the bind broken; its reader sees the rest."""
        if not bind.pending:
            return
        data = b"".join(bind.pending)
        bind.pending.clear()
        if bind.broken:
            return
        if bind.unsent:
            bind.unsent += data
            return
        try:
            sent = bind.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            bind.broken = True
            return
        if sent < len(data):
            bind.unsent += data[sent:]
            bind.blocked.set()

    def _wake_by(self, due: float) -> None:
        if due < self._wake_at:
            self._wake_at = due
            self._timer.deadline = due

    async def _release(self) -> None:
        """Send each response and receipt when due: one wake-up for all that are due by then,
        whatever their connection."""
        later, receipts, again = self._later, self._receipts, self._receipts_again
        while True:
            now = trio.current_time()
            while later and later[0][0] <= now:
                _, _, bind, frame = heapq.heappop(later)
                bind.unanswered -= 1
                self._put(bind, frame)
            if (receipts and receipts[0][0] <= now) or (again and again[0][0] <= now):
                self._send_receipts(now)
            self._flush_all()
            due = min(
                later[0][0] if later else _NEVER,
                receipts[0][0] if receipts else _NEVER,
                again[0][0] if again else _NEVER,
            )
            self._wake_at = due
            with trio.CancelScope(deadline=due) as self._timer:
                await trio.sleep_forever()

    async def _read(self, bind: _Bind) -> None:
        """Answer each PDU as it comes. A submit_sm (unless recorded) is read for its
        registered_delivery only and a deliver_sm_resp for its status only, when `decode`
        would read them without error; every other frame is decoded."""
        reader = PduReader()
        profile = self.profile
        sock = bind.sock
        while not bind.closed:
            self._flush_all()  # the answers to the last read
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(65_536)
            except BlockingIOError:
                continue
            if not data:
                return
            reader.feed(data)
            now = trio.current_time()
            while not bind.closed:
                try:
                    got = reader.next_frame()
                except FramingError as exc:
                    self._send(bind, GenericNack(sequence_number=0, command_status=exc.status))
                    return
                if got is None:
                    break
                frame, command_id, status, seq = got
                registered_delivery = None
                if command_id == _SUBMIT_SM and not self.record:
                    registered_delivery = submit_sm_registered_delivery(frame)
                if registered_delivery is not None:
                    self._on_submit(bind, seq, registered_delivery, None, now)
                elif command_id == _DELIVER_SM_RESP and frame[HEADER_LENGTH:] in (b"", b"\0"):
                    self._on_receipt_answer(bind, seq, status)
                else:
                    try:
                        pdu = decode(frame)
                    except PduError as exc:
                        nack = GenericNack(
                            sequence_number=exc.sequence_number or 0, command_status=exc.status
                        )
                        self._send(bind, nack)
                        continue
                    if self._on_pdu(bind, pdu):
                        self._received += 1
                        return
                self._received += 1
                if (
                    profile.drop_after
                    and not self._dropped
                    and self._received >= profile.drop_after
                ):
                    self._dropped = True
                    self._drop(bind)
                    return

    def _on_pdu(self, bind: _Bind, pdu: Pdu) -> bool:
        """True when the connection is to close (after an unbind)."""
        seq = pdu.sequence_number
        match pdu:
            case DeliverSmResp():
                self._on_receipt_answer(bind, seq, pdu.command_status)
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
            case SubmitSm():
                now = trio.current_time()
                self._on_submit(bind, seq, pdu.registered_delivery, pdu, now)
            case EnquireLink():
                self._send(bind, EnquireLinkResp(sequence_number=seq))
            case Unbind():
                self.counts["unbinds"] += 1
                self._send(bind, UnbindResp(sequence_number=seq))
                bind.closed = True
                return True
            case EnquireLinkResp() | UnbindResp() | GenericNack():
                pass
            case _:
                self._send(bind, GenericNack(sequence_number=seq, command_status=_S.ESME_RINVCMDID))
        return False

    def _on_receipt_answer(self, bind: _Bind, seq: int, status: int) -> None:
        sent = bind.receipts_out.pop(seq, None)
        if sent is not None:
            if status == 0:
                self.counts["receipts_acked"] += 1
                self.acked_receipts.append(sent.message_id.decode("ascii"))
            else:
                self._schedule_again(1.0, sent)

    def _on_submit(
        self, bind: _Bind, seq: int, registered_delivery: int, pdu: SubmitSm | None, now: float
    ) -> None:
        """Answer a submit_sm (`pdu`, decoded when it is to be recorded)."""
        profile = self.profile
        counts = self.counts
        counts["submit_sm"] += 1
        message_id = b""
        if bind.role not in ("tx", "trx"):
            status = int(_S.ESME_RINVBNDSTS)
        elif bind.unanswered >= profile.window:
            status = _S.ESME_RMSGQFUL
            counts["queue_full"] += 1
        elif profile.tps and not self._take_token(bind, now):
            status = _S.ESME_RTHROTTLED
            counts["throttled"] += 1
        else:
            draw = self._random.random()
            if draw < profile.p_permanent:
                status = _S.ESME_RINVDSTADR
                counts["permanent"] += 1
            elif draw < profile.p_permanent + profile.p_temporary:
                status = _S.ESME_RSYSERR
                counts["temporary"] += 1
            else:
                status = _S.ESME_ROK
                message_id = b"%x" % next(self._ids)
                counts["accepted"] += 1
                if profile.receipts and registered_delivery & 0x03:
                    receipt = self._receipt(bind.system_id, message_id)
                    due = now + profile.receipt_delay_ms / 1000
                    self._receipts.append((due, receipt))
                    if due < self._wake_at:
                        self._wake_by(due)
        if pdu is not None and self.record:
            record = SubmitRecord(bind.system_id, pdu, int(status), message_id.decode("ascii"))
            self.records.append(record)
        frame = submit_sm_resp_frame(seq, status, message_id)
        delay = self._random.expovariate(1 / profile.latency_ms) / 1000 if profile.latency_ms else 0
        bind.unanswered += 1
        due = now + delay
        heapq.heappush(self._later, (due, next(self._order), bind, frame))
        if due < self._wake_at:
            self._wake_by(due)

    def _take_token(self, bind: _Bind, now: float) -> bool:
        rate = self.profile.tps
        bind.tokens = min(max(1.0, rate / 10), bind.tokens + (now - bind.tokens_at) * rate)
        bind.tokens_at = now
        if bind.tokens < 1.0:
            return False
        bind.tokens -= 1.0
        return True

    def _receipt(self, system_id: str, message_id: bytes) -> _Receipt:
        """The receipt of `message_id`, delivered or not by `delivered_ratio`, dated now."""
        delivered = self._random.random() < self.profile.delivered_ratio
        minute = int(time.time() // 60)
        if minute != self._stamp_minute:  # strftime once a minute, not once a receipt
            self._receipt_tails = _receipt_tails(datetime.now().strftime("%y%m%d%H%M"))
            self._stamp_minute = minute
        tail = self._receipt_tails[delivered]
        frame = _receipt_frame(message_id, delivered, tail, self.profile.receipt_tlvs)
        return _Receipt(system_id, frame, message_id)

    def _schedule_again(self, delay: float, receipt: _Receipt) -> None:
        due = trio.current_time() + delay
        heapq.heappush(self._receipts_again, (due, next(self._order), receipt))
        self._wake_by(due)

    def _send_receipts(self, now: float) -> None:
        """Send each due receipt on a receiving bind of its system_id (round robin)."""
        receipts, again = self._receipts, self._receipts_again
        due: list[_Receipt] = []
        while receipts and receipts[0][0] <= now:
            due.append(receipts.popleft()[1])
        while again and again[0][0] <= now:
            due.append(heapq.heappop(again)[2])
        targets_of: dict[str, list[_Bind]] = {}
        for receipt in due:
            system_id = receipt.system_id
            targets = targets_of.get(system_id)
            if targets is None:
                targets = targets_of[system_id] = [
                    b
                    for b in self.binds
                    if b.receives and b.system_id == system_id and not b.closed
                ]
            if not targets:
                self._schedule_again(1.0, receipt)
                continue
            bind = targets[next(self._turn) % len(targets)]
            bind.seq = seq = next_sequence_number(bind.seq)
            bind.receipts_out[seq] = receipt
            frame = receipt.frame
            self._put(bind, frame[:12] + seq.to_bytes(4, "big") + frame[16:])
            self.counts["receipts_sent"] += 1


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
