"""The JSON of the HTTP batch operator protocol: POST /submit with a list of messages, answered
with one result per message, in order.

    request   [{"id", "to", "sender", "text"}, ...]       the id is the idempotency key
    response  {"results": [{"kind", "operator_message_id"?, "reason"?}, ...]}

`HttpOperator` speaks the client side and `smsgw.sim.operator_server` the server side.
"""

from __future__ import annotations

from typing import Literal

import msgspec

SUBMIT_PATH = "/submit"


class SubmitItem(msgspec.Struct, frozen=True):
    id: str
    to: str
    sender: str
    text: str


class SubmitResult(msgspec.Struct, frozen=True, omit_defaults=True):
    kind: Literal["sent", "temporary", "permanent"]
    operator_message_id: str | None = None
    reason: str | None = None


class SubmitResponse(msgspec.Struct, frozen=True):
    results: list[SubmitResult]
