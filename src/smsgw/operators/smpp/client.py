"""SmppOperator: a `Provider` that sends over SMPP 3.4 binds on trio streams and takes receipts.

One operator is `binds` TCP sessions (or, with `bind=tx+rx`, that many transmitters and as many
receivers). Each session has its own window of outstanding submit_sm and its own send rate in
PDUs per second (a token bucket whose rate is an `AimdRate`, halved when the SMSC throttles and
never above `tps`). `send_batch` cuts every message into the parts `encoding.split` gives
(exactly the segments the gateway priced) and puts them on one rendezvous channel that every
bound transmitter takes from when it has a window slot: parts go to whichever bind has room,
pipelined up to the windows, and a broken bind simply stops taking.

Results, one per message:
  sent       every part accepted. Its operator_message_id is the FIRST part's message_id
             (canonical form, `receipt.canonical_message_id`): receipts are asked for on the
             first part only, and the first part's receipt decides delivered / undelivered.
             Another part's receipt (an SMSC that sends them anyway) is acknowledged and not
             forwarded while its id is still remembered (the last RECENT_IDS parts).
  permanent  a part was refused for good (status.classify); the message is refunded though
             the operator may have taken (and will bill) its other parts: the gateway bears
             those.
  temporary  otherwise: a part refused for now, unanswered within `timeout` (the outcome is
             unknown: the SMSC may have taken it), or on a session that broke before its
             response. A throttled part, or one never written, is sent again inside the same
             batch (up to THROTTLE_ROUNDS rounds) so the parts already accepted are not sent
             twice; after that the engine retries the whole message.

Receipts (deliver_sm / data_sm with a receipt esm_class or receipted_message_id) are parsed
with `receipt.receipt_from_pdu`, collected per session for `receipt_linger` seconds, and
handed to `on_receipts(operator_name, reports)` (the node wires it to
`Engine.record_deliveries`). Each deliver_sm_resp is written only after that await returned,
so a receipt is acknowledged once durable; when the callback raises, they are answered
ESME_RX_T_APPN and the SMSC delivers them again later.
"""

from __future__ import annotations

import contextlib
import logging
import random
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec
import trio

from smsgw.engine.messages import DeliveryReport, OutboundSms, SendResult
from smsgw.operators.smpp.address import destination_address, source_address
from smsgw.operators.smpp.aimd import AimdRate
from smsgw.operators.smpp.encoding import Method, Part, split
from smsgw.operators.smpp.pdu import (
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
    SubmitSm,
    SubmitSmResp,
    Unbind,
    UnbindResp,
    encode,
    next_sequence_number,
)
from smsgw.operators.smpp.receipt import (
    Receipt,
    canonical_message_id,
    receipt_from_pdu,
    receipt_id_candidates,
)
from smsgw.operators.smpp.status import CommandStatus, classify, status_name

log = logging.getLogger("smsgw.operators.smpp")

DEFAULT_PORT: Final = 2775
THROTTLE_ROUNDS: Final = 3
RECENT_IDS: Final = 200_000
MAX_RECEIPTS_PER_CALL: Final = 1_000
_READ_SIZE: Final = 65_536
_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)

ReceiptSink = Callable[[str, list[DeliveryReport]], Awaitable[object]]


# --- configuration ---------------------------------------------------------------------------


class SmppConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One SMPP operator, as its URL gives it (see `parse_smpp_url`)."""

    host: str
    port: int = DEFAULT_PORT
    system_id: str
    password: str = ""
    system_type: str = ""
    binds: int = 1
    window: int = 10
    tps: float = 100.0  # per bind: an operator's capacity is tps x binds
    bind: Literal["trx", "tx+rx"] = "trx"
    enquire_link: float = 30.0
    gsm7: Literal["packed", "unpacked"] = "unpacked"
    split: Method = "udh"
    timeout: float = 10.0  # seconds for any response (bind, submit_sm, enquire_link)


_INT_LIMITS = {"binds": (1, 64), "window": (1, 10_000)}
_FLOAT_LIMITS = {"tps": (0.1, 1e6), "enquire_link": (1.0, 3600.0), "timeout": (0.05, 600.0)}
_CHOICES: dict[str, tuple[str, ...]] = {
    "bind": ("trx", "tx+rx"),
    "gsm7": ("packed", "unpacked"),
    "split": ("udh", "sar", "payload"),
}


def parse_smpp_url(url: str) -> SmppConfig:
    """`smpp://SYSTEM_ID:PASSWORD@HOST[:PORT]?binds=2&window=10&tps=500&system_type=&
    bind=trx|tx+rx&enquire_link=30&gsm7=packed|unpacked&split=udh|sar|payload&timeout=10`.

    User and password are percent-decoded. Every parameter is optional, at most once;
    an unknown one, a value out of range or a field too long for its PDU field (system_id
    15, password 8, system_type 12 characters) is a ValueError that says which.
    """
    parts = urlsplit(url)
    if parts.scheme != "smpp":
        raise ValueError(f"an SMPP operator URL starts with smpp://, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"{url!r}: an SMPP URL has no path or fragment")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 0 to 65535") from None
    fields: dict[str, Any] = {
        "host": parts.hostname,
        "port": port,
        "system_id": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
    }
    if not fields["system_id"]:
        raise ValueError(f"{url!r}: no system_id (smpp://SYSTEM_ID:PASSWORD@HOST:PORT)")
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in seen:
            raise ValueError(f"{url!r}: {key} given twice")
        seen.add(key)
        if key in _INT_LIMITS:
            low, high = _INT_LIMITS[key]
            if not (value.isdigit() and low <= int(value) <= high):
                raise ValueError(f"{key}={value!r}: want a whole number from {low} to {high}")
            fields[key] = int(value)
        elif key in _FLOAT_LIMITS:
            low_f, high_f = _FLOAT_LIMITS[key]
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not low_f <= number <= high_f:
                raise ValueError(f"{key}={value!r}: want a number from {low_f:g} to {high_f:g}")
            fields[key] = number
        elif key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError(f"{key}={value!r}: want one of {', '.join(_CHOICES[key])}")
            fields[key] = value
        elif key == "system_type":
            fields[key] = value
        else:
            raise ValueError(f"{url!r}: unknown parameter {key!r}")
    for name, most in (("system_id", 15), ("password", 8), ("system_type", 12)):
        value = fields.get(name, "")
        if len(value) > most or not value.isascii():
            raise ValueError(f"{name} {value!r}: at most {most} ASCII characters")
    return SmppConfig(**fields)


def operator_name(config: SmppConfig) -> str:
    """The name an SMPP operator gets when its URL names none: `smpp:SYSTEM_ID@HOST:PORT`."""
    return f"smpp:{config.system_id}@{config.host}:{config.port}"


def report_for(receipt: Receipt, recent: dict[str, bool]) -> DeliveryReport | None:
    """The DeliveryReport a receipt makes, or None when it is only acknowledged: not final
    (ENROUTE, ACCEPTD, a stat not known), or the receipt of a part other than a message's
    first. `recent` maps the canonical ids of parts sent lately to whether each was a first
    part; it also picks, among the forms an id may take (hex or decimal), the one sent."""
    if receipt.state is None:
        return None
    candidates = receipt_id_candidates(receipt.message_id)
    chosen = candidates[0]
    for candidate in candidates:
        first = recent.get(candidate)
        if first is not None:
            if not first:
                return None
            chosen = candidate
            break
    if receipt.state == "delivered":
        return DeliveryReport(chosen, "delivered")
    error = receipt.stat or receipt.state.upper()
    if receipt.error:
        error += f" err:{receipt.error}"
    if receipt.network_error is not None:
        error += f" network:{receipt.network_error.network_type}/{receipt.network_error.error_code}"
    return DeliveryReport(chosen, "undelivered", error)


# --- the work: parts of messages -------------------------------------------------------------


class _Round:
    """One round of a batch's parts: set `done` when the last one is answered."""

    __slots__ = ("abandoned", "done", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.done = trio.Event()
        self.abandoned = False  # send_batch was cancelled: parts not yet written are dropped
        if count == 0:
            self.done.set()


class _Job:
    """One part to submit: its encoded submit_sm (sequence number 0, patched when sent)."""

    __slots__ = ("first", "frame", "message_id", "reason", "retry", "round", "status")

    def __init__(self, frame: bytes, first: bool) -> None:
        self.frame = frame
        self.first = first
        self.round: _Round = _Round(0)
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


class _InFlight:
    __slots__ = ("deadline", "job")

    def __init__(self, job: _Job | None, deadline: float) -> None:
        self.job = job  # None: an enquire_link
        self.deadline = deadline


class _SessionEnd(Exception):
    """The session is over: the SMSC unbound, a link check went unanswered, or the stream
    cannot be read as PDUs any more."""


class _BindRefused(Exception):
    pass


# What ends one session and starts a reconnect, rather than ending the operator.
_SESSION_ERRORS = (*_TRANSPORT_ERRORS, EOFError, _SessionEnd, _BindRefused, trio.TooSlowError)


def _with_sequence(frame: bytes, sequence_number: int) -> bytes:
    out = bytearray(frame)
    struct.pack_into(">I", out, 12, sequence_number)
    return bytes(out)


# --- one bind --------------------------------------------------------------------------------


class _Session:
    """One bind: connect, bind, run until the link breaks, reconnect after a backoff."""

    def __init__(self, operator: SmppOperator, index: int, role: Literal["trx", "tx", "rx"]):
        self.op = operator
        self.config = operator.config
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
                log.info("%s bind %d (%s): %r", self.op.name, self.index, self.role, exc)
            if self.binds > binds:
                failures = 0
            self.reconnects += 1
            ceiling = min(self.op.reconnect_cap, self.op.reconnect_base * 2**failures)
            failures = min(failures + 1, 30)
            await trio.sleep(random.uniform(0, ceiling))

    async def _session(self) -> None:
        config = self.config
        with trio.fail_after(config.timeout):
            stream = await trio.open_tcp_stream(config.host, config.port)
        conn = _Connection(stream, config.window)
        try:
            await self._bind(conn)
            self.bound = True
            self.binds += 1
            self.op._bound_changed()
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
            self.op._bound_changed()
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

    async def _bind(self, conn: _Connection) -> None:
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

    async def _unbind(self, conn: _Connection) -> None:
        seq = conn.next_seq()
        await conn.stream.send_all(encode(Unbind(sequence_number=seq)))
        while True:
            pdu = await conn.next_pdu()
            if isinstance(pdu, UnbindResp | GenericNack) and pdu.sequence_number == seq:
                return

    async def _write(self, conn: _Connection) -> None:
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

    async def _submit(self, conn: _Connection) -> None:
        """Take a part whenever the window has a slot and the rate a token; send it."""
        jobs = self.op._jobs_receive
        while True:
            await conn.window.acquire()
            job = await jobs.receive()
            try:
                if job.round.abandoned:
                    conn.window.release()
                    job.finish("temporary", reason="smpp_abandoned")
                    continue
                await self._take_token()
            except BaseException:
                job.finish("temporary", reason="smpp_not_sent", retry=True)
                raise
            seq = conn.next_seq()
            conn.pending[seq] = _InFlight(job, trio.current_time() + self.config.timeout)
            conn.outbox.send_nowait(_with_sequence(job.frame, seq))
            self.op.counts["submit_sm"] += 1

    async def _take_token(self) -> None:
        """A token bucket at the AIMD rate, holding at most 50 ms of it (at least one)."""
        rate = self.rate.rate
        burst = max(1.0, rate / 20)
        now = trio.current_time()
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            await trio.sleep((1.0 - self._tokens) / rate)
            now = trio.current_time()
            self._tokens += (now - self._tokens_at) * rate
            self._tokens_at = now
        self._tokens -= 1.0

    async def _expire(self, conn: _Connection) -> None:
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
                conn.window.release()
                self.op.counts["timeouts"] += 1
                entry.job.finish("temporary", reason="smpp_response_timeout")

    async def _enquire(self, conn: _Connection) -> None:
        while True:
            await trio.sleep(self.config.enquire_link)
            seq = conn.next_seq()
            conn.pending[seq] = _InFlight(None, trio.current_time() + self.config.timeout)
            conn.outbox.send_nowait(encode(EnquireLink(sequence_number=seq)))

    async def _read(self, conn: _Connection) -> None:
        while True:
            try:
                pdu = await conn.next_pdu()
            except FramingError as exc:
                conn.outbox.send_nowait(
                    encode(GenericNack(sequence_number=0, command_status=exc.status))
                )
                raise _SessionEnd(f"unframeable stream: {exc}") from exc
            except PduError as exc:
                self._on_bad_pdu(conn, exc)
                continue
            except EOFError:
                return
            if self._on_pdu(conn, pdu):
                return

    def _on_bad_pdu(self, conn: _Connection, exc: PduError) -> None:
        seq = exc.sequence_number or 0
        command_id = exc.command_id or 0
        self.op.counts["bad_pdus"] += 1
        if command_id & 0x80000000:
            entry = conn.pending.pop(seq, None)
            if entry is not None and entry.job is not None:
                conn.window.release()
                entry.job.finish("temporary", reason="smpp_bad_response")
            return
        conn.outbox.send_nowait(encode(GenericNack(sequence_number=seq, command_status=exc.status)))

    def _on_pdu(self, conn: _Connection, pdu: Pdu) -> bool:
        """Handle one PDU from the SMSC; True when the session is over (it unbound us)."""
        match pdu:
            case SubmitSmResp():
                entry = conn.pending.pop(pdu.sequence_number, None)
                if entry is None or entry.job is None:
                    self.op.counts["late_responses"] += 1
                    return False
                conn.window.release()
                self._answer(entry.job, pdu.command_status, pdu.message_id)
            case GenericNack():
                entry = conn.pending.pop(pdu.sequence_number, None)
                if entry is not None and entry.job is not None:
                    conn.window.release()
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

    def _answer(self, job: _Job, command_status: int, message_id: str) -> None:
        verdict = classify(command_status)
        now = trio.current_time()
        if verdict.kind == "ok":
            self.rate.on_success(now)
            self.op._remember(canonical_message_id(message_id), job.first)
            job.finish("ok", message_id=message_id)
            return
        if verdict.throttle:
            self.rate.on_throttle(now)
            self.op.counts["throttled"] += 1
        job.finish(
            verdict.kind,
            reason=f"smpp_status:{status_name(command_status)}",
            retry=verdict.throttle,
        )

    def _on_deliver(self, conn: _Connection, pdu: DeliverSm | DataSm) -> None:
        receipt = receipt_from_pdu(pdu)
        resp: Pdu
        if isinstance(pdu, DeliverSm):
            resp = DeliverSmResp(sequence_number=pdu.sequence_number)
        else:
            resp = DataSmResp(sequence_number=pdu.sequence_number)
        if receipt is None:  # a message from a phone: not something this gateway takes
            self.op.counts["mo_ignored"] += 1
            conn.outbox.send_nowait(encode(resp))
            return
        conn.receipts.append((resp, receipt))
        conn.receipts_ready.set()

    async def _deliver_receipts(self, conn: _Connection) -> None:
        """Hand the session's receipts to `on_receipts` in batches; answer them after."""
        op = self.op
        while True:
            await conn.receipts_ready.wait()
            await trio.sleep(op.receipt_linger)
            items = conn.receipts[:MAX_RECEIPTS_PER_CALL]
            del conn.receipts[:MAX_RECEIPTS_PER_CALL]
            conn.receipts_ready = trio.Event()
            if conn.receipts:
                conn.receipts_ready.set()
            reports = [
                report
                for _, receipt in items
                if (report := report_for(receipt, op._recent)) is not None
            ]
            status = CommandStatus.ESME_ROK
            if reports:
                if op.on_receipts is None:
                    op.counts["receipts_dropped"] += len(reports)
                else:
                    try:
                        await op.on_receipts(op.name, reports)
                        op.counts["receipts"] += len(reports)
                    except Exception as exc:
                        log.warning("%s: receipts not recorded: %r", op.name, exc)
                        status = CommandStatus.ESME_RX_T_APPN
            for resp, _ in items:
                if status:
                    resp = msgspec.structs.replace(resp, command_status=status)
                conn.outbox.send_nowait(encode(resp))


class _Connection:
    """One TCP session's state: the stream, what is in flight, the window, the outbox."""

    def __init__(self, stream: trio.abc.Stream, window: int) -> None:
        self.stream = stream
        self.reader = PduReader()
        self.pending: dict[int, _InFlight] = {}
        self.window = trio.Semaphore(window)
        self.outbox, self.outbox_receive = trio.open_memory_channel[bytes](float("inf"))
        self.receipts: list[tuple[Pdu, Receipt]] = []
        self.receipts_ready = trio.Event()
        self.flushed = trio.Event()  # the outbox was closed and all of it written
        self.bound = False
        self.peer_unbound = False
        self._seq = 0

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


# --- the operator ----------------------------------------------------------------------------


class SmppOperator:
    """An operator reached over SMPP 3.4 (see the module's docstring for what a result means).

    Run it with `run` in a nursery (or `async with open_smpp_operator(...)`): it binds
    in the background and keeps reconnecting; `send_batch` works while at least one
    transmitter is bound, waits up to `bind_wait` seconds for one otherwise, then answers
    every message temporary `smpp_not_bound`. Cancelling `run` (or leaving the context)
    unbinds every session, waiting at most a second for each unbind_resp.

    `send_batch` honours cancellation: the parts not yet written are not sent; the parts on
    the wire are answered or time out on their own, and their results are dropped.
    """

    def __init__(
        self,
        config: SmppConfig,
        *,
        name: str | None = None,
        on_receipts: ReceiptSink | None = None,
        receipt_linger: float = 0.005,
        reconnect_base: float = 0.2,
        reconnect_cap: float = 30.0,
        bind_wait: float = 2.0,
    ) -> None:
        self.config = config
        self._name = name if name is not None else operator_name(config)
        self.on_receipts = on_receipts
        self.receipt_linger = receipt_linger
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.bind_wait = bind_wait
        roles: tuple[Literal["trx", "tx", "rx"], ...] = (
            ("trx",) if config.bind == "trx" else ("tx", "rx")
        )
        self.sessions = [
            _Session(self, index, role) for index in range(config.binds) for role in roles
        ]
        self._jobs_send, self._jobs_receive = trio.open_memory_channel[_Job](0)
        self._bound_event = trio.Event()
        self._recent: dict[str, bool] = {}
        self._ref = random.randrange(0x10000)
        self._closed = False
        self._cancel: trio.CancelScope | None = None
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

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SmppOperator:
        return cls(parse_smpp_url(url), **kwargs)

    @property
    def name(self) -> str:
        return self._name

    def bound(self) -> int:
        """Transmitting sessions bound now."""
        return sum(1 for s in self.sessions if s.bound and s.transmits)

    @property
    def in_flight_limit(self) -> int:
        """Messages the pool may have out at this operator at once: the submit_sm its binds'
        windows hold (a long message's parts count one each, so this is an upper bound)."""
        return self.config.binds * self.config.window

    def capacity(self) -> float:
        """PDUs per second the bound transmitters may send now (their AIMD rates summed)."""
        return sum(s.rate.rate for s in self.sessions if s.bound and s.transmits)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "bound": self.bound(),
            "rates": [round(s.rate.rate, 1) for s in self.sessions if s.transmits],
            "reconnects": sum(s.reconnects for s in self.sessions),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every session bound until cancelled (or `aclose`); started at once, binding
        in the background."""
        with trio.CancelScope() as scope:
            self._cancel = scope
            async with trio.open_nursery() as nursery:
                for session in self.sessions:
                    nursery.start_soon(session.run)
                task_status.started()

    async def aclose(self) -> None:
        """Stop: no new batches; `run` unbinds its sessions and returns."""
        self._closed = True
        if self._cancel is not None:
            self._cancel.cancel()

    async def wait_bound(self, count: int = 1) -> None:
        """Until at least `count` transmitting sessions are bound."""
        while self.bound() < count:
            await self._bound_event.wait()

    def _bound_changed(self) -> None:
        self._bound_event.set()
        self._bound_event = trio.Event()

    def _remember(self, message_id: str, first: bool) -> None:
        recent = self._recent
        recent[message_id] = first
        if len(recent) > RECENT_IDS:
            del recent[next(iter(recent))]

    def _next_ref(self) -> int:
        self._ref = (self._ref + 1) & 0xFFFF
        return self._ref

    def _parts(self, sms: OutboundSms) -> list[Part]:
        method = self.config.split
        ref = self._next_ref()
        return split(
            sms.text,
            method,
            ref & 0xFF if method == "udh" else ref,
            packed=self.config.gsm7 == "packed",
        )

    def _jobs_for(self, sms: OutboundSms) -> list[_Job]:
        """The submit_sm of each part (ValueError when the message cannot be encoded)."""
        source = source_address(sms.sender)
        dest = destination_address(sms.to)
        jobs = []
        for number, part in enumerate(self._parts(sms)):
            pdu = SubmitSm(
                sequence_number=0,
                source_addr_ton=source.ton,
                source_addr_npi=source.npi,
                source_addr=source.addr,
                dest_addr_ton=dest.ton,
                dest_addr_npi=dest.npi,
                destination_addr=dest.addr,
                esm_class=part.esm_class,
                registered_delivery=1 if number == 0 else 0,
                data_coding=part.data_coding,
                short_message=part.short_message,
                tlvs=part.tlvs,
            )
            jobs.append(_Job(encode(pdu), first=number == 0))
        return jobs

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        if self._closed:
            return [SendResult("temporary", reason="smpp_closed")] * len(batch)
        if not self.bound():
            with trio.move_on_after(self.bind_wait):
                await self.wait_bound()
            if not self.bound():
                return [SendResult("temporary", reason="smpp_not_bound")] * len(batch)
        per_message: list[list[_Job] | SendResult] = []
        for sms in batch:
            try:
                per_message.append(self._jobs_for(sms))
            except ValueError as exc:
                per_message.append(SendResult("permanent", reason=f"smpp_cannot_encode: {exc}"))
        todo = [job for jobs in per_message if isinstance(jobs, list) for job in jobs]
        self.counts["messages"] += len(batch)
        self.counts["parts"] += len(todo)
        for _ in range(THROTTLE_ROUNDS):
            round_ = _Round(len(todo))
            for job in todo:
                job.round = round_
            try:
                for job in todo:
                    await self._jobs_send.send(job)
                await round_.done.wait()
            finally:
                round_.abandoned = True
            todo = [job for job in todo if job.status == "temporary" and job.retry]
            if not todo:
                break
        return [
            jobs if isinstance(jobs, SendResult) else self._result(jobs) for jobs in per_message
        ]

    @staticmethod
    def _result(jobs: list[_Job]) -> SendResult:
        if all(job.status == "ok" for job in jobs):
            return SendResult("sent", canonical_message_id(jobs[0].message_id))
        refused = [job for job in jobs if job.status == "permanent"]
        if refused:
            return SendResult("permanent", reason=refused[0].reason)
        failed = next(job for job in jobs if job.status != "ok")
        return SendResult("temporary", reason=failed.reason)
