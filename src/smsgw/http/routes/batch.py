"""The batch endpoint: up to 1,000 messages in one request, validated one by one."""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, NoReturn

import msgspec
import trio
from quart import Response

from smsgw.engine.messages import AcceptResult, OutboundSms
from smsgw.http.api import Api
from smsgw.http.context import (
    MAX_BATCH_BODY_BYTES,
    Gateway,
    decode,
    gateway,
    json_response,
    not_json,
)
from smsgw.http.idempotency import idempotent
from smsgw.http.problems import TITLES, ProblemError
from smsgw.http.routes.messages import Intake, admit_bulk, opted_out_detail, scheduled_time
from smsgw.http.schemas import (
    MAX_BATCH,
    BatchIn,
    BatchItemError,
    BatchItemsIn,
    BatchOut,
    BatchRequest,
    BatchResultOut,
    SendIn,
)

api = Api("batch", __name__, tag="messages")
log = logging.getLogger("smsgw.http")
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
    """An item's problem in the shape of an atomic batch's deprecated `errors` list."""
    return {
        "index": index,
        "status": exc.status,
        "title": TITLES.get(exc.status, "Error"),
        "code": exc.code,
        "detail": exc.detail,
        **exc.extra,
    }


def item_error(exc: ProblemError) -> BatchItemError:
    """A refused item's error: what a single send of it would have answered."""
    extra = exc.extra
    return BatchItemError(
        code=exc.code,
        field=extra.get("field"),
        detail=exc.detail,
        status=exc.status,
        retry_after=extra.get("retry_after"),
        price=extra.get("price"),
    )


# The HTTP status a single send answers for each reason the store refuses an item with; the
# item's error `code` is the reason itself, so a reason the store learns later maps on its own
# (to 422 until it has a row here).
REASON_STATUS = {
    "insufficient_credit": 402,
    "recipient_rate_limited": 429,
    "batch_rejected": 409,
    "unknown_account": 404,
    "opted_out": 422,
}


def refusal(sms: OutboundSms, result: AcceptResult) -> BatchItemError:
    """The error of an item the store did not take (other than a duplicate client_ref)."""
    reason: str = result.reason or "not_accepted"
    status = REASON_STATUS.get(reason, 422)
    wait = result.retry_after
    retry_after = None if wait is None else max(1, math.ceil(wait))
    match reason:
        case "insufficient_credit":
            detail = f"the balance ran out before this message (price {sms.price})"
            return BatchItemError(reason, None, detail, status, price=sms.price)
        case "recipient_rate_limited":
            detail = f"this account's hourly limit of messages to {sms.to} is reached" + (
                f"; retry in {retry_after} s" if retry_after else ""
            )
            return BatchItemError(reason, "to", detail, status, retry_after=retry_after or 1)
        case "opted_out":
            return BatchItemError(reason, "to", opted_out_detail(sms), status)
        case "batch_rejected":
            detail = "not stored: another item of this atomic batch was refused"
        case _:
            detail = f"not stored ({reason})"
    return BatchItemError(reason, None, detail, status, retry_after=retry_after)


def counted(results: list[BatchResultOut]) -> BatchOut:
    kinds = Counter(r.status for r in results)
    accepted = kinds["queued"] + kinds["scheduled"]
    return BatchOut(results, accepted, kinds["duplicate"], kinds["rejected"])


# Reads of taken client_refs' messages in flight at once for one batch.
DUPLICATE_READS = 8


async def existing_ids(
    gw: Gateway, account_id: int, client_refs: dict[int, str]
) -> dict[int, str | None]:
    """The ids of the messages that already hold these client_refs, by item index: one read
    each, a few at a time (duplicates are rare: a batch retried after a lost answer). An id
    that could not be read is None; the item is still reported a duplicate."""
    found: dict[int, str | None] = {}
    limiter = trio.CapacityLimiter(DUPLICATE_READS)

    async def read(index: int, client_ref: str) -> None:
        async with limiter:
            try:
                row = await gw.reads.message_by_client_ref(account_id, client_ref)
            except Exception as exc:  # the items are stored already: answer them anyway
                log.warning("could not read the message with a taken client_ref: %s", exc)
                row = None
        found[index] = None if row is None else str(row["id"])

    async with trio.open_nursery() as nursery:
        for index, client_ref in client_refs.items():
            nursery.start_soon(read, index, client_ref)
    return found


def atomic_refusal(
    valid: list[tuple[int, OutboundSms]],
    accepted: Sequence[AcceptResult],
    duplicates: dict[int, str],
) -> NoReturn:
    """The whole answer to an atomic batch the store took none of (and not because every
    item is a duplicate, which is a 200): the first item's own reason, as a single send of
    it would answer, with `nothing was stored`."""
    if duplicates:
        raise ProblemError(
            409,
            "duplicate_client_ref",
            "a message of this account already has the client_ref of item"
            f" {next(iter(duplicates))}, but not every item's is taken; nothing was stored"
            " (atomic batch)",
        )
    refused = [
        (index, sms, result)
        for (index, sms), result in zip(valid, accepted, strict=True)
        if result.reason != "batch_rejected"
    ]
    index, sms, result = (refused or [(valid[0][0], valid[0][1], accepted[0])])[0]
    if result.reason == "insufficient_credit":
        total = sum(item.price for _, item in valid)
        raise ProblemError(
            402,
            "insufficient_credit",
            f"the balance does not cover this batch's price of {total}; nothing was stored",
            price=total,
            balance=result.balance,
        )
    error = refusal(sms, result)
    extra = {"retry_after": error.retry_after} if error.retry_after is not None else {}
    raise ProblemError(
        error.status,
        error.code,
        f"item {index}: {error.detail}; nothing was stored (atomic batch)",
        **extra,
    )


@api.route(
    "POST",
    "/v1/messages/batch",
    "Send up to 1,000 messages",
    body=BatchRequest,
    example={
        "messages": [
            {"to": "+4915123456789", "text": "Our summer sale starts today"},
            {"to": "+989121234567", "text": "Your code is 123456", "express": True},
        ]
    },
    responses={202: BatchOut, 200: BatchOut},
    problems=(402, 409, 503),
    idempotent=False,
    description=(
        "One result per item, in order, each with its `index`: `queued` (stored now: `id`,"
        " `segments`, `price`), `scheduled` (the same, sent at the item's `send_at`, else"
        " the batch's `send_at`; a bad batch `send_at` is a 422 for the whole batch),"
        " `duplicate` (the account already has a message with this"
        " `client_ref`: nothing new is stored, `id` is that message's, as a single send"
        " answers 200 with it) or `rejected` (`error`: the `code`, `field`, `detail` and"
        " HTTP `status` a single send of the item would have answered, `retry_after` for"
        " a 429 or 503). `accepted` (queued and scheduled) + `duplicates` + `rejected` is the"
        " number of items."
        " 202 when any item was stored; 200 when none was but some were duplicates; 422"
        " problem `nothing_accepted`, with the same `results` and counts, when every item"
        " was rejected. Credit is held item by item; once it runs out, the rest are"
        " rejected with `insufficient_credit`. With `atomic`, all or none: 422"
        " `invalid_batch` (with `results`) when any item is invalid, 402 when the balance"
        " cannot cover them all, 409 when some but not all `client_ref`s are taken (all"
        " taken: 200, every item a duplicate). The batch's bulk is admitted or refused"
        " whole (429 `backlog_full`, 503 `overloaded`)."
    ),
)
@idempotent
async def send_batch() -> Response:
    """202 when any item was stored, 200 when none was but some already were (duplicate
    client_refs, as a single send answers 200), 422 problem `nothing_accepted` when every item
    was refused; each with `{results, accepted, duplicates, rejected}`, one result per item in
    order. Credit is held item by item; once it runs out, the rest get `insufficient_credit`
    and nothing of theirs is stored. With `atomic`, all or none: 422 when any item is invalid,
    402 when the balance cannot cover them all, 409 when some but not all client_refs are
    taken (all taken: 200, every item a duplicate)."""
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
    messages: Sequence[SendIn | msgspec.Raw] = data.messages
    intake = Intake(gw, account_id)
    if data.send_at is not None:
        scheduled_time(data.send_at, intake.now)  # a bad one refuses the batch: 422
    # Admission first, before any item takes a recipient-limit token: under overload a
    # refused batch must cost nothing. Items that fall back to item-by-item decoding count
    # as bulk, and so do invalid ones: at worst a batch is refused a little early. Scheduled
    # items wait in the store, not in the backlog admission bounds.
    if data.send_at is None:
        admit_bulk(
            gw,
            account_id,
            sum(
                not (isinstance(m, SendIn) and (m.express or m.send_at is not None))
                for m in messages
            ),
        )
    results: list[BatchResultOut | None] = [None] * count
    problems: dict[int, ProblemError] = {}
    valid: list[tuple[int, OutboundSms]] = []
    for index, raw in enumerate(messages):
        try:
            item = raw if isinstance(raw, SendIn) else decode(raw, SendIn)
            if item.wait:
                raise ProblemError(
                    422, "invalid_field", "`wait` is for POST /v1/messages only", field="wait"
                )
            sms = intake.build(item, data.send_at)
            intake.admit(sms)  # express deadline and recipient limit: 503 or 429 for this item
            valid.append((index, sms))
        except ProblemError as exc:
            problems[index] = exc
            results[index] = BatchResultOut(index, "rejected", error=item_error(exc))
    if data.atomic and problems:
        for _, sms in valid:
            gw.recipients.give_back(account_id, sms.to)
        if all(p.status in (429, 503) for p in problems.values()):
            index, first = next(iter(problems.items()))
            raise ProblemError(
                first.status,
                first.code,
                f"item {index}: {first.detail}; nothing was stored (atomic batch)",
                retry_after=first.extra.get("retry_after", 1),
            )
        sibling = BatchItemError(
            "batch_rejected",
            None,
            "not stored: another item of this atomic batch is invalid",
            422,
        )
        every = [r or BatchResultOut(i, "rejected", error=sibling) for i, r in enumerate(results)]
        raise ProblemError(
            422,
            "invalid_batch",
            f"{len(problems)} of {count} messages are invalid; nothing was stored (atomic batch)",
            errors=[item_problem(i, p) for i, p in problems.items()],  # deprecated: `results`
            **msgspec.structs.asdict(counted(every)),
        )
    if valid:
        items = [sms for _, sms in valid]
        try:
            accepted = await gw.call(lambda: gw.engine.accept(items, atomic=data.atomic))
        except ProblemError:
            for sms in items:
                gw.recipients.give_back(account_id, sms.to)
            raise
        for sms, result in zip(items, accepted, strict=True):
            # A number past its limit in the store (other nodes' messages filled the hour)
            # keeps the token spent, as on a single send.
            if not result.accepted and result.reason != "recipient_rate_limited":
                gw.recipients.give_back(account_id, sms.to)
        duplicates = {
            index: sms.client_ref
            for (index, sms), result in zip(valid, accepted, strict=True)
            if result.reason == "duplicate_client_ref" and sms.client_ref is not None
        }
        if data.atomic and not all(r.accepted for r in accepted) and len(duplicates) < count:
            atomic_refusal(valid, accepted, duplicates)
        existing = await existing_ids(gw, account_id, duplicates) if duplicates else {}
        for (index, sms), result in zip(valid, accepted, strict=True):
            if result.accepted:
                results[index] = BatchResultOut(
                    index,
                    "queued" if sms.send_at is None else "scheduled",
                    sms.id,
                    segments=sms.segments,
                    price=sms.price,
                )
            elif index in duplicates:
                results[index] = BatchResultOut(index, "duplicate", existing[index])
            else:
                results[index] = BatchResultOut(index, "rejected", error=refusal(sms, result))
    answer = counted([r for r in results if r is not None])
    if answer.accepted:
        return json_response(answer, 202)
    if answer.duplicates:
        return json_response(answer, 200)
    raise ProblemError(
        422,
        "nothing_accepted",
        f"none of the {count} messages was accepted: each result says why",
        **msgspec.structs.asdict(answer),
    )
