"""The binds of an SmppOperator: one `Session` per TCP session, reconnecting forever, and the
`Shared` state its sessions work from (the parts to send, the ids sent lately, the counters).

Each session is four or five tasks around one `Connection`: one writes (what the others put in
its outbox, joined into one send), one reads and answers the SMSC's PDUs, one fails parts
whose response is late, one checks the link with enquire_link, a transmitter's takes parts
(`Job`) whenever its window has a slot and its rate a token, and a receiver's hands receipts
on in batches. `client.py` cuts messages into jobs and reads the results.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, Literal

import msgspec
import trio

from smsgw.connectors.operators.smpp.aimd import AimdRate
from smsgw.connectors.operators.smpp.config import SmppConfig
from smsgw.connectors.operators.smpp.pdu import (
    BindReceiver,
    BindTransceiver,
    BindTransmitter,
    DataSm,
    DataSmResp,
    DeliverSm,
    DeliverSmResp,
    EnquireLink,
    EnquireLinkResp,
    FramingError,
    GenericNack,
    Pdu,
    PduError,
    PduReader,
    SubmitSmResp,
    Unbind,
    UnbindResp,
    encode,
    next_sequence_number,
)
from smsgw.connectors.operators.smpp.receipt import (
    Receipt,
    canonical_message_id,
    receipt_from_pdu,
    report_for,
)
from smsgw.connectors.operators.smpp.status import CommandStatus, classify, status_name
from smsgw.engine.messages import DeliveryReport

log = logging.getLogger("smsgw.connectors.operators.smpp")

RECENT_IDS: Final = 200_000
MAX_RECEIPTS_PER_CALL: Final = 1_000
_READ_SIZE: Final = 65_536
_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)

ReceiptSink = Callable[[str, list[DeliveryReport]], Awaitable[object]]


# --- the work: parts of messages -------------------------------------------------------------


class Round:
    """One round of a batch's parts: set `done` when the last one is answered."""

    __slots__ = ("abandoned", "done", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.done = trio.Event()
        self.abandoned = False  # send_batch was cancelled: parts not yet written are dropped
        if count == 0:
            self.done.set()


# The round of a job not queued yet: nothing waits on it.
_NOT_QUEUED: Final = Round(0)


class Job:
    """One part to submit: its encoded submit_sm (sequence number 0, replaced when sent)."""

    __slots__ = ("first", "frame", "message_id", "reason", "retry", "round", "status")

    def __init__(self, frame: bytes, first: bool) -> None:
        self.frame = frame
        self.first = first
        self.round = _NOT_QUEUED  # send_batch sets it before queueing the job
        self.status: Literal["ok", "temporary", "permanent"] | None = None
        self.message_id = ""
        self.reason: str | None = None
        self.retry = False  # safe to send again in this batch: throttled, or never written

    def finish(
        self,
        status: Literal["ok", "temporary", "permanent"],
        *,
        message_id: str = "",
        reason: str | None = None,
        retry: bool = False,
    ) -> None:
        self.status = status
        self.message_id = message_id
        self.reason = reason
        self.retry = retry
        self.round.remaining -= 1
        if self.round.remaining == 0:
            self.round.done.set()


class InFlight:
    """A request on the wire: the part it sends (None: an enquire_link) and its deadline."""

    __slots__ = ("deadline", "job")

    def __init__(self, job: Job | None, deadline: float) -> None:
        self.job = job  # None: an enquire_link
        self.deadline = deadline


class _SessionEnd(Exception):
    """The session is over: the SMSC unbound, a link check went unanswered, or the stream
    cannot be read as PDUs any more."""


class _BindRefused(Exception):
    """The SMSC answered the bind with an error status or a generic_nack."""


# What ends one session and starts a reconnect, rather than ending the operator.
_SESSION_ERRORS = (*_TRANSPORT_ERRORS, EOFError, _SessionEnd, _BindRefused, trio.TooSlowError)


def _with_sequence(frame: bytes, sequence_number: int) -> bytes:
    return frame[:12] + sequence_number.to_bytes(4, "big") + frame[16:]


# --- what one operator's binds share ---------------------------------------------------------


class Shared:
    """What the sessions of one SmppOperator work from, owned by it: the parts to send (a
    queue every bound transmitter takes from when it has room), the ids of the parts sent
    lately, the counters, where receipts go, and the reconnect backoff."""

    def __init__(
        self,
        config: SmppConfig,
        name: str,
        *,
        on_receipts: ReceiptSink | None,
        receipt_linger: float,
        reconnect_base: float,
        reconnect_cap: float,
    ) -> None:
        self.config = config
        self.name = name
        self.on_receipts = on_receipts
        self.receipt_linger = receipt_linger
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.queue: deque[Job] = deque()  # parts not yet taken by a transmitter, in order
        self.jobs_queued = trio.lowlevel.ParkingLot()  # transmitters with room, waiting for parts
        # Canonical ids of the parts sent lately -> whether each was its message's first.
        self.recent: dict[str, bool] = {}
        self._recent_order: deque[str] = deque()  # the keys of `recent`, oldest first
        self.counts: dict[str, int] = {
            "messages": 0,
            "parts": 0,
            "submit_sm": 0,
            "throttled": 0,
            "timeouts": 0,
            "late_responses": 0,
            "bad_pdus": 0,
            "receipts": 0,
            "receipts_dropped": 0,
            "mo_ignored": 0,
        }
        self._bound_event = trio.Event()

    def remember(self, message_id: str, first: bool) -> None:
        """Keep a part's canonical id (at most RECENT_IDS of them, the oldest dropped).

        The order is kept beside the dict: finding a dict's oldest key walks past every key
        deleted since it last grew, some 30 µs a part once RECENT_IDS are kept."""
        recent = self.recent
        if message_id not in recent:
            self._recent_order.append(message_id)
            if len(self._recent_order) > RECENT_IDS:
                del recent[self._recent_order.popleft()]
        recent[message_id] = first

    def put(self, jobs: Iterable[Job]) -> None:
        """Queue parts for the bound transmitters, waking those that wait for some."""
        self.queue.extend(jobs)
        if self.jobs_queued:
            self.jobs_queued.unpark_all()

    def withdraw(self, round_: Round) -> None:
        """Take a round's parts that no transmitter took yet off the queue."""
        kept = [job for job in self.queue if job.round is not round_]
        self.queue.clear()
        self.queue.extend(kept)

    def bound_changed(self) -> None:
        """A session bound or lost its bind: wake whoever waits in `wait_bound_changed`."""
        self._bound_event.set()
        self._bound_event = trio.Event()

    async def wait_bound_changed(self) -> None:
        """Until a session next binds or loses its bind."""
        await self._bound_event.wait()


# --- one bind --------------------------------------------------------------------------------


class Session:
    """One bind: connect, bind, run until the link breaks, reconnect after a backoff."""

    def __init__(self, shared: Shared, index: int, role: Literal["trx", "tx", "rx"]) -> None:
        self.shared = shared
        self.config = shared.config
        self.index = index
        self.role = role
        self.rate = AimdRate(self.config.tps, floor=min(1.0, self.config.tps))
        self.bound = False
        self.binds = 0
        self.reconnects = 0
        self._tokens = 1.0
        self._tokens_at = 0.0

    @property
    def transmits(self) -> bool:
        return self.role != "rx"

    async def run(self) -> None:
        """Forever: a session, then a backoff with full jitter (exponential, at most
        `reconnect_cap`), reset once a bind succeeds. Cancellation ends it after an unbind."""
        failures = 0
        while True:
            binds = self.binds
            try:
                await self._session()
            except* _SESSION_ERRORS as group:  # the session's tasks raise in a group
                exc = group.exceptions[0]
                log.info("%s bind %d (%s): %r", self.shared.name, self.index, self.role, exc)
            if self.binds > binds:
                failures = 0
            self.reconnects += 1
            ceiling = min(self.shared.reconnect_cap, self.shared.reconnect_base * 2**failures)
            failures = min(failures + 1, 30)
            await trio.sleep(random.uniform(0, ceiling))

    async def _session(self) -> None:
        config = self.config
        with trio.fail_after(config.timeout):
            stream = await trio.open_tcp_stream(config.host, config.port)
        conn = Connection(stream, config.window)
        try:
            await self._bind(conn)
            self.bound = True
            self.binds += 1
            self.shared.bound_changed()
            self._tokens, self._tokens_at = 1.0, trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, conn)
                nursery.start_soon(self._expire, conn)
                nursery.start_soon(self._enquire, conn)
                if self.transmits:
                    nursery.start_soon(self._submit, conn)
                if self.role != "tx":
                    nursery.start_soon(self._deliver_receipts, conn)
                await self._read(conn)  # returns when the SMSC closes or unbinds
                conn.outbox.close()  # what is queued (an unbind_resp) still goes out
                with trio.move_on_after(1.0):
                    await conn.flushed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.bound = False
            self.shared.bound_changed()
            for entry in conn.pending.values():
                if entry.job is not None:
                    entry.job.finish("temporary", reason="smpp_connection_lost")
            conn.pending.clear()
            with trio.CancelScope(shield=True):
                if conn.bound and not conn.peer_unbound:
                    with (
                        trio.move_on_after(1.0),
                        contextlib.suppress(EOFError, PduError, *_TRANSPORT_ERRORS),
                    ):
                        await self._unbind(conn)
                await trio.aclose_forcefully(stream)

    async def _bind(self, conn: Connection) -> None:
        config = self.config
        cls = {"trx": BindTransceiver, "tx": BindTransmitter, "rx": BindReceiver}[self.role]
        seq = conn.next_seq()
        await conn.stream.send_all(
            encode(
                cls(
                    sequence_number=seq,
                    system_id=config.system_id,
                    password=config.password,
                    system_type=config.system_type,
                )
            )
        )
        with trio.fail_after(config.timeout):
            while True:
                pdu = await conn.next_pdu()
                if pdu.sequence_number == seq and pdu.command_id == cls.command_id | 0x80000000:
                    break
                if isinstance(pdu, GenericNack) and pdu.sequence_number == seq:
                    break
        if pdu.command_status != 0 or isinstance(pdu, GenericNack):
            raise _BindRefused(f"bind refused: {status_name(pdu.command_status)}")
        conn.bound = True

    async def _unbind(self, conn: Connection) -> None:
        seq = conn.next_seq()
        await conn.stream.send_all(encode(Unbind(sequence_number=seq)))
        while True:
            pdu = await conn.next_pdu()
            if isinstance(pdu, UnbindResp | GenericNack) and pdu.sequence_number == seq:
                return

    async def _write(self, conn: Connection) -> None:
        """The one task that writes: what the others queued, joined into one send."""
        receive = conn.outbox_receive
        while True:
            frames = []
            try:
                frames.append(await receive.receive())
                while True:
                    frames.append(receive.receive_nowait())
            except trio.WouldBlock:
                pass
            except trio.EndOfChannel:
                if frames:
                    await conn.stream.send_all(b"".join(frames))
                conn.flushed.set()
                return
            await conn.stream.send_all(b"".join(frames))

    async def _submit(self, conn: Connection) -> None:
        """Whenever the window has slots, the rate tokens and the queue parts, take as many
        parts as all three allow and send them in one write."""
        shared = self.shared
        queue = shared.queue
        pending = conn.pending
        while True:
            if not conn.free:
                await conn.slot_freed.park()
                continue
            if not queue:
                await shared.jobs_queued.park()
                continue
            tokens = self._refill_tokens()
            if tokens < 1.0:
                await trio.sleep((1.0 - tokens) / self.rate.rate)
                continue
            deadline = trio.current_time() + self.config.timeout
            frames = []
            while queue and conn.free and tokens >= 1.0:
                job = queue.popleft()
                if job.round.abandoned:
                    job.finish("temporary", reason="smpp_abandoned")
                    continue
                tokens -= 1.0
                conn.free -= 1
                seq = conn.next_seq()
                pending[seq] = InFlight(job, deadline)
                frames.append(_with_sequence(job.frame, seq))
            self._tokens = tokens
            if frames:
                conn.outbox.send_nowait(b"".join(frames))
                shared.counts["submit_sm"] += len(frames)

    def _refill_tokens(self) -> float:
        """The token bucket at the AIMD rate, holding at most 50 ms of it (at least one)."""
        rate = self.rate.rate
        now = trio.current_time()
        self._tokens = min(max(1.0, rate / 20), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        return self._tokens

    async def _expire(self, conn: Connection) -> None:
        """Fail parts whose response is late; end the session on a late enquire_link_resp.
        Every entry has the same timeout, so `pending` (insertion-ordered) is in deadline
        order."""
        tick = min(0.25, self.config.timeout / 4)
        pending = conn.pending
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            while pending:
                seq = next(iter(pending))
                entry = pending[seq]
                if entry.deadline > now:
                    break
                del pending[seq]
                if entry.job is None:
                    raise _SessionEnd("enquire_link unanswered")
                conn.release_slot()
                self.shared.counts["timeouts"] += 1
                entry.job.finish("temporary", reason="smpp_response_timeout")

    async def _enquire(self, conn: Connection) -> None:
        while True:
            await trio.sleep(self.config.enquire_link)
            seq = conn.next_seq()
            conn.pending[seq] = InFlight(None, trio.current_time() + self.config.timeout)
            conn.outbox.send_nowait(encode(EnquireLink(sequence_number=seq)))

    async def _read(self, conn: Connection) -> None:
        """Answer every PDU the SMSC sends, those of one read in one go, until it closes the
        connection or unbinds."""
        reader = conn.reader
        while True:
            try:
                pdu = reader.next_pdu()
            except FramingError as exc:
                conn.outbox.send_nowait(
                    encode(GenericNack(sequence_number=0, command_status=exc.status))
                )
                raise _SessionEnd(f"unframeable stream: {exc}") from exc
            except PduError as exc:
                self._on_bad_pdu(conn, exc)
                continue
            if pdu is None:
                data = await conn.stream.receive_some(_READ_SIZE)
                if not data:
                    return
                reader.feed(data)
            elif self._on_pdu(conn, pdu):
                return

    def _on_bad_pdu(self, conn: Connection, exc: PduError) -> None:
        seq = exc.sequence_number or 0
        command_id = exc.command_id or 0
        self.shared.counts["bad_pdus"] += 1
        if command_id & 0x80000000:
            entry = conn.pending.pop(seq, None)
            if entry is not None and entry.job is not None:
                conn.release_slot()
                entry.job.finish("temporary", reason="smpp_bad_response")
            return
        conn.outbox.send_nowait(encode(GenericNack(sequence_number=seq, command_status=exc.status)))

    def _on_pdu(self, conn: Connection, pdu: Pdu) -> bool:
        """Handle one PDU from the SMSC; True when the session is over (it unbound us)."""
        match pdu:
            case SubmitSmResp():
                entry = conn.pending.pop(pdu.sequence_number, None)
                if entry is None or entry.job is None:
                    self.shared.counts["late_responses"] += 1
                    return False
                conn.release_slot()
                self._answer(entry.job, pdu.command_status, pdu.message_id)
            case GenericNack():
                entry = conn.pending.pop(pdu.sequence_number, None)
                if entry is not None and entry.job is not None:
                    conn.release_slot()
                    reason = f"smpp_generic_nack:{status_name(pdu.command_status)}"
                    entry.job.finish("temporary", reason=reason)
            case EnquireLinkResp():
                conn.pending.pop(pdu.sequence_number, None)
            case EnquireLink():
                conn.outbox.send_nowait(
                    encode(EnquireLinkResp(sequence_number=pdu.sequence_number))
                )
            case Unbind():
                conn.outbox.send_nowait(encode(UnbindResp(sequence_number=pdu.sequence_number)))
                conn.peer_unbound = True
                return True
            case DeliverSm() | DataSm():
                self._on_deliver(conn, pdu)
            case UnbindResp():
                pass
            case _ if not pdu.command_id & 0x80000000:  # a request an ESME does not take
                conn.outbox.send_nowait(
                    encode(
                        GenericNack(
                            sequence_number=pdu.sequence_number,
                            command_status=CommandStatus.ESME_RINVBNDSTS,
                        )
                    )
                )
        return False

    def _answer(self, job: Job, command_status: int, message_id: str) -> None:
        verdict = classify(command_status)
        now = trio.current_time()
        if verdict.kind == "ok":
            self.rate.on_success(now)
            self.shared.remember(canonical_message_id(message_id), job.first)
            job.finish("ok", message_id=message_id)
            return
        if verdict.throttle:
            self.rate.on_throttle(now)
            self.shared.counts["throttled"] += 1
        job.finish(
            verdict.kind,
            reason=f"smpp_status:{status_name(command_status)}",
            retry=verdict.throttle,
        )

    def _on_deliver(self, conn: Connection, pdu: DeliverSm | DataSm) -> None:
        receipt = receipt_from_pdu(pdu)
        resp: Pdu
        if isinstance(pdu, DeliverSm):
            resp = DeliverSmResp(sequence_number=pdu.sequence_number)
        else:
            resp = DataSmResp(sequence_number=pdu.sequence_number)
        if receipt is None:  # a message from a phone: not something this gateway takes
            self.shared.counts["mo_ignored"] += 1
            conn.outbox.send_nowait(encode(resp))
            return
        conn.receipts.append((resp, receipt))
        conn.receipts_ready.set()

    async def _deliver_receipts(self, conn: Connection) -> None:
        """Hand the session's receipts to `on_receipts` in batches; answer them after."""
        shared = self.shared
        while True:
            await conn.receipts_ready.wait()
            await trio.sleep(shared.receipt_linger)
            items = conn.receipts[:MAX_RECEIPTS_PER_CALL]
            del conn.receipts[:MAX_RECEIPTS_PER_CALL]
            conn.receipts_ready = trio.Event()
            if conn.receipts:
                conn.receipts_ready.set()
            reports = [
                report
                for _, receipt in items
                if (report := report_for(receipt, shared.recent)) is not None
            ]
            status = CommandStatus.ESME_ROK
            if reports:
                if shared.on_receipts is None:
                    shared.counts["receipts_dropped"] += len(reports)
                else:
                    try:
                        await shared.on_receipts(shared.name, reports)
                        shared.counts["receipts"] += len(reports)
                    except Exception as exc:
                        log.warning("%s: receipts not recorded: %r", shared.name, exc)
                        status = CommandStatus.ESME_RX_T_APPN
            if status:
                items = [
                    (msgspec.structs.replace(resp, command_status=status), receipt)
                    for resp, receipt in items
                ]
            if items:
                conn.outbox.send_nowait(b"".join([encode(resp) for resp, _ in items]))


class Connection:
    """One TCP session's state: the stream, what is in flight, the window, the outbox."""

    def __init__(self, stream: trio.abc.Stream, window: int) -> None:
        self.stream = stream
        self.reader = PduReader()
        self.pending: dict[int, InFlight] = {}
        self.free = window  # window slots no submit_sm holds
        self.slot_freed = trio.lowlevel.ParkingLot()  # the transmitter, waiting for a slot
        self.outbox, self.outbox_receive = trio.open_memory_channel[bytes](float("inf"))
        self.receipts: list[tuple[Pdu, Receipt]] = []
        self.receipts_ready = trio.Event()
        self.flushed = trio.Event()  # the outbox was closed and all of it written
        self.bound = False
        self.peer_unbound = False
        self._seq = 0

    def release_slot(self) -> None:
        """A submit_sm was answered (or given up on): its slot is free again."""
        self.free += 1
        if self.slot_freed:
            self.slot_freed.unpark_all()

    def next_seq(self) -> int:
        self._seq = next_sequence_number(self._seq)
        return self._seq

    async def next_pdu(self) -> Pdu:
        """The next PDU; EOFError when the SMSC closed; PduError as PduReader raises it."""
        while True:
            pdu = self.reader.next_pdu()
            if pdu is not None:
                return pdu
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                raise EOFError("the SMSC closed the connection")
            self.reader.feed(data)
