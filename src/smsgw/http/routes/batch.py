"""The batch endpoint: up to 1,000 messages in one request, validated one by one."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import msgspec
from quart import Blueprint, Response

from smsgw.engine.messages import OutboundSms
from smsgw.http.context import (
    MAX_BATCH_BODY_BYTES,
    decode,
    gateway,
    json_response,
    not_json,
)
from smsgw.http.idempotency import idempotent
from smsgw.http.problems import TITLES, ProblemError
from smsgw.http.routes.messages import Intake, admit_bulk
from smsgw.http.schemas import MAX_BATCH, AcceptedOut, BatchIn, BatchItemsIn, BatchOut, SendIn

bp = Blueprint("batch", __name__)
_decode_items = msgspec.json.Decoder(BatchItemsIn).decode


def decode_batch(body: bytes) -> BatchItemsIn | BatchIn:
    """The batch in `body`: its items decoded in the same pass when they all are well-formed
    (nearly every batch), else as raw items for `decode` to take one by one, so that each bad
    item gets its own problem. A body that is not JSON as a whole (not UTF-8, nested too
    deeply, cut short) is a 400 and no item of it is taken. Raises only ProblemError."""
    if b"\\u0000" not in body:  # else the careful path finds the item and field
        # Any error: the careful path says what is wrong, and where. (UnicodeDecodeError is
        # a ValueError, as msgspec's own errors are.)
        with contextlib.suppress(ValueError, RecursionError):
            return _decode_items(body)
    # msgspec does not check the raw items' UTF-8: a bad byte in one refuses the body, not
    # just that item.
    problem = not_json(body)
    if problem is not None:
        raise problem
    return decode(body, BatchIn)


def item_problem(index: int, exc: ProblemError) -> dict[str, Any]:
    return {
        "index": index,
        "status": exc.status,
        "title": TITLES.get(exc.status, "Error"),
        "code": exc.code,
        "detail": exc.detail,
        **exc.extra,
    }


@bp.post("/v1/messages/batch")
@idempotent
async def send_batch() -> Response:
    """202 with one result per item, in order: `{id, status, segments, price}` for an accepted
    item, a problem object (no id) for a refused one. Credit is held item by item; once it runs
    out, the rest get `insufficient_credit` and nothing of theirs is stored. With `atomic`,
    all or none: 422 when any item is invalid, 402 when the balance cannot cover them all."""
    gw = gateway()
    account_id = await gw.require_account()
    data = decode_batch(await gw.raw_body(limit=MAX_BATCH_BODY_BYTES))
    count = len(data.messages)
    if count == 0:
        raise ProblemError(422, "empty_batch", "`messages` must hold at least one message")
    if count > MAX_BATCH:
        raise ProblemError(
            413,
            "batch_too_large",
            f"a batch holds at most {MAX_BATCH} messages; this one has {count}: split it",
            max_items=MAX_BATCH,
        )
    results: list[AcceptedOut | dict[str, Any] | None] = [None] * count
    valid: list[tuple[int, OutboundSms]] = []
    intake = Intake(gw, account_id)
    messages: Sequence[SendIn | msgspec.Raw] = data.messages
    for index, raw in enumerate(messages):
        try:
            item = raw if isinstance(raw, SendIn) else decode(raw, SendIn)
            if item.wait:
                raise ProblemError(
                    422, "invalid_field", "`wait` is for POST /v1/messages only", field="wait"
                )
            sms = intake.build(item)
            intake.admit(sms)  # express deadline and recipient limit: 503 or 429 for this item
            valid.append((index, sms))
        except ProblemError as exc:
            results[index] = item_problem(index, exc)
    if data.atomic and len(valid) < count:
        for _, sms in valid:
            gw.recipients.give_back(account_id, sms.to)
        errors = [r for r in results if isinstance(r, dict)]
        busy = [e for e in errors if e["status"] in (429, 503)]
        if len(busy) == len(errors):
            first = busy[0]
            raise ProblemError(
                first["status"],
                first["code"],
                f"item {first['index']}: {first['detail']}; nothing was stored (atomic batch)",
                retry_after=first.get("retry_after", 1),
            )
        raise ProblemError(
            422,
            "invalid_batch",
            f"{len(errors)} of {count} messages are invalid; nothing was stored (atomic batch)",
            errors=errors,
        )
    if valid:
        items = [sms for _, sms in valid]
        try:
            admit_bulk(gw, account_id, sum(1 for sms in items if not sms.express))
        except ProblemError:
            for sms in items:
                gw.recipients.give_back(account_id, sms.to)
            raise
        try:
            accepted = await gw.call(lambda: gw.engine.accept(items, atomic=data.atomic))
        except ProblemError:
            for sms in items:
                gw.recipients.give_back(account_id, sms.to)
            raise
        for sms, result in zip(items, accepted, strict=True):
            if not result.accepted:
                gw.recipients.give_back(account_id, sms.to)
        if data.atomic and any(r.reason == "duplicate_client_ref" for r in accepted):
            taken = [i for (i, _), r in zip(valid, accepted, strict=True) if r.reason]
            raise ProblemError(
                409,
                "duplicate_client_ref",
                "a message of this account already has the client_ref of item"
                f" {taken[0]}; nothing was stored (atomic batch)",
            )
        if data.atomic and not accepted[0].accepted:
            total = sum(sms.price for sms in items)
            raise ProblemError(
                402,
                "insufficient_credit",
                f"the balance does not cover this batch's price of {total}; nothing was stored",
                price=total,
                balance=accepted[0].balance,
            )
        for (index, sms), result in zip(valid, accepted, strict=True):
            if result.accepted:
                results[index] = AcceptedOut(sms.id, "queued", sms.segments, sms.price)
            elif result.reason == "duplicate_client_ref":
                results[index] = item_problem(
                    index,
                    ProblemError(
                        409,
                        "duplicate_client_ref",
                        f"a message of this account already has client_ref {sms.client_ref!r}",
                    ),
                )
            else:
                results[index] = item_problem(
                    index,
                    ProblemError(
                        402,
                        "insufficient_credit",
                        f"the balance ran out before this message (price {sms.price})",
                        price=sms.price,
                    ),
                )
    return json_response(BatchOut([r for r in results if r is not None]), 202)
