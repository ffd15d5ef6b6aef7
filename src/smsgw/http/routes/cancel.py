"""Cancel: a scheduled or queued message of the calling account, refunded, never sent."""

from __future__ import annotations

from quart import Response

from smsgw.http.api import Api
from smsgw.http.context import gateway, json_response
from smsgw.http.params import is_message_id
from smsgw.http.problems import ProblemError, message_not_found, problem_response
from smsgw.http.schemas import CancelledOut, MessageId

api = Api("cancel", __name__, tag="messages")


@api.route(
    "POST",
    "/v1/messages/<message_id>/cancel",
    "Cancel a scheduled or queued message",
    responses={200: CancelledOut},
    problems=(409, 503),
    idempotent=False,
    description=(
        "200 with status `cancelled` and the price `refunded` (back in the balance) when the"
        " message was still scheduled or queued: it is never sent. 503 `cancel_elsewhere`"
        " (Retry-After 1) when the message is queued and another node of the gateway"
        " dispatches it: retry on a new connection. 409 `not_cancellable` with its"
        " `message_status` once an attempt of it is in flight (`sending`) or it is final"
        " (sent, failed, expired, cancelled, delivered, undelivered): a second cancel is a"
        " 409 too. 404 for a message of another account or none."
    ),
)
async def cancel_message(message_id: MessageId) -> Response:
    """The store decides (only a `scheduled` or `queued` row is cancelled, exact across
    nodes); meanwhile this node's pool holds the message back, and after a cancel it drops it
    unsent (engine/cancels.py). A message in flight here is `sending`: too late."""
    gw = gateway()
    account_id = await gw.require_account()
    if not is_message_id(message_id):
        raise message_not_found(message_id)
    engine = gw.engine
    if not engine.begin_cancel(message_id):
        row = await gw.reads.message(account_id, message_id)
        if row is None:
            raise message_not_found(message_id)
        raise not_cancellable(message_id, "sending")
    result = None
    try:
        shards = engine.dispatched_shards()
        result = await gw.call(lambda: gw.reads.cancel(account_id, message_id, shards))
    finally:
        engine.cancels.end(message_id, cancelled=result is not None and result.cancelled)
    if result is None:
        raise message_not_found(message_id)
    if not result.cancelled and result.status == "queued":
        # Another node dispatches it, and only that node's pool can hold it back: a new
        # connection lands on a node the kernel picks (SO_REUSEPORT), so close this one.
        return problem_response(
            503,
            "cancel_elsewhere",
            f"message {message_id} is dispatched by another node of the gateway: retry the"
            " cancel on a new connection",
            headers={"Connection": "close"},
            retry_after=1,
        )
    if not result.cancelled:
        raise not_cancellable(message_id, result.status)
    return json_response(CancelledOut(message_id, "cancelled", result.price))


def not_cancellable(message_id: str, status: str) -> ProblemError:
    """The 409 for a message past `queued`."""
    return ProblemError(
        409,
        "not_cancellable",
        f"message {message_id} is {status}: only a scheduled or queued message can be cancelled",
        message_status=status,
    )
