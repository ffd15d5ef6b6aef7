"""What the API sends and takes, as msgspec Structs checked against the OpenAPI document.

Each answer Struct mirrors one schema of `GET /openapi.json` (named in its docstring):
tests/integration/test_client_contract.py fails when a field, its type or whether it is
required differs. Decoding ignores fields the client does not know, so a newer gateway that
adds some does not break an older client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

# RFC 3339 with an offset; the format is stated so the Structs' schema matches the document's.
Timestamp = Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})]
MessageStatus = Literal[
    "scheduled",
    "queued",
    "sending",
    "sent",
    "failed",
    "delivered",
    "undelivered",
    "expired",
    "cancelled",
]


class OutgoingMessage(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """One message to send (schema `SendIn`, without `wait`): an item of `batch`."""

    to: str  # E.164: "+4915123456789"
    text: str
    sender: str | None = None
    express: bool = False
    client_ref: str | None = None  # the account's own id for it: a second send is a duplicate
    callback_url: str | None = None
    validity: int | None = None  # seconds (bulk): not sent within it, it ends `expired`
    # When to send it (aware, up to 30 days ahead): it is `scheduled` until then.
    send_at: Timestamp | None = None


class Cancelled(msgspec.Struct):
    """A message cancelled while scheduled or queued (schema `CancelledOut`)."""

    id: str
    status: Literal["cancelled"]
    refunded: int


class Accepted(msgspec.Struct):
    """A message just stored (schema `AcceptedOut`)."""

    id: str
    status: str
    segments: int
    price: int


class Message(msgspec.Struct):
    """One message as its account sees it (schema `MessageOut`)."""

    id: str
    to: str
    sender: str
    text: str
    status: MessageStatus
    reason: str | None
    segments: int
    price: int
    express: bool
    attempts: int
    operator: str | None
    operator_message_id: str | None
    client_ref: str | None
    created_at: Timestamp
    updated_at: Timestamp
    callback_url: str | None = None
    send_at: Timestamp | None = None  # when it is to be sent, if it was scheduled
    sent_at: Timestamp | None = None  # when an operator took it
    delivered_at: Timestamp | None = None  # when a receipt said it was delivered


class MessageEvent(msgspec.Struct):
    """One thing that happened to a message (schema `MessageEvent`): `type` says which, and
    which of the other fields it has (README: "A message's history")."""

    type: Literal[
        "accepted",
        "scheduled",
        "attempt",
        "sent",
        "failed",
        "expired",
        "cancelled",
        "receipt",
        "callback",
    ]
    at: Timestamp
    send_at: Timestamp | None = None
    attempt: int | None = None
    operator: str | None = None
    result: Literal["sent", "temporary", "permanent"] | None = None
    operator_message_id: str | None = None
    status: MessageStatus | None = None
    reason: str | None = None
    delivery_id: int | None = None
    http_status: int | None = None
    error: str | None = None


class MessageEvents(msgspec.Struct):
    """A message's history, oldest first (schema `MessageEventsOut`)."""

    message_id: str
    events: list[MessageEvent]


class MessagePage(msgspec.Struct):
    """A page of messages, newest first (schema `MessagePage`); `next_cursor` is None on the
    last page."""

    items: list[Message]
    next_cursor: str | None


class BatchItemError(msgspec.Struct):
    """Why a batch item was not stored (schema `BatchItemError`): `code` and `status` are what
    a single send of it would have answered."""

    code: str
    field: str | None
    detail: str
    status: int
    retry_after: int | None = None
    price: int | None = None


class BatchResult(msgspec.Struct):
    """One item of a batch (schema `BatchResultOut`): `queued` (stored now), `scheduled`
    (stored, sent at its `send_at`), `duplicate` (its client_ref was used already; `id` is
    that message's) or `rejected` (`error` says why)."""

    index: int
    status: Literal["queued", "scheduled", "duplicate", "rejected"]
    id: str | None = None
    segments: int | None = None
    price: int | None = None
    error: BatchItemError | None = None


class BatchResponse(msgspec.Struct):
    """A batch's answer (schema `BatchOut`): one result per item, in order, and the counts."""

    results: list[BatchResult]
    accepted: int
    duplicates: int
    rejected: int


class SummaryGroup(msgspec.Struct):
    """One day, status, operator, sender or country of a summary (schema `SummaryGroup`)."""

    messages: int
    sent: int
    failed: int
    pending: int
    segments: int
    cost: int
    held: int
    delivered: int
    undelivered: int
    expired: int
    cancelled: int
    scheduled: int
    day: str | None = None
    status: str | None = None
    operator: str | None = None
    sender: str | None = None
    country: str | None = None


class SummaryTotals(msgspec.Struct):
    """A summary's totals (schema `SummaryTotals`)."""

    messages: int
    sent: int
    failed: int
    pending: int
    segments: int
    cost: int
    held: int
    delivered: int
    undelivered: int
    expired: int
    cancelled: int
    scheduled: int


class Summary(msgspec.Struct):
    """Counts and credit per day, status, operator, sender or country (schema `SummaryOut`,
    without its deprecated `from` and `to`)."""

    created_from: Timestamp | None
    created_to: Timestamp | None
    group_by: Literal["day", "status", "operator", "sender", "country"]
    groups: list[SummaryGroup]
    totals: SummaryTotals
    tz: str = "UTC"  # the time zone of the days (older servers: UTC, unnamed)


class Account(msgspec.Struct):
    """The calling account (schema `AccountOut`)."""

    id: int
    name: str
    balance: int
    held: int
    callback_url: str | None = None


class AccountCreated(msgspec.Struct):
    """A new account, its API key and signing secret shown only here (schema
    `AccountCreatedOut`)."""

    id: int
    name: str
    api_key: str
    balance: int
    signing_secret: str = ""


class Balance(msgspec.Struct):
    """An account's balance after a top-up (schema `BalanceOut`)."""

    balance: int


class StatusCallback(msgspec.Struct):
    """The body of a status callback (not in the OpenAPI document: the gateway POSTs it to
    the account's URL). `delivery_id` is the same on every retry: dedupe on it."""

    event: str
    delivery_id: int
    message_id: str
    status: str
    reason: str | None
    client_ref: str | None
    at: Timestamp
