"""Reports: list an account's messages (filters, cursor pages), summaries, CSV exports.

All three read PostgreSQL directly (one query per page or report, off the accept path), in
(created_at, id) order on the index messages_account_recent. Pages use keyset pagination: the
cursor is the position of the last row returned, so rows inserted between two pages neither
shift nor repeat items, and a deep page costs what the first one does.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec
from quart import Blueprint, Response, request

from smsgw.engine import sms as rules
from smsgw.engine.ports import MessageQuery, SummaryRow
from smsgw.http.context import Gateway, gateway, json_response
from smsgw.http.problems import ProblemError
from smsgw.http.routes.messages import message_view

bp = Blueprint("reports", __name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1_000
EXPORT_PAGE = 5_000
# As stored (`sending` is never written); `delivered` and `undelivered` come from DLRs.
STATUSES = ("queued", "sent", "failed", "delivered", "undelivered")
EXPORT_COLUMNS = (
    "id",
    "to",
    "sender",
    "text",
    "status",
    "reason",
    "segments",
    "price",
    "express",
    "attempts",
    "operator",
    "operator_message_id",
    "client_ref",
    "created_at",
    "updated_at",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- cursors ------------------------------------------------------------------------------


def encode_cursor(created_at: datetime, message_id: str) -> str:
    """An opaque position: created_at in microseconds (PostgreSQL's own precision, so the
    position is exact) and the message id, base64url."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    raw = micros.to_bytes(8, "big", signed=True) + uuid.UUID(message_id).bytes
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if len(raw) != 24:
            raise ValueError("length")
        micros = int.from_bytes(raw[:8], "big", signed=True)
        return _EPOCH + timedelta(microseconds=micros), str(uuid.UUID(bytes=raw[8:]))
    except (ValueError, binascii.Error, OverflowError):
        raise ProblemError(
            422,
            "invalid_cursor",
            "`cursor` is not a cursor this API returned; pass `next_cursor` as it is",
            field="cursor",
        ) from None


# --- query parameters ---------------------------------------------------------------------


def _params(allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters, each at most once; an unknown one is a 422 (a typo such as
    `created_after` must not silently return everything)."""
    allowed = set(allowed)
    params: dict[str, str] = {}
    for name, values in request.args.lists():
        if name not in allowed:
            raise ProblemError(
                422,
                "invalid_field",
                f"unknown query parameter `{name}`; this route takes "
                + ", ".join(f"`{a}`" for a in sorted(allowed)),
                field=name,
            )
        if len(values) > 1:
            raise ProblemError(422, "invalid_field", f"`{name}` given twice", field=name)
        params[name] = values[0]
    return params


def _timestamp(params: dict[str, str], name: str) -> datetime | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise ProblemError(
            422,
            "invalid_field",
            f"`{name}` must be an RFC 3339 timestamp with an offset, such as"
            " 2025-01-31T00:00:00Z (in a query string, write + as %2B)",
            field=name,
        )
    return at


def _range(params: dict[str, str], start: str, end: str) -> tuple[datetime | None, datetime | None]:
    lo, hi = _timestamp(params, start), _timestamp(params, end)
    if lo is not None and hi is not None and lo > hi:
        raise ProblemError(422, "invalid_field", f"`{start}` is after `{end}`", field=start)
    return lo, hi


def _limit(params: dict[str, str]) -> int:
    value = params.get("limit")
    if value is None:
        return DEFAULT_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise ProblemError(
            422,
            "invalid_field",
            f"`limit` must be a whole number from 1 to {MAX_LIMIT}",
            field="limit",
        )
    return int(value)


def _message_query(params: dict[str, str]) -> MessageQuery:
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise ProblemError(
            422, "invalid_field", f"`status` must be one of {', '.join(STATUSES)}", field="status"
        )
    to = params.get("to")
    if to is not None:
        problem = rules.recipient_problem(to)
        if problem:
            raise ProblemError(
                422,
                "invalid_field",
                f"`to` {problem} (in a query string, write + as %2B)",
                field="to",
            )
    client_ref = params.get("client_ref")
    if client_ref is not None and not 1 <= len(client_ref) <= 100:
        raise ProblemError(
            422, "invalid_field", "`client_ref` must be 1 to 100 characters", field="client_ref"
        )
    express = params.get("express")
    if express is not None and express not in ("true", "false"):
        raise ProblemError(422, "invalid_field", "`express` must be true or false", field="express")
    created_from, created_to = _range(params, "created_from", "created_to")
    cursor = params.get("cursor")
    return MessageQuery(
        limit=_limit(params),
        status=status,
        to=to,
        client_ref=client_ref,
        express=None if express is None else express == "true",
        created_from=created_from,
        created_to=created_to,
        after=None if cursor is None else decode_cursor(cursor),
    )


# --- routes -------------------------------------------------------------------------------


@bp.get("/v1/messages")
async def list_messages() -> Response:
    """`{items, next_cursor}`: the account's messages, newest first, each in the shape of
    GET /v1/messages/{id}; `next_cursor` is null on the last page."""
    gw = gateway()
    account_id = await gw.require_account()
    params = _params(
        ("limit", "cursor", "status", "to", "client_ref", "express", "created_from", "created_to")
    )
    query = _message_query(params)
    # One row more than asked: whether it exists says whether there is a next page.
    rows = await gw.reads.messages(
        account_id, msgspec.structs.replace(query, limit=query.limit + 1)
    )
    next_cursor = None
    if len(rows) > query.limit:
        rows = rows[: query.limit]
        next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
    return json_response(
        {"items": [message_view(gw, row) for row in rows], "next_cursor": next_cursor}
    )


@bp.get("/v1/reports/summary")
async def summary() -> Response:
    """Per UTC day or per status, for messages created in [from, to): counts, segments, cost
    (captured: the prices of sent messages) and held (the prices of messages not final).
    `sent` counts every message that reached the operator; `delivered` and `undelivered`
    (from DLRs) are part of it, and `cost` includes both: an undelivered message stays
    charged."""
    gw = gateway()
    account_id = await gw.require_account()
    params = _params(("from", "to", "group_by"))
    created_from, created_to = _range(params, "from", "to")
    group_by = params.get("group_by", "day")
    if group_by not in ("day", "status"):
        raise ProblemError(
            422, "invalid_field", "`group_by` must be day or status", field="group_by"
        )
    grouping: Literal["day", "status"] = "day" if group_by == "day" else "status"
    rows = await gw.reads.summary(account_id, created_from, created_to, grouping)
    totals = {
        name: sum(getattr(r, name) for r in rows)
        for name in SummaryRow.__struct_fields__
        if name != "key"
    }
    return json_response(
        {
            "from": created_from,
            "to": created_to,
            "group_by": grouping,
            "groups": [{grouping: r.key, **_summary_fields(r)} for r in rows],
            "totals": totals,
        }
    )


def _summary_fields(row: SummaryRow) -> dict[str, int]:
    return {name: getattr(row, name) for name in row.__struct_fields__ if name != "key"}


@bp.get("/v1/messages/export")
async def export() -> Response:
    """CSV of the account's messages created in [from, to), oldest first, streamed: the
    gateway reads PostgreSQL in keyset pages of EXPORT_PAGE rows while it writes, so memory
    stays flat whatever the range. Without `to`, the export ends at the moment it started."""
    gw = gateway()
    account_id = await gw.require_account()
    params = _params(("from", "to"))
    created_from, created_to = _range(params, "from", "to")
    if created_to is None:
        created_to = datetime.now(UTC)
    query = MessageQuery(
        limit=EXPORT_PAGE, created_from=created_from, created_to=created_to, ascending=True
    )
    response = Response(
        _csv_pages(gw, account_id, query),
        content_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="messages.csv"'},
    )
    response.timeout = None  # quart's 60 s response timeout would cut long exports short
    return response


async def _csv_pages(gw: Gateway, account_id: int, query: MessageQuery) -> AsyncIterator[bytes]:
    """The header, then one chunk per page. PostgreSQL writes the CSV (COPY): the gateway
    only forwards bytes, so a long export does not hold the event loop."""
    yield (",".join(EXPORT_COLUMNS) + "\n").encode()
    while True:
        data, last = await gw.reads.messages_csv(account_id, query)
        if data:
            yield data
        if last is None:
            return
        query = msgspec.structs.replace(query, after=last)
