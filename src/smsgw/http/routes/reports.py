"""Reports: list an account's messages (filters, cursor pages), summaries, CSV exports.

All three read PostgreSQL directly (one query per page or report, off the accept path), in
(created_at, id) order on the index messages_account_recent. Pages use keyset pagination: the
cursor is the position of the last row returned, so rows inserted between two pages neither
shift nor repeat items, and a deep page costs what the first one does.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
import zoneinfo
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import msgspec
from quart import Response

from smsgw.engine import sms as rules
from smsgw.engine.ports import MessageQuery, SummaryRow
from smsgw.http.api import Api, Content
from smsgw.http.context import Gateway, gateway, json_response
from smsgw.http.params import aliased, cursor_bytes, cursor_of, invalid_cursor, time_range
from smsgw.http.problems import ProblemError
from smsgw.http.routes.messages import message_view
from smsgw.http.schemas import (
    ClientRef,
    MessagePage,
    PageCursor,
    PageLimit,
    Recipient,
    SummaryOut,
)

api = Api("reports", __name__, tag="reports")
log = logging.getLogger("smsgw.http")

DEFAULT_LIMIT = 100
EXPORT_PAGE = 5_000
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
    "send_at",
    "sent_at",
    "delivered_at",
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
    return cursor_of(micros.to_bytes(8, "big", signed=True) + uuid.UUID(message_id).bytes)


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    raw = cursor_bytes(cursor) if _CURSOR.fullmatch(cursor) else None
    if raw is None:
        raise invalid_cursor()
    try:
        micros = int.from_bytes(raw[:8], "big", signed=True)
        return _EPOCH + timedelta(microseconds=micros), str(uuid.UUID(bytes=raw[8:]))
    except (ValueError, OverflowError):
        raise invalid_cursor() from None


# --- query parameters ---------------------------------------------------------------------

# As stored (`sending` is never written); `delivered` and `undelivered` come from DLRs.
Status = Literal[
    "scheduled", "queued", "sent", "failed", "delivered", "undelivered", "expired", "cancelled"
]
CreatedFrom = Annotated[datetime, msgspec.Meta(tz=True, description="inclusive")]
CreatedTo = Annotated[datetime, msgspec.Meta(tz=True, description="exclusive")]
CreatedToOrNow = Annotated[datetime, msgspec.Meta(tz=True, description="exclusive; default: now")]
# Summary and export before API 2.0.0 named their range `from` and `to`; still taken, not
# both names of one end.
OldFrom = Annotated[
    datetime,
    msgspec.Meta(
        tz=True,
        description="deprecated: `created_from`",
        extra_json_schema={"deprecated": True},
    ),
]
OldTo = Annotated[
    datetime,
    msgspec.Meta(
        tz=True, description="deprecated: `created_to`", extra_json_schema={"deprecated": True}
    ),
]
OLD_RANGE = (
    "`from` and `to` are the deprecated names of `created_from` and `created_to` (before API"
    " 2.0.0); give one name for each end."
)


class ListQuery(msgspec.Struct, frozen=True):
    """GET /v1/messages: the filters and the page."""

    limit: PageLimit = DEFAULT_LIMIT
    cursor: PageCursor | None = None
    status: Status | None = None
    to: Recipient | None = None
    client_ref: ClientRef | None = None
    express: bool | None = None
    created_from: CreatedFrom | None = None
    created_to: CreatedTo | None = None


Grouping = Literal["day", "status", "operator", "sender", "country"]
TimeZone = Annotated[
    str,
    msgspec.Meta(
        max_length=64,
        description="an IANA time zone (`Asia/Tehran`): the zone of group_by=day's days",
    ),
]


class SummaryQuery(msgspec.Struct, frozen=True):
    """GET /v1/reports/summary: the range, the grouping and the time zone of days."""

    created_from: CreatedFrom | None = None
    created_to: CreatedTo | None = None
    group_by: Grouping = "day"
    tz: TimeZone = "UTC"
    from_: OldFrom | None = msgspec.field(default=None, name="from")
    to: OldTo | None = None


class ExportQuery(msgspec.Struct, frozen=True):
    """GET /v1/messages/export: the range; without its end, until the export starts."""

    created_from: CreatedFrom | None = None
    created_to: CreatedToOrNow | None = None
    from_: OldFrom | None = msgspec.field(default=None, name="from")
    to: OldTo | None = None


def message_query(query: ListQuery) -> MessageQuery:
    """GET /v1/messages' filters and page, checked beyond what the query's types say; 422
    naming the first bad parameter."""
    if query.to is not None:
        problem = rules.recipient_problem(query.to)
        if problem:
            raise ProblemError(
                422,
                "invalid_field",
                f"`to` {problem} (in a query string, write + as %2B)",
                field="to",
            )
    created_from, created_to = time_range(
        "created_from", query.created_from, "created_to", query.created_to
    )
    return MessageQuery(
        limit=query.limit,
        status=query.status,
        to=query.to,
        client_ref=query.client_ref,
        express=query.express,
        created_from=created_from,
        created_to=created_to,
        after=None if query.cursor is None else decode_cursor(query.cursor),
    )


def created_range(
    query: SummaryQuery | ExportQuery,
) -> tuple[datetime | None, datetime | None]:
    """[created_from, created_to) of a summary or an export; a problem names the parameter
    as the query gave it."""
    start, low = aliased("created_from", query.created_from, "from", query.from_)
    end, high = aliased("created_to", query.created_to, "to", query.to)
    return time_range(start, low, end, high)


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones() | {"UTC"})


def time_zone(name: str) -> str:
    """`name` if it is an IANA time zone; else 422 naming `tz`."""
    if name not in _zones():
        raise ProblemError(
            422,
            "invalid_field",
            f"`tz` must be an IANA time zone such as `Asia/Tehran` or `UTC`, not {name!r}",
            field="tz",
        )
    return name


# --- routes -------------------------------------------------------------------------------


@api.route(
    "GET",
    "/v1/messages",
    "The calling account's messages, newest first, a page at a time",
    query=ListQuery,
    responses={200: MessagePage},
)
async def list_messages() -> Response:
    """`{items, next_cursor}`: the account's messages, newest first, each in the shape of
    GET /v1/messages/{id}; `next_cursor` is null on the last page."""
    gw = gateway()
    account_id = await gw.require_account()
    query = message_query(gw.query(ListQuery))
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


@api.route(
    "GET",
    "/v1/reports/summary",
    "Counts and credit per day, status, operator, sender or country",
    query=SummaryQuery,
    responses={200: SummaryOut},
    description="Messages created in [created_from, created_to), exact to the microsecond;"
    " days are those of `tz` (default UTC). `country` is the recipient's country calling code"
    " (`98`, `1`); `operator` is null for messages not sent to one yet. " + OLD_RANGE,
)
async def summary() -> Response:
    """Per day (in `tz`, default UTC), status, operator, sender or country calling code, for
    messages created in [created_from, created_to): counts, segments, cost (captured: the
    prices of sent messages) and held (the prices of messages not final). `sent` counts every
    message that reached the operator; `delivered` and `undelivered` (from DLRs) are part of
    it, and `cost` includes both: an undelivered message stays charged. `failed` counts every
    refunded message: `expired` and `cancelled` are part of it. Read from the rollups kept by
    the group commit, plus the messages of the partial 15-minute buckets at the range's ends:
    exact, and as fast for a month as for a day."""
    gw = gateway()
    account_id = await gw.require_account()
    query = gw.query(SummaryQuery)
    created_from, created_to = created_range(query)
    tz = time_zone(query.tz)
    grouping = query.group_by
    rows = await gw.reads.summary(account_id, created_from, created_to, grouping, tz)
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
            "tz": tz,
            "groups": [{grouping: r.key, **_summary_fields(r)} for r in rows],
            "totals": totals,
        }
    )


def _summary_fields(row: SummaryRow) -> dict[str, int]:
    return {name: getattr(row, name) for name in row.__struct_fields__ if name != "key"}


@api.route(
    "GET",
    "/v1/messages/export",
    "The calling account's messages as CSV, oldest first, streamed",
    query=ExportQuery,
    responses={200: Content("text/csv", {"type": "string"})},
    description="Messages created in [created_from, created_to). " + OLD_RANGE,
)
async def export() -> Response:
    """CSV of the account's messages created in [created_from, created_to), oldest first,
    streamed: the gateway reads PostgreSQL in keyset pages of EXPORT_PAGE rows while it
    writes, so memory stays flat whatever the range. Without `created_to`, the export ends at
    the moment it started.

    Everything that can be refused is checked before the answer starts, and the first page is
    read before it too: until then a failure is a problem answer like on any route."""
    gw = gateway()
    account_id = await gw.require_account()
    created_from, created_to = created_range(gw.query(ExportQuery))
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
