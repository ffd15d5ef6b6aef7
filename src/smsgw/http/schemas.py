"""Wire schemas: what clients send and get back, validated at the edge by msgspec."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from smsgw.engine.otp import MAX_CODE_LENGTH, MAX_TEMPLATE_LENGTH, MIN_CODE_LENGTH

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Credit = Annotated[int, msgspec.Meta(ge=0, le=10**15)]
Amount = Annotated[int, msgspec.Meta(gt=0, le=10**15)]
ClientRef = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Country = Annotated[str, msgspec.Meta(pattern="^[A-Z]{2}$", description="ISO 3166 alpha-2")]
# `to` and `sender` are checked by the handler against engine/sms.py's rules, with messages a
# person can act on; these patterns only say the same in the OpenAPI document
# (extra_json_schema is not validated by msgspec). tests/unit/test_openapi.py keeps them equal.
Recipient = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": r"^\+[1-9][0-9]{6,14}$"})]
# What `to` takes on a send: E.164, or a national form of the account's country, with
# separators and Persian or Arabic-Indic digits (engine/numbers.py); stored as E.164.
PhoneNumber = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        description=(
            "E.164 (+989121234567), or a national form of the account's `default_country`"
            " (09121234567, 0098 912 123 4567, ۰۹۱۲۱۲۳۴۵۶۷): stored and answered as E.164"
        ),
        examples=["+4915123456789", "09121234567", "+98-912-1234567"],
    ),
]
Sender = Annotated[
    str, msgspec.Meta(extra_json_schema={"pattern": r"^([A-Za-z0-9 ._-]{1,11}|\+?[0-9]{1,15})$"})
]
OtpTemplate = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_TEMPLATE_LENGTH,
        description="the OTP's text, with {code} exactly once (default: 'Your code is {code}')",
    ),
]
CodeLength = Annotated[
    int,
    msgspec.Meta(
        ge=MIN_CODE_LENGTH, le=MAX_CODE_LENGTH, description="digits in the code (default 6)"
    ),
]
# Checked by the handler (engine/otp.py, `ascii_code`), which also takes Persian and
# Arabic-Indic digits; the pattern says the ASCII form in the document.
OtpCode = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=32,
        extra_json_schema={"pattern": f"^[0-9]{{{MIN_CODE_LENGTH},{MAX_CODE_LENGTH}}}$"},
    ),
]


class CreateAccountIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    credit: Credit = 0


class AccountCreatedOut(msgspec.Struct):
    id: int
    name: str
    api_key: str
    balance: int
    # The HMAC key of this account's status callbacks; shown only here and at rotation.
    signing_secret: str = ""


class KeyRotatedOut(msgspec.Struct):
    account_id: int
    api_key: str


class TopUpIn(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount


class BalanceOut(msgspec.Struct):
    balance: int


class AccountOut(msgspec.Struct):
    id: int
    name: str
    balance: int
    held: int
    callback_url: str | None = None


class AccountPatchIn(msgspec.Struct, forbid_unknown_fields=True):
    """Settable account fields; a field left out is left as it is, null clears it."""

    callback_url: CallbackUrl | msgspec.UnsetType | None = msgspec.UNSET


class SigningSecretOut(msgspec.Struct):
    account_id: int
    signing_secret: str


OperatorMessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
MAX_DELIVERY_REPORTS = 10_000


class DeliveryReportIn(msgspec.Struct, forbid_unknown_fields=True):
    operator_message_id: OperatorMessageId
    status: Literal["delivered", "undelivered"]
    error: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class DeliveryReportsIn(msgspec.Struct, forbid_unknown_fields=True):
    reports: Annotated[
        list[DeliveryReportIn], msgspec.Meta(min_length=1, max_length=MAX_DELIVERY_REPORTS)
    ]


class DeliveryResultOut(msgspec.Struct, omit_defaults=True):
    operator_message_id: str
    result: Literal["applied", "duplicate", "conflict", "unknown"]
    message_id: str | None = None
    status: str | None = None


class DeliveryCounts(msgspec.Struct):
    applied: int
    duplicate: int
    conflict: int
    unknown: int


class DeliveryReportsOut(msgspec.Struct):
    results: list[DeliveryResultOut]
    counts: DeliveryCounts


# A bulk message's validity (issue 24): how long after its accept it may still be sent.
MIN_VALIDITY_S = 60
MAX_VALIDITY_S = 72 * 3600
Validity = Annotated[
    int,
    msgspec.Meta(
        ge=MIN_VALIDITY_S,
        le=MAX_VALIDITY_S,
        description=(
            "seconds after the accept the message may still be sent (bulk only; default"
            " 86400): not sent by then, it ends `expired` and its price is refunded"
        ),
    ),
]

# A scheduled send (issue 24): when the message may be sent, up to 30 days ahead. One up to
# SEND_AT_SLACK_S in the past (clocks differ) is sent at once, as one without a send_at is;
# further in the past, or further ahead, it is a 422 naming the field (the handler checks the
# range; msgspec the format and the offset).
MAX_SEND_AHEAD_S = 30 * 86_400
SEND_AT_SLACK_S = 60
SendAt = Annotated[
    datetime,
    msgspec.Meta(
        tz=True,
        description=(
            "when to send it: RFC 3339 with an offset (2026-03-21T09:00:00+03:30), up to 30"
            " days ahead. The message is `scheduled`, its price held at once, and sent within"
            " a second of this time; its `validity` (and an express message's deadline)"
            " counts from it. Up to 60 s in the past: sent now"
        ),
        examples=["2026-03-21T09:00:00+03:30", "2026-03-21T05:30:00Z"],
    ),
]

# Checked by the handler (engine/callbacks.py: http(s); public hosts only in production,
# loopback only outside it).
CallbackUrl = Annotated[
    str,
    msgspec.Meta(
        max_length=2_000,
        description="Where status changes are POSTed, signed (see the callbacks section)",
        extra_json_schema={"format": "uri"},
    ),
]


class SendIn(msgspec.Struct, forbid_unknown_fields=True):
    to: PhoneNumber
    # Required, and not empty, unless `otp` (the gateway writes an OTP's text): the handler
    # says so, naming the field.
    text: Annotated[str, msgspec.Meta(description="required unless `otp`")] = ""
    # None: the account's default sender (else "smsgw"); one the admin allowed it, when it
    # has a list (PUT /v1/accounts/{id}/senders).
    sender: Sender | None = None
    # `sender` by the name the seed gateway's clients use; give one of the two.
    from_: Sender | None = msgspec.field(default=None, name="from")
    express: bool = False
    client_ref: ClientRef | None = None
    callback_url: CallbackUrl | None = None
    # Bulk only: an express message's deadline ends it (the handler says so, naming the field).
    validity: Validity | None = None
    # Scheduled: not with `wait` or `otp` (the handler says so, naming the field).
    send_at: SendAt | None = None
    # Express only: answer once the operator took it (200, status sent) or the deadline passed
    # (504, failed and refunded), instead of 202 at accept.
    wait: bool = False
    # A one-time code (engine/otp.py): the gateway makes the code and the text from
    # `template`, sends it express and answers as `wait` does, with the code.
    otp: bool = False
    template: OtpTemplate | None = None
    code_length: CodeLength | None = None


class OtpVerifyIn(msgspec.Struct, forbid_unknown_fields=True):
    to: PhoneNumber
    code: OtpCode


class OtpVerifyOut(msgspec.Struct, omit_defaults=True):
    """`valid` once for the right code; `reason` says why not (engine/ports.py, OtpVerdict)."""

    valid: bool
    reason: Literal["mismatch", "too_many_attempts", "expired", "no_code"] | None = None


class AcceptedOut(msgspec.Struct):
    id: str
    status: str
    segments: int
    price: int


Price = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class AccountSettingsIn(msgspec.Struct, forbid_unknown_fields=True):
    """An account's scheduling and rate settings; a missing or null field is the default."""

    send_rate: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None
    express_deadline_ms: Annotated[int, msgspec.Meta(ge=100, le=600_000)] | None = None
    recipient_limit_per_hour: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    api_rate: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None
    # Whose national number forms `to` takes (ISO 3166 alpha-2); null: the node's
    # (`serve --default-country`, IR unless set).
    default_country: Country | None = None
    # The account's own prices, smallest currency unit; null: the node's
    # (`serve --price-per-segment`, `--express-surcharge`).
    price_per_segment: Price | None = None
    express_surcharge: Price | None = None


class AccountSettingsOut(msgspec.Struct):
    account_id: int
    send_rate: float | None
    express_deadline_ms: int | None
    recipient_limit_per_hour: int | None
    api_rate: float | None
    default_country: str | None = None
    price_per_segment: int | None = None
    express_surcharge: int | None = None


class AccountAdminOut(msgspec.Struct):
    """An account as the gateway's admin sees it."""

    id: int
    name: str
    balance: int
    held: int
    captured: int
    topped_up: int
    created_at: str  # RFC 3339, UTC
    suspended: bool
    suspended_at: str | None  # since when (RFC 3339, UTC); null: not suspended
    callback_url: str | None
    settings: AccountSettingsOut
    senders: list[str]
    default_sender: str | None


class AccountsPage(msgspec.Struct):
    items: list[AccountAdminOut]
    next_cursor: str | None  # null: the last page


MAX_SENDERS = 100


class SendersIn(msgspec.Struct, forbid_unknown_fields=True):
    """The senders an account may use (empty: any valid sender, as without a list), and the
    one a send without `sender` uses (null: the first of `senders`, else "smsgw")."""

    senders: Annotated[list[Sender], msgspec.Meta(max_length=MAX_SENDERS)]
    default: Sender | None = None


class SendersOut(msgspec.Struct):
    """The account's senders (empty: any valid sender) and `default`, the sender a send
    without one uses."""

    account_id: int
    senders: list[str]
    default: str


MAX_NUMBERS = 1_000


class NumbersIn(msgspec.Struct, forbid_unknown_fields=True):
    """Numbers for an opt-out list or the blocklist, each as `to` takes it."""

    numbers: Annotated[list[PhoneNumber], msgspec.Meta(min_length=1, max_length=MAX_NUMBERS)]


class NumbersAddedOut(msgspec.Struct):
    """`numbers`: the request's numbers as stored (E.164), in order; `added`: how many of
    them were not on the list yet."""

    added: int
    numbers: list[str]


class ListedNumberOut(msgspec.Struct):
    number: str
    created_at: datetime


class NumbersPage(msgspec.Struct):
    """One page of a list, in number order; `next_cursor` is null on the last page."""

    items: list[ListedNumberOut]
    next_cursor: str | None


MAX_BATCH = 1_000


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    # Items stay raw here: each is decoded on its own, so one bad item gets its own problem
    # result instead of failing the batch.
    messages: list[msgspec.Raw]
    atomic: bool = False
    # The `send_at` of every item without its own.
    send_at: SendAt | None = None


class BatchItemsIn(msgspec.Struct, forbid_unknown_fields=True):
    """BatchIn with its items decoded in the same pass: the fast path for a batch whose items
    are all well-formed (nearly every batch). Any error falls back to BatchIn, which gives
    each bad item its own problem."""

    messages: list[SendIn]
    atomic: bool = False
    send_at: SendAt | None = None


class BatchItemError(msgspec.Struct, omit_defaults=True):
    """Why a batch item was not stored: `code` is what a single send of it would have answered
    (`invalid_field`, `insufficient_credit`, `recipient_rate_limited`, ...), `status` that
    answer's HTTP status, `field` the item's field at fault (null when none)."""

    code: str
    field: str | None
    detail: str
    status: int
    retry_after: int | None = None  # 429 and 503: seconds until the item may be sent again
    price: int | None = None  # insufficient_credit: the item's price


class BatchResultOut(msgspec.Struct, omit_defaults=True):
    """One item of a batch, at its `index` in the request. `queued`: stored now, with its new
    `id`, `segments` and `price`; `scheduled`: the same, to be sent at its `send_at` (the
    item's, else the batch's). `duplicate`: the account already has a message with this
    item's `client_ref`; nothing new is stored and `id` is that message's (a single send
    answers 200 with it). `rejected`: not stored, `error` says why."""

    index: int
    status: Literal["queued", "scheduled", "duplicate", "rejected"]
    id: str | None = None
    segments: int | None = None
    price: int | None = None
    error: BatchItemError | None = None


class BatchOut(msgspec.Struct):
    """POST /v1/messages/batch: one result per item, in order, and how many of each kind
    (`accepted`: queued or scheduled; `accepted` + `duplicates` + `rejected` is the number of
    items)."""

    results: list[BatchResultOut]
    accepted: int
    duplicates: int
    rejected: int


class ClusterNodeOut(msgspec.Struct):
    """One node that shares the database: `alive` while its heartbeat is younger than the
    lease ttl; `shards` it leases now, `expired_shards` it held when it stopped renewing."""

    id: str
    host: str
    pid: int
    url: str | None
    alive: bool
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float
    shards: int
    expired_shards: int


class ClusterOut(msgspec.Struct):
    node_id: str  # the node that answered
    shards: int
    unowned_shards: int  # free, or expired and not yet taken over
    handoffs_waiting: int  # messages accepted elsewhere, not yet claimed by their shard's owner
    nodes: list[ClusterNodeOut]
    # PostgreSQL's notification queue, 0 to 1 (pg_notification_queue_usage): NOTIFYs fail when
    # it is full. It grows while a LISTEN session reads nothing (a paused node's is ended
    # when its shards are taken over).
    notify_queue_usage: float = 0.0


# --- answers described by the OpenAPI document, which handlers write as dicts ----------------

MAX_ID = 2**63 - 1  # ids are PostgreSQL bigints
AccountId = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
OperatorName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,100}$")]
MessageId = Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]
# A page's size and position, as every paged route takes them (query parameters).
PageLimit = Annotated[int, msgspec.Meta(ge=1, le=1_000)]
PageCursor = Annotated[str, msgspec.Meta(description="`next_cursor` of the previous page")]


class Problem(msgspec.Struct):
    """An RFC 9457 problem: every 4xx and 5xx answer. `code` is stable and machine-readable;
    `detail` says what to do. Some problems carry more members (listed, all optional)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    field: str | None = None  # the request field or parameter at fault
    price: int | None = None  # 402: the price that could not be held
    balance: int | None = None  # 402: the balance at the time
    retry_after: int | None = None  # 429: seconds until the next request is allowed
    max_items: int | None = None  # 413 for a batch: the most items a batch may hold
    # 422 for an atomic batch: each invalid item's problem (deprecated: `results`).
    errors: list[dict[str, Any]] | None = None
    # A batch's 422 (`nothing_accepted`, and an atomic batch's `invalid_batch`): every item's
    # result and the counts, as a 202 answer has them.
    results: list[BatchResultOut] | None = None
    accepted: int | None = None
    duplicates: int | None = None
    rejected: int | None = None
    # `"wait": true` answers that are not 200: the message, its status and whether its hold
    # was released.
    message_id: str | None = None
    message_status: str | None = None
    refunded: bool | None = None


Timestamp = Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})]
# `scheduled`: waiting for its send_at (price held); `expired`: not sent within its validity;
# `cancelled`: cancelled while scheduled or queued (both refunded).
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


class MessageOut(msgspec.Struct):
    """One message as its account sees it (GET /v1/messages/{message_id})."""

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
    # When it is to be sent, if it was accepted scheduled (null: at once).
    send_at: Timestamp | None = None
    # When an operator took it, and when a receipt said it was delivered (null: not yet).
    sent_at: Timestamp | None = None
    delivered_at: Timestamp | None = None


class MessageEvent(msgspec.Struct, omit_defaults=True):
    """One thing that happened to a message, with the fields of its `type`:

    - `accepted`: stored, its price held (`created_at`); `scheduled`: to be sent at `send_at`.
    - `attempt`: one try at `operator`, its number `attempt`; `result` `sent`, `temporary`
      (tried again later, unless out of tries or time) or `permanent` (refused for good),
      with the operator's `reason` for a failure.
    - `sent` (`operator`, `operator_message_id`), `failed`, `expired` (`reason`), `cancelled`.
    - `receipt`: the operator's delivery report, `status` `delivered` or `undelivered` (with its
      error as `reason`).
    - `callback`: one delivery of the status callback `delivery_id`, announcing `status`, its
      `attempt`; `http_status` when the receiver answered, `error` when it was not delivered.
    """

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


class MessageEventsOut(msgspec.Struct):
    """GET /v1/messages/{message_id}/events: the message's history, oldest first."""

    message_id: str
    events: list[MessageEvent]


class CancelledOut(msgspec.Struct):
    """A message cancelled while scheduled or queued (POST /v1/messages/{message_id}/cancel):
    its hold, `refunded`, is back in the balance."""

    id: str
    status: Literal["cancelled"]
    refunded: int


class OtpSentOut(MessageOut, kw_only=True):
    """A sent one-time code (POST /v1/messages with `otp`): the message as GET shows it from
    now on (`text` with the code's digits as '*'), and the code, shown only here."""

    code: str


SENT_ANSWERS = (MessageOut, OtpSentOut)


class HealthOut(msgspec.Struct):
    status: Literal["ok"]


class ReadyOut(msgspec.Struct):
    status: Literal["ready"]
    recovered: int  # messages recovered at start


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /v1/messages/batch. The handler decodes each item on its own as a `SendIn`."""

    messages: Annotated[list[SendIn], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]
    atomic: bool = False
    # The `send_at` of every item without its own (a bad one refuses the whole batch).
    send_at: SendAt | None = None


class MessagePage(msgspec.Struct):
    """GET /v1/messages: one page, newest first; `next_cursor` is null on the last page."""

    items: list[MessageOut]
    next_cursor: str | None


class SummaryGroup(msgspec.Struct):
    """One group of a summary: a day (YYYY-MM-DD, in the summary's `tz`), a status, an
    operator (null: not sent to one yet), a sender or a country calling code (`98`); `cost`
    is captured credit."""

    messages: int
    sent: int  # reached the operator: sent, delivered or undelivered
    failed: int  # refunded: failed, expired or cancelled
    pending: int  # not final: scheduled, queued or sending
    segments: int
    cost: int
    held: int
    delivered: int  # of `sent`
    undelivered: int  # of `sent`: still charged
    expired: int  # of `failed`: not sent within its validity
    cancelled: int  # of `failed`: cancelled while scheduled or queued
    scheduled: int  # of `pending`: waiting for its send_at
    day: str | None = None  # group_by=day
    status: str | None = None  # group_by=status
    operator: str | None = None  # group_by=operator
    sender: str | None = None  # group_by=sender
    country: str | None = None  # group_by=country


class SummaryTotals(msgspec.Struct):
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


class SummaryOut(msgspec.Struct):
    """GET /v1/reports/summary. `from` and `to` repeat `created_from` and `created_to`
    (deprecated: the names before 2.0.0)."""

    created_from: Timestamp | None
    created_to: Timestamp | None
    from_: Timestamp | None = msgspec.field(name="from")
    to: Timestamp | None
    group_by: Literal["day", "status", "operator", "sender", "country"]
    groups: list[SummaryGroup]
    totals: SummaryTotals
    tz: str = "UTC"  # the time zone of group_by=day's days


class StatementEntryOut(msgspec.Struct):
    """One credit move of the account (GET /v1/account/statement). `kind`: `topup` (adds to
    the balance), `hold` (a message's price, taken from the balance at its accept), `capture`
    (an operator took the message: its hold is charged, the balance unchanged) or `release`
    (the message failed, expired or was cancelled: its hold is back in the balance).
    `amount`: the money moved, in the smallest currency unit (a message's price, as its 202
    said); `balance_after`: the account's balance once this entry applied; `message_id`: the
    message whose price it is (null for a top-up, and for a group of messages recorded before
    statements were kept); `at`: when it was committed."""

    kind: Literal["topup", "hold", "capture", "release"]
    amount: int
    balance_after: int
    message_id: MessageId | None
    at: Timestamp


class StatementPage(msgspec.Struct):
    """A page of the statement, newest first; `next_cursor` is null on the last page. Each
    entry's `balance_after` less its effect (a hold lowered the balance by its `amount`, a
    release or top-up raised it, a capture left it) is the next entry's `balance_after`."""

    items: list[StatementEntryOut]
    next_cursor: str | None
