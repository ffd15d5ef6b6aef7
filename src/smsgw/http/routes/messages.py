"""Messages: send one, read one."""

from __future__ import annotations

import uuid
from typing import Any

from quart import Blueprint, Response

from smsgw.engine import sms as rules
from smsgw.engine.callbacks import callback_url_problem
from smsgw.engine.messages import OutboundSms
from smsgw.http.context import Gateway, gateway, json_response, uuid7
from smsgw.http.idempotency import idempotent
from smsgw.http.problems import ProblemError
from smsgw.http.schemas import AcceptedOut, SendIn
from smsgw.logs import request_id_var

bp = Blueprint("messages", __name__)
DEFAULT_SENDER = "smsgw"


def build_sms(gw: Gateway, account_id: int, data: SendIn) -> OutboundSms:
    """Validate one message and price it; raises a 422 problem naming the field."""
    config = gw.engine.config
    problem = rules.recipient_problem(data.to)
    if problem:
        raise ProblemError(422, "invalid_field", f"`to` {problem}", field="to")
    if not data.text:
        raise ProblemError(422, "invalid_field", "`text` must not be empty", field="text")
    sender = DEFAULT_SENDER if data.sender is None else data.sender
    problem = rules.sender_problem(sender)
    if problem:
        raise ProblemError(422, "invalid_field", f"`sender` {problem}", field="sender")
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
    price = rules.price(
        segments,
        express=data.express,
        normal_price=config.normal_price,
        express_price=config.express_price,
    )
    now = gw.engine.clock()
    return OutboundSms(
        id=uuid7(),
        account_id=account_id,
        to=data.to,
        sender=sender,
        text=data.text,
        segments=segments,
        price=price,
        express=data.express,
        created_at=now,
        deadline=now + config.express_deadline_ms / 1000 if data.express else None,
        client_ref=data.client_ref,
        request_id=request_id_var.get(),
        callback_url=data.callback_url,
    )


def message_view(gw: Gateway, row: dict[str, Any]) -> dict[str, Any]:
    """A stored message as clients see it: `sending` while an attempt is in flight here."""
    if row["status"] == "queued" and row["id"] in gw.engine.pool.inflight:
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


@bp.post("/v1/messages")
@idempotent
async def send_message() -> Response:
    """202 and the new message; 200 and the existing one when `client_ref` is already used by
    this account. The unique index decides, inside the group commit: only a duplicate costs a
    read, instead of every request with a client_ref (most have one) paying for it."""
    gw = gateway()
    account_id = await gw.require_account()
    data = await gw.body(SendIn)
    sms = build_sms(gw, account_id, data)
    results = await gw.call(lambda: gw.engine.accept([sms], atomic=True))
    if results[0].reason == "duplicate_client_ref" and sms.client_ref is not None:
        return await existing_by_client_ref(gw, account_id, sms.client_ref)
    if not results[0].accepted:
        raise ProblemError(
            402,
            "insufficient_credit",
            f"the balance does not cover this message's price of {sms.price}",
            price=sms.price,
            balance=results[0].balance,
        )
    return json_response(AcceptedOut(sms.id, "queued", sms.segments, sms.price), 202)


@bp.get("/v1/messages/<message_id>")
async def get_message(message_id: str) -> Response:
    gw = gateway()
    account_id = await gw.require_account()
    try:
        uuid.UUID(message_id)
    except ValueError:
        raise ProblemError(404, "message_not_found", f"no message {message_id}") from None
    row = await gw.reads.message(account_id, message_id)
    if row is None:
        raise ProblemError(404, "message_not_found", f"no message {message_id}")
    return json_response(message_view(gw, row))
