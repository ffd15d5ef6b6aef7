"""Messages: send one, read one."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import msgspec
import trio
from quart import Response

from smsgw.engine import numbers
from smsgw.engine import sms as rules
from smsgw.engine.actor import Reply
from smsgw.engine.callbacks import callback_url_problem
from smsgw.engine.messages import AcceptResult, OutboundSms, Settled
from smsgw.engine.ports import dispatch_shard
from smsgw.http.api import REF, Api, Content
from smsgw.http.context import Gateway, gateway, json_response, uuid7
from smsgw.http.idempotency import idempotent
from smsgw.http.params import is_message_id
from smsgw.http.problems import ProblemError, message_not_found
from smsgw.http.routes.delivery import CALLBACKS
from smsgw.http.routes.otp import OTP_SEND, OtpSend, otp_client_ref_used
from smsgw.http.schemas import (
    MAX_SEND_AHEAD_S,
    SEND_AT_SLACK_S,
    SENT_ANSWERS,
    AcceptedOut,
    MessageEvent,
    MessageEventsOut,
    MessageId,
    MessageOut,
    SendIn,
)
from smsgw.logs import request_id_var

api = Api("messages", __name__, tag="messages")
DEFAULT_SENDER = "smsgw"


class Intake:
    """Validating, pricing and admitting the messages of one request (one account): what every
    message needs (the configuration, the time, the account's settings) is looked up once per
    request, not once per message of a batch of a thousand."""

    __slots__ = (
        "_bulk",
        "_deadline",
        "_express_problem",
        "_shard",
        "account_id",
        "config",
        "country",
        "default_sender",
        "gw",
        "monotonic",
        "now",
        "prices",
        "recipient_limit",
        "request_id",
        "senders",
    )

    def __init__(self, gw: Gateway, account_id: int) -> None:
        engine = gw.engine
        self.gw = gw
        self.account_id = account_id
        self.config = engine.config
        self.now = engine.clock()
        self.monotonic = time.monotonic()
        self.request_id = request_id_var.get()
        # The account's settings, cached on every node (a change arrives by NOTIFY): no query.
        settings = engine.account_settings(account_id)
        if settings.suspended:
            raise ProblemError(
                403,
                "account_suspended",
                "this account is suspended: it can send nothing until the gateway's admin"
                " resumes it; its queued messages wait, uncharged",
            )
        per_segment = settings.price_per_segment
        if per_segment is None:
            per_segment = engine.config.price_per_segment
        surcharge = settings.express_surcharge
        if surcharge is None:
            surcharge = engine.config.express_surcharge
        self.prices = (per_segment, per_segment + surcharge)  # normal, express
        self.recipient_limit = settings.recipient_limit_per_hour
        self.country = settings.default_country or numbers.node_country()
        self.senders = frozenset(settings.senders)
        self.default_sender = settings.default_sender or (
            settings.senders[0] if settings.senders else DEFAULT_SENDER
        )
        self._deadline: float | None = None
        self._express_problem: str | bool | None = False  # False: not asked yet
        self._shard: int | bool | None = False  # False: not asked yet
        self._bulk: int | bool | None = False  # False: not asked yet

    def build(self, data: SendIn, send_at: datetime | None = None) -> OutboundSms:
        """Validate one message and price it; raises a 422 problem naming the field. `send_at`:
        the batch's, for an item without its own."""
        config = self.config
        # First: the hourly limit, the opt-outs and the reports all see the stored E.164 form.
        to = numbers.normalize(data.to, self.country)
        if to is None:
            raise ProblemError(
                422, "invalid_field", f"`to` {numbers.number_problem(self.country)}", field="to"
            )
        if data.otp or data.template is not None or data.code_length is not None:
            raise otp_misplaced(data)
        if not data.text:
            raise ProblemError(422, "invalid_field", "`text` must not be empty", field="text")
        sender = self.sender(data)
        if data.callback_url is not None:
            problem = callback_url_problem(data.callback_url, production=config.production)
            if problem:
                raise ProblemError(
                    422, "invalid_field", f"`callback_url` {problem}", field="callback_url"
                )
        segments = rules.segments(data.text)
        if segments > config.max_segments:
            raise ProblemError(
                422,
                "invalid_field",
                f"`text` needs {segments} segments; the limit is {config.max_segments}",
                field="text",
            )
        express = data.express
        if data.wait and not express:
            raise ProblemError(
                422, "invalid_field", "`wait` is for express messages only", field="wait"
            )
        if data.validity is not None and express:
            raise ProblemError(
                422,
                "invalid_field",
                "`validity` is for bulk messages only: an express message's deadline ends it",
                field="validity",
            )
        due = self.send_time(data, send_at)
        deadline = None
        if express:
            # A scheduled express message's deadline counts from its send_at.
            deadline = self._express_deadline() if due is None else due + self._deadline_s()
        return OutboundSms(
            id=uuid7(),
            account_id=self.account_id,
            to=to,
            sender=sender,
            text=data.text,
            segments=segments,
            price=rules.price(
                segments,
                express=express,
                normal_price=self.prices[0],
                express_price=self.prices[1],
            ),
            express=express,
            created_at=self.now,
            deadline=deadline,
            shard=self._express_shard() if express else self._bulk_shard(due),
            client_ref=data.client_ref,
            validity=data.validity,
            request_id=self.request_id,
            callback_url=data.callback_url,
            send_at=due,
        )

    def send_time(self, data: SendIn, default: datetime | None) -> float | None:
        """When the item is to be sent (wall clock): its `send_at`, else `default` (the
        batch's); None: at once (neither, or one at most SEND_AT_SLACK_S past). A 422 naming
        the field for one with `wait`, or out of range (`scheduled_time`)."""
        at = data.send_at if data.send_at is not None else default
        if at is None:
            return None
        if data.wait:
            raise ProblemError(
                422,
                "invalid_field",
                "`send_at` is not taken with `wait`: a waiting request answers within the"
                " express deadline, from now",
                field="send_at",
            )
        return scheduled_time(at, self.now)

    def sender(self, data: SendIn) -> str:
        """The item's sender (`sender`, or its alias `from`; neither: the account's default),
        valid and, when the admin gave the account a list, on it: else a 422 naming the
        field."""
        field, sender = "sender", data.sender
        if data.from_ is not None:
            if sender is not None and sender != data.from_:
                raise ProblemError(
                    422,
                    "invalid_field",
                    "`from` is another name for `sender`: give one of them",
                    field="from",
                )
            field, sender = "from", data.from_
        if sender is None:
            return self.default_sender
        problem = rules.sender_problem(sender)
        if problem:
            raise ProblemError(422, "invalid_field", f"`{field}` {problem}", field=field)
        if self.senders and sender not in self.senders:
            raise ProblemError(
                422,
                "sender_not_allowed",
                f"`{field}` {sender!r} is not one of this account's senders"
                f" ({', '.join(sorted(self.senders))}); leave it out to send from"
                f" {self.default_sender!r}",
                field=field,
            )
        return sender

    def _express_shard(self) -> int | None:
        if self._shard is False:
            self._shard = self.gw.engine.express_shard()
        return self._shard

    def _bulk_shard(self, due: float | None) -> int | None:
        """Where a bulk item is dispatched (`Engine.bulk_shard`); a scheduled one waits in
        the store for its account's shard's owner to promote it."""
        if due is not None:
            return None
        if self._bulk is False:
            self._bulk = self.gw.engine.bulk_shard(self.account_id)
        return self._bulk

    def _express_deadline(self) -> float:
        if self._deadline is None:
            self._deadline = self.now + self._deadline_s()
        return self._deadline

    def _deadline_s(self) -> float:
        return self.gw.engine.express_deadline_s(self.account_id)

    def admit(self, sms: OutboundSms) -> None:
        """The checks made in memory before a message is accepted: an express message must be
        able to make its deadline (else 503, nothing held), and the recipient's hourly limit
        must have room (else 429). Raises a ProblemError; takes a recipient token when it
        passes."""
        gw = self.gw
        # A scheduled express message meets the operators of its send_at, not today's: its
        # deadline decides then (failed and refunded if it cannot make it).
        if sms.express and sms.send_at is None:
            if self._express_problem is False:
                # Asked once a request: nothing it depends on changes while the handler runs.
                self._express_problem = gw.engine.express_problem(
                    self.account_id, dispatch_shard(sms)
                )
            if self._express_problem:
                raise ProblemError(
                    503,
                    "express_unavailable",
                    f"this express message could not reach an operator within its deadline:"
                    f" {self._express_problem}; nothing was held",
                    retry_after=1,
                )
        wait = gw.recipients.take(sms.account_id, sms.to, self.monotonic, self.recipient_limit)
        if wait:
            raise self.recipient_limited(sms, wait)

    def recipient_limited(self, sms: OutboundSms, wait: float) -> ProblemError:
        """The 429 for a message past its number's hourly limit, `wait` s before one fits."""
        retry_after = max(1, math.ceil(wait))
        return ProblemError(
            429,
            "recipient_rate_limited",
            f"this account may send {self.recipient_limit or self.gw.recipients.limit} messages"
            f" an hour to {sms.to}; retry in {retry_after} s",
            retry_after=retry_after,
        )


def scheduled_time(at: datetime, now: float) -> float | None:
    """`at` (a `send_at`, with its offset) as wall-clock seconds when it is ahead of `now`;
    None when it is at most SEND_AT_SLACK_S behind (sent at once); a 422 naming `send_at`
    when it is further behind or more than MAX_SEND_AHEAD_S ahead."""
    t = at.timestamp()
    if t > now + MAX_SEND_AHEAD_S:
        raise ProblemError(
            422,
            "invalid_field",
            f"`send_at` {at.isoformat()} is more than {MAX_SEND_AHEAD_S // 86_400} days ahead",
            field="send_at",
        )
    if t < now - SEND_AT_SLACK_S:
        raise ProblemError(
            422,
            "invalid_field",
            f"`send_at` {at.isoformat()} is in the past (more than {SEND_AT_SLACK_S} s ago);"
            " leave it out to send now",
            field="send_at",
        )
    return t if t > now else None


def otp_misplaced(data: SendIn) -> ProblemError:
    """The 422 for OTP fields where no OTP is sent: a batch item, or `template` or
    `code_length` without `"otp": true` (a single send's OTP reaches `build` as the text the
    gateway wrote, without them)."""
    if data.otp:
        return ProblemError(
            422, "invalid_field", "`otp` is for POST /v1/messages only", field="otp"
        )
    field = "template" if data.template is not None else "code_length"
    return ProblemError(
        422, "invalid_field", f'`{field}` is for one-time codes (`"otp": true`) only', field=field
    )


def opted_out_detail(sms: OutboundSms) -> str:
    """Why a message to an opted-out or blocked number was refused (the store says which of
    the two only by whether an express message was refused too)."""
    if sms.express:
        return f"{sms.to} is on the gateway's blocklist; nothing was stored or held"
    return (
        f"{sms.to} opted out of this account's messages, or is on the gateway's blocklist;"
        " nothing was stored or held"
    )


def admit_bulk(gw: Gateway, account_id: int, count: int) -> None:
    """429 (the account's backlog) or 503 (the node's) with a Retry-After when `count` more
    bulk messages would take a backlog past its bound (engine/admission.py): nothing is
    stored or held. A batch asks once for all of its bulk messages."""
    if count:
        refusal = gw.engine.admission.check(account_id, count)
        if refusal is not None:
            raise ProblemError(
                refusal.status, refusal.code, refusal.detail, retry_after=refusal.retry_after
            )


def message_view(gw: Gateway, row: dict[str, Any]) -> dict[str, Any]:
    """A stored message as clients see it: `sending` while an attempt is in flight here."""
    if row["status"] == "queued" and gw.engine.sending(row["id"]):
        row["status"] = "sending"
    return row


async def existing_by_client_ref(gw: Gateway, account_id: int, client_ref: str) -> Response:
    """200 with the message that already has this client_ref: nothing new is stored or held."""
    row = await gw.reads.message_by_client_ref(account_id, client_ref)
    if row is None:  # only if the account's messages were deleted meanwhile
        raise ProblemError(
            503, "unavailable", "could not read the message with this client_ref; retry"
        )
    return json_response(message_view(gw, row), 200)


@api.route(
    "POST",
    "/v1/messages",
    "Send one message",
    body=SendIn,
    responses={
        202: AcceptedOut,
        # The message; an OTP send's has its code too.
        200: Content(
            "application/json",
            {"anyOf": [{"$ref": REF.format(name=t.__name__)} for t in SENT_ANSWERS]},
            refs=SENT_ANSWERS,
        ),
    },
    example={"to": "+989121234567", "text": "Your order has shipped"},
    examples={"otp": {"to": "+4915123456789", "otp": True, "code_length": 6}},
    problems=(402, 502, 503, 504),
    description=(
        "202 once the message and its credit hold are committed. 200 with the existing"
        " message when `client_ref` was used before by this account (nothing new is"
        " stored). 402 when the balance does not cover the price (nothing stored or held)."
        " 422 `sender_not_allowed` for a sender the admin did not allow the account"
        " (PUT /v1/accounts/{account_id}/senders); 422 `opted_out` for a number on the"
        " account's opt-outs (bulk only) or the gateway's blocklist."
        " 429 `recipient_rate_limited` past the hourly limit for one number. Express: 503"
        " `express_unavailable` when it could not make its deadline (nothing held). With"
        ' `"wait": true` (express only): 200 with the sent message once the operator took'
        " it, 504 `deadline_exceeded` (failed, refunded) when the deadline passed, 502"
        " `operator_refused` (failed, refunded) when the operator refused it."
        " `validity` (bulk, 60 to 259200 s, default 86400): a message not sent within it"
        " ends `expired`, refunded."
        " `send_at` (RFC 3339 with an offset, up to 30 days ahead): 202 with status"
        " `scheduled`, its price held now; it is sent within a second of that time (an"
        " express message's deadline and a message's `validity` count from it), and until"
        " then it can be cancelled on any node. Not with `wait` or `otp` (422)."
        " With `callback_url`, each status change (sent, failed, expired, cancelled,"
        " delivered, undelivered) is POSTed there. " + CALLBACKS + " " + OTP_SEND
    ),
)
@idempotent
async def send_message() -> Response:
    """202 and the new message; 200 and the existing one when `client_ref` is already used by
    this account. The unique index decides, inside the group commit: only a duplicate costs a
    read, instead of every request with a client_ref (most have one) paying for it."""
    gw = gateway()
    account_id = await gw.require_account()
    data = await gw.body(SendIn)
    intake = Intake(gw, account_id)
    # A one-time code: the gateway writes the text, and it is express and waits.
    otp = OtpSend(data) if data.otp else None
    sms = intake.build(data if otp is None else otp.request)
    if not sms.express and sms.send_at is None:
        # Scheduled: it waits in the store, not in the backlog admission bounds.
        admit_bulk(gw, account_id, 1)
    intake.admit(sms)
    if otp is not None:
        try:
            await otp.issue(gw, sms)
        except ProblemError:
            gw.recipients.give_back(account_id, sms.to)
            raise
    waiting = gw.engine.wait_for(sms.id) if data.wait or otp is not None else None
    try:
        try:
            accepting = gw.call(lambda: gw.engine.accept([sms], atomic=True))
            results = await (accepting if waiting is None else stored_in_time(gw, sms, accepting))
        except ProblemError:
            gw.recipients.give_back(account_id, sms.to)
            raise
        result = results[0]
        if result.reason == "recipient_rate_limited":
            # Other nodes' messages (or those before a restart) filled the hour: the store
            # counts them all. The token taken here stays spent.
            raise intake.recipient_limited(sms, result.retry_after or 1.0)
        if not result.accepted:
            gw.recipients.give_back(account_id, sms.to)
        if result.reason == "duplicate_client_ref" and sms.client_ref is not None:
            if otp is not None:
                raise otp_client_ref_used(sms)
            return await existing_by_client_ref(gw, account_id, sms.client_ref)
        if result.reason == "opted_out":
            raise ProblemError(422, "opted_out", opted_out_detail(sms), field="to")
        if not results[0].accepted:
            raise ProblemError(
                402,
                "insufficient_credit",
                f"the balance does not cover this message's price of {sms.price}",
                price=sms.price,
                balance=results[0].balance,
            )
        if otp is not None and waiting is not None:
            return await otp.sent(sms, sent_view(sms, await sent_outcome(gw, sms, waiting)))
        if waiting is not None:
            return await answer_when_sent(gw, sms, waiting)
        status = "queued" if sms.send_at is None else "scheduled"
        return json_response(AcceptedOut(sms.id, status, sms.segments, sms.price), 202)
    finally:
        if waiting is not None:
            gw.engine.forget_wait(sms.id)
        if otp is not None:
            await otp.unsent(sms)


# After the deadline, how long a waiting request gives the outcome to be committed: an
# expiry decided at the deadline is committed within milliseconds unless the store is slow.
WAIT_GRACE = 0.5


async def stored_in_time(
    gw: Gateway, sms: OutboundSms, accepting: Awaitable[list[AcceptResult]]
) -> list[AcceptResult]:
    """The accept of a waited-for express message, or its 504 at the deadline: a commit
    that takes that long (the store restarting, a commit in doubt) is not waited for. The
    message may still be stored; if it is, it fails at its deadline and is refunded, never
    sent late."""
    assert sms.deadline is not None
    with trio.move_on_after(max(0.0, sms.deadline - gw.engine.clock()) + WAIT_GRACE):
        return await accepting
    raise ProblemError(
        504,
        "deadline_exceeded",
        "the store did not confirm the message before its deadline; if it was stored it fails"
        " at its deadline and its price is refunded: GET it to see",
        message_id=sms.id,
    )


async def answer_when_sent(gw: Gateway, sms: OutboundSms, waiting: Reply[Settled]) -> Response:
    """`"wait": true`: 200 once the operator took the message, 504 when its deadline passed
    (the message is failed and its hold released), 502 when the operator refused it."""
    return json_response(sent_view(sms, await sent_outcome(gw, sms, waiting)), 200)


async def sent_outcome(gw: Gateway, sms: OutboundSms, waiting: Reply[Settled]) -> Settled:
    """The outcome of a waited-for message that the operator took; raises the 504 or 502
    problem of one that failed or whose outcome did not come in time."""
    assert sms.deadline is not None
    outcome = await settled_within(waiting, sms.deadline - gw.engine.clock())
    if outcome is None:
        # The operator answered this node but the commit is late (the store is down or
        # slow): its answer is the outcome, committed once the store is back.
        outcome = gw.engine.told_outcome(sms.id)
    if outcome is None and gw.engine.dispatch_stalled(dispatch_shard(sms)):
        # The node that dispatches it stopped heartbeating: it cannot reach an operator in
        # time, so fail it now, refunded, rather than answer after a takeover. Which outcome
        # landed (ours, or one the stalled node got in first) the row says.
        await gw.call(lambda: gw.engine.expire(sms))
        if await settled_within(waiting, WAIT_GRACE) is not None:
            outcome = await recorded_outcome(gw, sms)
    elif outcome is None:
        outcome = await settled_within(waiting, WAIT_GRACE)
    if outcome is None:
        # Not final yet (the store is slow to commit): say so; GET tells the end.
        raise ProblemError(
            504,
            "deadline_exceeded",
            "the deadline passed before the message's outcome was recorded; GET it to see"
            " how it ended",
            message_id=sms.id,
        )
    if outcome.status == "sent":
        return outcome
    if outcome.reason == "deadline_exceeded":
        raise ProblemError(
            504,
            "deadline_exceeded",
            "the message did not reach an operator within its deadline; it is failed and its"
            " price was refunded",
            message_id=sms.id,
            message_status="failed",
            refunded=True,
        )
    raise ProblemError(
        502,
        "operator_refused",
        f"the operator refused the message ({outcome.reason}); it is failed and its price was"
        " refunded",
        message_id=sms.id,
        message_status="failed",
        refunded=True,
    )


async def settled_within(waiting: Reply[Settled], seconds: float) -> Settled | None:
    with trio.move_on_after(max(0.0, seconds)):
        return await waiting.wait()
    return None


async def recorded_outcome(gw: Gateway, sms: OutboundSms) -> Settled | None:
    """The message's outcome as stored (None while it has none)."""
    row = await gw.reads.message(sms.account_id, sms.id)
    if row is None or row["status"] in ("queued", "sending"):
        return None
    return Settled(
        sms.id,
        "failed" if row["status"] == "failed" else "sent",
        row["operator"],
        row["operator_message_id"],
        row["reason"] if row["status"] == "failed" else None,
        row["attempts"],
        row["updated_at"].timestamp(),
    )


def sent_view(sms: OutboundSms, outcome: Settled) -> dict[str, Any]:
    """The message as GET shows it, from what this node already knows: no read."""
    return {
        "id": sms.id,
        "to": sms.to,
        "sender": sms.sender,
        "text": sms.text,
        "status": "sent",
        "reason": None,
        "segments": sms.segments,
        "price": sms.price,
        "express": sms.express,
        "attempts": outcome.attempts,
        "operator": outcome.operator,
        "operator_message_id": outcome.operator_message_id,
        "client_ref": sms.client_ref,
        "created_at": datetime.fromtimestamp(sms.created_at, UTC),
        "updated_at": datetime.fromtimestamp(outcome.at, UTC),
        "sent_at": datetime.fromtimestamp(outcome.at, UTC),
        "delivered_at": None,
    }


@api.route(
    "GET",
    "/v1/messages/<message_id>",
    "One message of the calling account",
    responses={200: MessageOut},
)
async def get_message(message_id: MessageId) -> Response:
    gw = gateway()
    account_id = await gw.require_account()
    if not is_message_id(message_id):
        raise message_not_found(message_id)
    row = await gw.reads.message(account_id, message_id)
    if row is None:
        raise message_not_found(message_id)
    return json_response(message_view(gw, row))


@api.route(
    "GET",
    "/v1/messages/<message_id>/events",
    "What happened to one message of the calling account, oldest first",
    responses={200: MessageEventsOut},
)
async def get_message_events(message_id: MessageId) -> Response:
    gw = gateway()
    account_id = await gw.require_account()
    if not is_message_id(message_id):
        raise message_not_found(message_id)
    history = await gw.reads.message_events(account_id, message_id)
    if history is None:
        raise message_not_found(message_id)
    # The accept is not stored as an event (intake writes only the message): it is the
    # message's own creation, and a schedule is its send_at.
    events = [MessageEvent("accepted", history.created_at)]
    if history.send_at is not None:
        events.append(MessageEvent("scheduled", history.created_at, send_at=history.send_at))
    events.extend(msgspec.convert(e, MessageEvent) for e in history.events)
    return json_response(MessageEventsOut(message_id, events))
