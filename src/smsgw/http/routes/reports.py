"""Reports: list an account's messages (filters, cursor pages), summaries, CSV exports.

All three read PostgreSQL directly (one query per page or report, off the accept path), in
(created_at, id) order on the index messages_account_recent. Pages use keyset pagination: the
cursor is the position of the last row returned, so rows inserted between two pages neither
shift nor repeat items, and a deep page costs what the first one does.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec
from quart import Blueprint, Response, request

from smsgw.engine import sms as rules
from smsgw.engine.ports import MessageQuery, SummaryRow
from smsgw.http.context import Gateway, gateway, json_response
from smsgw.http.params import aliased, query_params, text, time_range, whole_number
from smsgw.http.problems import ProblemError
from smsgw.http.routes.messages import message_view

bp = Blueprint("reports", __name__)
log = logging.getLogger("smsgw.http")

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
# 24 bytes in base64url without padding, as encode_cursor writes them (b64decode on its own
# skips characters outside the alphabet).
_CURSOR = re.compile(r"[A-Za-z0-9_-]{32}")


# --- cursors ------------------------------------------------------------------------------


def encode_cursor(created_at: datetime, message_id: str) -> str:
    """An opaque position: created_at in microseconds (PostgreSQL's own precision, so the
    position is exact) and the message id, base64url."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    raw = micros.to_bytes(8, "big", signed=True) + uuid.UUID(message_id).bytes
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        if not _CURSOR.fullmatch(cursor):
            raise ValueError("not a cursor")
        raw = base64.urlsafe_b64decode(cursor)
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


def message_query(params: dict[str, str]) -> MessageQuery:
    """GET /v1/messages' filters and page from its query parameters; 422 naming the first
    bad one."""
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
    client_ref = text(params, "client_ref", max_length=100)
    express = params.get("express")
    if express is not None and express not in ("true", "false"):
        raise ProblemError(422, "invalid_field", "`express` must be true or false", field="express")
    created_from, created_to = time_range(params, "created_from", "created_to")
    cursor = params.get("cursor")
    return MessageQuery(
        limit=whole_number(params, "limit", low=1, high=MAX_LIMIT, default=DEFAULT_LIMIT),
        status=status,
        to=to,
        client_ref=client_ref,
        express=None if express is None else express == "true",
        created_from=created_from,
        created_to=created_to,
        after=None if cursor is None else decode_cursor(cursor),
    )


# The creation-time range, named as on GET /v1/messages; `from` and `to` are the names summary
# and export used before API 2.0.0, still taken (not both names of one end).
RANGE_PARAMS = ("created_from", "created_to", "from", "to")


def created_range(params: dict[str, str]) -> tuple[datetime | None, datetime | None]:
    """[created_from, created_to) of a summary or an export; a problem names the parameter
    as the query gave it."""
    start = aliased(params, "created_from", "from")
    end = aliased(params, "created_to", "to")
    return time_range(params, start, end)


# --- routes -------------------------------------------------------------------------------


@bp.get("/v1/messages")
async def list_messages() -> Response:
    """`{items, next_cursor}`: the account's messages, newest first, each in the shape of
    GET /v1/messages/{id}; `next_cursor` is null on the last page."""
    gw = gateway()
    account_id = await gw.require_account()
    params = query_params(
        request.args,
        ("limit", "cursor", "status", "to", "client_ref", "express", "created_from", "created_to"),
    )
    query = message_query(params)
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
    """Per UTC day or per status, for messages created in [created_from, created_to):
    counts, segments, cost (captured: the prices of sent messages) and held (the prices of
    messages not final). `sent` counts every message that reached the operator; `delivered`
    and `undelivered` (from DLRs) are part of it, and `cost` includes both: an undelivered
    message stays charged."""
    gw = gateway()
    account_id = await gw.require_account()
    params = query_params(request.args, (*RANGE_PARAMS, "group_by"))
    created_from, created_to = created_range(params)
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
            "created_from": created_from,
            "created_to": created_to,
            "from": created_from,  # deprecated: `created_from`
            "to": created_to,  # deprecated: `created_to`
            "group_by": grouping,
            "groups": [{grouping: r.key, **_summary_fields(r)} for r in rows],
            "totals": totals,
        }
    )


def _summary_fields(row: SummaryRow) -> dict[str, int]:
    return {name: getattr(row, name) for name in row.__struct_fields__ if name != "key"}


@bp.get("/v1/messages/export")
async def export() -> Response:
    """CSV of the account's messages created in [created_from, created_to), oldest first,
    streamed: the gateway reads PostgreSQL in keyset pages of EXPORT_PAGE rows while it
    writes, so memory stays flat whatever the range. Without `created_to`, the export ends at
    the moment it started.

    Everything that can be refused is checked before the answer starts, and the first page is
    read before it too: until then a failure is a problem answer like on any route."""
    gw = gateway()
    account_id = await gw.require_account()
    params = query_params(request.args, RANGE_PARAMS)
    created_from, created_to = created_range(params)
    if created_to is None:
        created_to = datetime.now(UTC)
    query = MessageQuery(
        limit=EXPORT_PAGE, created_from=created_from, created_to=created_to, ascending=True
    )
    first = await gw.reads.messages_csv(account_id, query)
    response = Response(
        _csv_pages(gw, account_id, query, first),
        content_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="messages.csv"'},
    )
    response.timeout = None  # quart's 60 s response timeout would cut long exports short
    return response


async def _csv_pages(
    gw: Gateway,
    account_id: int,
    query: MessageQuery,
    page: tuple[bytes, tuple[datetime, str] | None],
) -> AsyncIterator[bytes]:
    """The header, then `page` and every page after it, one chunk each. PostgreSQL writes the
    CSV (COPY): the gateway only forwards bytes, so a long export does not hold the event loop.

    Once the 200 is sent, a failure cannot become a problem answer, and a CSV line saying so
    would be read as a row. So it is logged and raised on: hypercorn then ends the connection
    without the chunked body's last chunk, which HTTP clients report as an incomplete transfer,
    never as a shorter, complete-looking CSV (tests/integration/test_hostile_input.py)."""
    yield (",".join(EXPORT_COLUMNS) + "\n").encode()
    pages = 1
    try:
        while True:
            data, last = page
            if data:
                yield data
            if last is None:
                return
            query = msgspec.structs.replace(query, after=last)
            page = await gw.reads.messages_csv(account_id, query)
            pages += 1
    except Exception:
        log.exception(
            "export for account %d failed after %d pages were read: its body is cut short",
            account_id,
            pages,
        )
        raise
