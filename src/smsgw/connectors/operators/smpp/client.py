"""SmppOperator: a `Provider` that sends over SMPP 3.4 binds on trio streams and takes receipts.

One operator is `binds` TCP sessions (or, with `bind=tx+rx`, that many transmitters and as many
receivers). Each session has its own window of outstanding submit_sm and its own send rate in
PDUs per second (a token bucket whose rate is an `AimdRate`, halved when the SMSC throttles and
never above `tps`). `send_batch` cuts every message into the parts `encoding.split` gives
(exactly the segments the gateway priced) and puts them on one queue that every bound
transmitter takes from when it has window slots: parts go to whichever bind has room,
pipelined up to the windows, and a broken bind simply stops taking.

Results, one per message:
  sent       every part accepted. Its operator_message_id is the FIRST part's message_id
             (canonical form, `receipt.canonical_message_id`): receipts are asked for on the
             first part only, and the first part's receipt decides delivered / undelivered.
             Another part's receipt (an SMSC that sends them anyway) is acknowledged and not
             forwarded while its id is still remembered (the last `session.RECENT_IDS` parts).
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

This module cuts messages into parts and reads their results; the sessions are in
`session.py`, the URL and settings in `config.py`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Final, Literal

import trio

from smsgw.connectors.operators.smpp.address import destination_address, source_address
from smsgw.connectors.operators.smpp.config import SmppConfig, operator_name
from smsgw.connectors.operators.smpp.encoding import Part, split
from smsgw.connectors.operators.smpp.pdu import address_field, submit_sm_frame
from smsgw.connectors.operators.smpp.receipt import canonical_message_id
from smsgw.connectors.operators.smpp.session import Job, ReceiptSink, Round, Session, Shared
from smsgw.engine.messages import OutboundSms, SendResult

THROTTLE_ROUNDS: Final = 3
_SOURCES_KEPT: Final = 1_000  # senders whose source address is kept encoded


class SmppOperator:
    """An operator reached over SMPP 3.4 (see the module's docstring for what a result means).

    Run it with `run` in a nursery: it binds in the background and keeps reconnecting;
    `send_batch` works while at least one transmitter is bound, waits up to `bind_wait`
    seconds for one otherwise, then answers every message temporary `smpp_not_bound`.
    Cancelling `run` (or `aclose`) unbinds every session, waiting at most a second for each
    unbind_resp.

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
        self.bind_wait = bind_wait
        self._shared = Shared(
            config,
            name if name is not None else operator_name(config),
            on_receipts=on_receipts,
            receipt_linger=receipt_linger,
            reconnect_base=reconnect_base,
            reconnect_cap=reconnect_cap,
        )
        roles: tuple[Literal["trx", "tx", "rx"], ...] = (
            ("trx",) if config.bind == "trx" else ("tx", "rx")
        )
        self.sessions = [
            Session(self._shared, index, role) for index in range(config.binds) for role in roles
        ]
        self._ref = random.randrange(0x10000)
        self._sources: dict[str, bytes] = {}
        self._closed = False
        self._cancel: trio.CancelScope | None = None

    @property
    def name(self) -> str:
        return self._shared.name

    @property
    def on_receipts(self) -> ReceiptSink | None:
        """Where receipts go: `on_receipts(operator_name, reports)`; None drops them."""
        return self._shared.on_receipts

    @on_receipts.setter
    def on_receipts(self, sink: ReceiptSink | None) -> None:
        self._shared.on_receipts = sink

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
        """Counters since start, the bound transmitters, each transmitter's rate, reconnects."""
        return {
            **self._shared.counts,
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
            await self._shared.wait_bound_changed()

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

    def _source_field(self, sender: str) -> bytes:
        """The sender as a submit_sm's source address, worked out once per sender."""
        field = self._sources.get(sender)
        if field is None:
            source = source_address(sender)
            field = address_field("source_addr", source.ton, source.npi, source.addr)
            if len(self._sources) >= _SOURCES_KEPT:
                self._sources.clear()
            self._sources[sender] = field
        return field

    def _jobs_for(self, sms: OutboundSms) -> list[Job]:
        """The submit_sm of each part (ValueError when the message cannot be encoded)."""
        dest = destination_address(sms.to)
        parts = self._parts(sms)
        source = self._source_field(sms.sender)
        destination = address_field("destination_addr", dest.ton, dest.npi, dest.addr)
        return [
            Job(
                submit_sm_frame(
                    source,
                    destination,
                    esm_class=part.esm_class,
                    registered_delivery=1 if number == 0 else 0,
                    data_coding=part.data_coding,
                    short_message=part.short_message,
                    tlvs=part.tlvs,
                ),
                first=number == 0,
            )
            for number, part in enumerate(parts)
        ]

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        """One result per message, in order (the module's docstring says what each means)."""
        if self._closed:
            return [SendResult("temporary", reason="smpp_closed")] * len(batch)
        if not self.bound():
            with trio.move_on_after(self.bind_wait):
                await self.wait_bound()
            if not self.bound():
                return [SendResult("temporary", reason="smpp_not_bound")] * len(batch)
        per_message: list[list[Job] | SendResult] = []
        for sms in batch:
            try:
                per_message.append(self._jobs_for(sms))
            except ValueError as exc:
                per_message.append(SendResult("permanent", reason=f"smpp_cannot_encode: {exc}"))
        todo = [job for jobs in per_message if isinstance(jobs, list) for job in jobs]
        self._shared.counts["messages"] += len(batch)
        self._shared.counts["parts"] += len(todo)
        for _ in range(THROTTLE_ROUNDS):
            round_ = Round(len(todo))
            for job in todo:
                job.round = round_
            self._shared.put(todo)
            try:
                await round_.done.wait()
            finally:
                round_.abandoned = True
                if not round_.done.is_set():  # cancelled: what is still queued is not sent
                    self._shared.withdraw(round_)
            todo = [job for job in todo if job.status == "temporary" and job.retry]
            if not todo:
                break
        return [
            jobs if isinstance(jobs, SendResult) else self._result(jobs) for jobs in per_message
        ]

    @staticmethod
    def _result(jobs: list[Job]) -> SendResult:
        first = jobs[0]
        if first.status == "ok" and (len(jobs) == 1 or all(job.status == "ok" for job in jobs)):
            return SendResult("sent", canonical_message_id(first.message_id))
        refused = [job for job in jobs if job.status == "permanent"]
        if refused:
            return SendResult("permanent", reason=refused[0].reason)
        failed = next(job for job in jobs if job.status != "ok")
        return SendResult("temporary", reason=failed.reason)
