"""The OpenAPI 3.1 document: built from a route table and the msgspec Structs the handlers use.

Why msgspec's own `msgspec.json.schema_components` and not quart-schema: the handlers already
decode and encode with msgspec Structs (`http/schemas.py`), and msgspec writes JSON Schema
2020-12, which OpenAPI 3.1 uses as is. quart-schema would describe the same bodies a second
time with pydantic models or dataclasses, and two schema systems drift apart. Here a Struct
is declared once and is both what the handler validates and what the document says.

Adding a route: append a `Route` to `ROUTES` (grouped by area, below) saying its method,
path (OpenAPI style: `/v1/messages/{message_id}`), who may call it (`auth`), its request
Struct, its success responses by status, and any problem statuses beyond the ones its shape
implies (see `Route.problem_statuses`). `tests/integration/test_openapi.py` fails when a
registered URL rule has no row here, or a row no rule; `test_schemathesis.py` then checks the
running app against the document.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from smsgw.engine.messages import SupervisorStatus
from smsgw.http.console import ConsoleOut, DrainOut
from smsgw.http.problems import TITLES
from smsgw.http.schemas import (
    MAX_BATCH,
    AcceptedOut,
    AccountAdminOut,
    AccountCreatedOut,
    AccountOut,
    AccountPatchIn,
    AccountSettingsIn,
    AccountSettingsOut,
    AccountsPage,
    BalanceOut,
    BatchOut,
    BatchResultOut,
    ClientRef,
    ClusterOut,
    CreateAccountIn,
    DeliveryReportsIn,
    DeliveryReportsOut,
    KeyRotatedOut,
    NumbersAddedOut,
    NumbersIn,
    NumbersPage,
    OtpVerifyIn,
    OtpVerifyOut,
    Recipient,
    SendersIn,
    SendersOut,
    SendIn,
    SigningSecretOut,
    TopUpIn,
)

Auth = Literal["none", "account", "admin", "operator"]
REF = "#/components/schemas/{name}"
API_VERSION = "2.2.0"
# What changed in each version of the HTTP contract, newest first (info.description).
CHANGES = (
    (
        "2.2.0",
        'One-time codes: POST /v1/messages with `"otp": true` (and `template`, `code_length`'
        " instead of `text`, which is now required only without `otp`) sends a code the"
        " gateway makes, express, and answers as `wait` does with the `code`;"
        " POST /v1/otp/verify checks one.",
    ),
    (
        "2.1.0",
        "`to` takes national forms of the account's `default_country` (a new setting; IR"
        " unless set) with separators and Persian or Arabic-Indic digits, stored and answered"
        " as E.164; an E.164 `to` must have a length its country's plan allows. `from` is an"
        " alias of `sender`. PUT /v1/accounts/{account_id}/senders limits an account to the"
        " senders the admin allows (422 `sender_not_allowed`) and sets its default sender."
        " Opt-outs (/v1/account/opt-outs) and the gateway's blocklist (/v1/blocklist): a send"
        " to such a number is a 422 `opted_out` (a batch item `rejected` with that code).",
    ),
    (
        "2.0.0",
        "POST /v1/messages/batch answers one result shape, `{index, status: queued | duplicate"
        " | rejected, id?, segments?, price?, error?: {code, field, detail, status,"
        " retry_after?, price?}}`, with the counts `accepted`, `duplicates` and `rejected`"
        " (before: an accepted item without `index`, a refused one as a problem with an"
        " integer `status`). 202 when any item was stored, 200 when none was but some"
        " `client_ref`s were already used (those items are `duplicate`, with the existing"
        " message's `id`, as a single send answers 200 with it; before: a 409 problem item),"
        " 422 problem `nothing_accepted` carrying the same members when every item was refused"
        " (before: 202). An atomic batch whose every `client_ref` is taken answers 200 with"
        " each item `duplicate` (before: 409); its 422 `invalid_batch` carries `results` too."
        " GET /v1/reports/summary and GET /v1/messages/export take `created_from` and"
        " `created_to`, as GET /v1/messages does; their old names `from` and `to` are"
        " deprecated aliases (one name per end), and the summary answers `created_from` and"
        " `created_to` beside the deprecated `from` and `to`. Status callbacks are signed as"
        " Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`); the"
        " `X-Smsgw-*` signature headers are deprecated.",
    ),
    ("1.0.0", "The first published contract."),
)
MAX_ID = 2**63 - 1  # ids are PostgreSQL bigints


# --- response and parameter shapes ------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    """A body that is not a JSON Struct: `schema` is a JSON Schema dict (its `$ref`s may name
    any Struct in `refs`, which are then added to the components) or None for any body."""

    media_type: str
    schema: dict[str, Any] | None = None
    refs: tuple[type, ...] = ()


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter; `schema` is a type msgspec can describe (with
    `Annotated[..., msgspec.Meta(...)]` constraints) or a JSON Schema dict."""

    name: str
    location: Literal["path", "query", "header"]
    schema: Any = str
    required: bool = False
    description: str = ""
    deprecated: bool = False


def query_params(kind: type[msgspec.Struct]) -> tuple[Param, ...]:
    """A query Struct's fields as query parameters, so a handler that converts `request.args`
    into `kind` (msgspec.convert(..., strict=False)) and the document cannot disagree."""
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    hints = typing.get_type_hints(kind, include_extras=True)
    return tuple(Param(f.encode_name, "query", hints[f.name], f.required) for f in info.fields)


@dataclass(frozen=True)
class Route:
    """One operation. `responses` maps each success status to a Struct type, a `Content`, or
    None (no body). Problem statuses (application/problem+json) are added by
    `problem_statuses`; `problems` names any others the handler raises."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str
    summary: str
    tag: str
    auth: Auth = "account"
    request: Any = None  # a Struct type, or a Content
    responses: Mapping[int, Any] = field(default_factory=lambda: {200: None})
    problems: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()
    # Takes an Idempotency-Key header (http/idempotency.py). None: POST routes of accounts.
    idempotent: bool | None = None
    description: str = ""
    operation_id: str = ""
    # An example request body (the document's media type `example`; schemathesis sends it in
    # its explicit phase, so a route whose valid bodies random generation rarely hits, such
    # as a send's `to`, is still reached).
    example: Any = None
    # More example bodies by name, for a route whose bodies take several shapes (with them,
    # the document has the media type's `examples`, `example` among them as "default").
    examples: Mapping[str, Any] = field(default_factory=dict)

    @property
    def takes_idempotency_key(self) -> bool:
        if self.idempotent is None:
            return self.method == "POST" and self.auth == "account"
        return self.idempotent

    def problem_statuses(self) -> list[int]:
        """Every problem status this route can answer, from its shape and `problems`."""
        statuses = {500, *self.problems}
        if self.auth != "none":
            statuses |= {401, 403}
        if self.auth == "account":
            statuses.add(429)  # the per-account request rate
        if self.request is not None:
            statuses |= {400, 413, 415, 422}
        if any(p.location == "path" for p in self.params) or "{" in self.path:
            statuses.add(404)
        if any(p.location == "query" for p in self.params):
            statuses.add(422)
        if self.takes_idempotency_key:
            statuses |= {409, 422}
        return sorted(statuses)


# --- schemas the document needs beyond http/schemas.py ----------------------------------------


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


class MessageOut(msgspec.Struct):
    """One message as its account sees it (GET /v1/messages/{message_id})."""

    id: str
    to: str
    sender: str
    text: str
    status: Literal["queued", "sending", "sent", "failed", "delivered", "undelivered"]
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


class MessagePage(msgspec.Struct):
    """GET /v1/messages: one page, newest first; `next_cursor` is null on the last page."""

    items: list[MessageOut]
    next_cursor: str | None


class SummaryGroup(msgspec.Struct):
    """One day (YYYY-MM-DD, UTC) or one status of a summary; `cost` is captured credit."""

    messages: int
    sent: int  # reached the operator: sent, delivered or undelivered
    failed: int
    pending: int
    segments: int
    cost: int
    held: int
    delivered: int  # of `sent`
    undelivered: int  # of `sent`: still charged
    day: str | None = None  # group_by=day
    status: str | None = None  # group_by=status


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


class SummaryOut(msgspec.Struct):
    """GET /v1/reports/summary. `from` and `to` repeat `created_from` and `created_to`
    (deprecated: the names before 2.0.0)."""

    created_from: Timestamp | None
    created_to: Timestamp | None
    from_: Timestamp | None = msgspec.field(name="from")
    to: Timestamp | None
    group_by: Literal["day", "status"]
    groups: list[SummaryGroup]
    totals: SummaryTotals


AccountId = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
OperatorName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,100}$")]
DateTime = {"type": "string", "format": "date-time"}
MessageId = Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]

# summary and export before 2.0.0 named their range `from` and `to`; still taken.
_OLD_RANGE = (
    "`from` and `to` are the deprecated names of `created_from` and `created_to` (before API"
    " 2.0.0); give one name for each end."
)
_OLD_RANGE_NAMES = (
    Param("from", "query", DateTime, description="deprecated: `created_from`", deprecated=True),
    Param("to", "query", DateTime, description="deprecated: `created_to`", deprecated=True),
)

# How status callbacks are sent and signed: the same words on every route that sets a URL.
CALLBACKS = (
    'Callbacks: a POST with a JSON body {event: "message.status", delivery_id, message_id,'
    " status, reason, client_ref, at}, signed as Standard Webhooks prescribe: `webhook-id`"
    " (the delivery_id, the same on every retry), `webhook-timestamp` (unix seconds) and"
    " `webhook-signature: v1,<base64>`, the HMAC-SHA256 over `<id>.<timestamp>.<body>` with"
    " the account's signing secret `whsec_<base64>` decoded as key (the published Standard"
    " Webhooks libraries verify it). The earlier headers `X-Smsgw-Timestamp`,"
    " `X-Smsgw-Delivery` and `X-Smsgw-Signature: sha256=<hex>` (HMAC-SHA256 over"
    " `<timestamp>.<body>`, the whole secret as UTF-8 key) are sent too, deprecated. Verify"
    " in constant time and refuse old timestamps."
    " Any 2xx answer is success; anything else, or no answer within 10 s, is retried with"
    " exponential backoff and full jitter for up to 24 hours. A message's callbacks arrive in"
    " the order of its status changes, at least once each. The URL must be http(s) and, in"
    " production, name a public host: loopback, private, link-local, multicast, reserved and"
    " metadata addresses and names are refused, and so is a name that resolves to one when a"
    " callback connects. A node not in production mode takes loopback hosts only."
)

OTP_SEND = (
    'One-time codes: `"otp": true` instead of `text` sends a code of `code_length` digits'
    " (4 to 8, default 6) made by a CSPRNG, in `template` (with {code} exactly once; default"
    ' "Your code is {code}"), express and waiting as with `wait`: 200 with the sent message'
    " and its `code` (OtpSentOut; `text` with the code's digits as '*', as it is stored from"
    " then on), or the 504 and 502 above, after which the code is not valid. `text` with"
    " `otp` is a 422, and so is an `Idempotency-Key` (no answer holding a code is kept); a"
    " `client_ref` used before is a 409 `client_ref_used`. Like every express message an OTP"
    " reaches numbers on the account's opt-outs, not those on the blocklist. Verify with"
    " POST /v1/otp/verify; a code expires after 120 s (`EngineConfig.otp_ttl_s`), and a new"
    " one to the number replaces it."
)

_STOPS = (
    "An account's opt-outs stop its bulk messages, not its express ones (an opted-out person"
    " still gets login codes); the gateway's blocklist stops every message. A send to such a"
    " number is a 422 `opted_out`, nothing held. Numbers are taken as `to` is (the account's"
    " `default_country`; the blocklist: the node's) and kept as E.164."
)


def _number_list_routes(prefix: str, auth: Auth, who: str) -> tuple[Route, ...]:
    """POST, GET and DELETE of one number list (opt-outs or the blocklist)."""
    return (
        Route(
            "POST",
            prefix,
            f"Add numbers to {who}",
            "opt-outs",
            auth=auth,
            request=NumbersIn,
            responses={200: NumbersAddedOut},
            problems=(503,),
            idempotent=False,
            description="All or none: a number that is none is a 422 naming it. " + _STOPS,
            example={"numbers": ["0935 123 4567", "+4917612345678"]},
        ),
        Route(
            "GET",
            prefix,
            f"A page of {who}, in number order",
            "opt-outs",
            auth=auth,
            responses={200: NumbersPage},
            problems=(503,),
            params=(
                Param("limit", "query", Annotated[int, msgspec.Meta(ge=1, le=1_000)]),
                Param("cursor", "query", str, description="`next_cursor` of the previous page"),
            ),
        ),
        Route(
            "DELETE",
            prefix + "/{number}",
            f"Take a number off {who}",
            "opt-outs",
            auth=auth,
            responses={204: None},
            problems=(503,),
            params=(Param("number", "path", str, required=True),),
            description="404 `number_not_listed` when it is not on it.",
        ),
    )


# --- the route table ---------------------------------------------------------------------------

ROUTES: list[Route] = [
    # accounts (routes/accounts.py)
    Route(
        "POST",
        "/v1/accounts",
        "Create an account; its API key is shown only in this answer",
        "accounts",
        auth="admin",
        request=CreateAccountIn,
        responses={201: AccountCreatedOut},
        problems=(503,),
        description=(
            "The answer holds the account's API key and its callback `signing_secret`, each"
            " shown only here."
        ),
    ),
    Route(
        "POST",
        "/v1/accounts/{account_id}/topups",
        "Add credit to an account",
        "accounts",
        auth="admin",
        request=TopUpIn,
        responses={200: BalanceOut},
        params=(Param("account_id", "path", AccountId, required=True),),
        problems=(503,),
        idempotent=True,
        description=(
            "An `amount` the account's credit cannot hold (2^63 - 1 in all) is a 422"
            " `amount_too_large` and changes nothing. Idempotency-Key: the admin's keys are"
            " per target account."
        ),
    ),
    Route(
        "PUT",
        "/v1/accounts/{account_id}/settings",
        "Replace an account's scheduling and rate settings",
        "accounts",
        auth="admin",
        request=AccountSettingsIn,
        responses={200: AccountSettingsOut},
        params=(Param("account_id", "path", AccountId, required=True),),
        problems=(503,),
        description=(
            "`send_rate`: bulk messages a second dispatched to operators (paced, never"
            " refused); `express_deadline_ms`: accept to operator for express messages;"
            " `recipient_limit_per_hour`: messages to one number; `api_rate`: API requests a"
            " second; `price_per_segment` and `express_surcharge`: the account's prices, in the"
            " smallest currency unit (an express segment costs both). A missing or null field"
            " is the node's default."
        ),
    ),
    Route(
        "GET",
        "/v1/accounts",
        "A page of accounts, in id order",
        "accounts",
        auth="admin",
        responses={200: AccountsPage},
        problems=(503,),
        params=(
            Param("limit", "query", Annotated[int, msgspec.Meta(ge=1, le=1_000)]),
            Param("cursor", "query", str, description="`next_cursor` of the previous page"),
            Param(
                "name",
                "query",
                Annotated[str, msgspec.Meta(min_length=1, max_length=200)],
                description="only accounts whose name contains this (any case)",
            ),
        ),
    ),
    Route(
        "GET",
        "/v1/accounts/{account_id}",
        "An account: its credit, settings, senders, when it was made, whether it is suspended",
        "accounts",
        auth="admin",
        responses={200: AccountAdminOut},
        params=(Param("account_id", "path", AccountId, required=True),),
        problems=(503,),
    ),
    *(
        Route(
            "POST",
            f"/v1/accounts/{{account_id}}/{action}",
            summary,
            "accounts",
            auth="admin",
            responses={200: AccountAdminOut},
            params=(Param("account_id", "path", AccountId, required=True),),
            problems=(503,),
            idempotent=False,
            description=description,
        )
        for action, summary, description in (
            (
                "suspend",
                "Suspend an account",
                "Its sends get 403 `account_suspended` on every node within a second; its"
                " queued messages wait, unsent and uncharged (express ones end at their"
                " deadline, refunded), until it resumes. Its reads and reports still work.",
            ),
            (
                "resume",
                "Resume a suspended account",
                "Its sends are taken again and its queued messages go out.",
            ),
        )
    ),
    Route(
        "PUT",
        "/v1/accounts/{account_id}/senders",
        "Replace the senders an account may use, and its default sender",
        "accounts",
        auth="admin",
        request=SendersIn,
        responses={200: SendersOut},
        params=(Param("account_id", "path", AccountId, required=True),),
        problems=(503,),
        description=(
            "With a list, the account's sends may use only its senders (else 422"
            " `sender_not_allowed` naming `sender` or `from`), and a send without one uses"
            " `default` (null: the first of `senders`). An empty list lets it send from any"
            ' valid sender, as an account without a list does (default "smsgw", or'
            " `default`). Holds on every node within a notification's latency."
        ),
    ),
    Route("GET", "/v1/account", "The calling account", "accounts", responses={200: AccountOut}),
    Route(
        "PATCH",
        "/v1/account",
        "Set the calling account's fields (`callback_url`)",
        "accounts",
        request=AccountPatchIn,
        responses={200: AccountOut},
        description=(
            "A field left out stays as it is; null clears it. `callback_url` receives the"
            " status changes of every message that has no `callback_url` of its own. " + CALLBACKS
        ),
    ),
    Route(
        "POST",
        "/v1/account/signing-secret/rotate",
        "Replace the calling account's callback signing secret",
        "accounts",
        responses={200: SigningSecretOut},
        idempotent=False,
        description=(
            "The new secret is shown only in this answer; every callback sent from now on,"
            " retries of earlier ones included, is signed with it."
        ),
    ),
    Route(
        "POST",
        "/v1/account/keys/rotate",
        "Replace the calling account's API key; the old one stops working",
        "accounts",
        responses={200: KeyRotatedOut},
        idempotent=False,
        problems=(503,),
    ),
    # opt-outs and the blocklist (routes/optouts.py)
    *(
        route
        for prefix, auth, who in (
            ("/v1/account/opt-outs", "account", "the calling account's opt-out list"),
            ("/v1/blocklist", "admin", "the gateway's blocklist"),
        )
        for route in _number_list_routes(prefix, auth, who)  # type: ignore[arg-type]
    ),
    # messages (routes/messages.py, routes/batch.py)
    Route(
        "POST",
        "/v1/messages",
        "Send one message",
        "messages",
        request=SendIn,
        responses={
            202: AcceptedOut,
            # The message; an OTP send's has its code too.
            200: Content(
                "application/json",
                {"anyOf": [{"$ref": REF.format(name=t.__name__)} for t in SENT_ANSWERS]},
                refs=SENT_ANSWERS,
            ),
        },
        example={"to": "+989121234567", "text": "Your order has shipped"},
        examples={"otp": {"to": "+4915123456789", "otp": True, "code_length": 6}},
        problems=(402, 502, 503, 504),
        description=(
            "202 once the message and its credit hold are committed. 200 with the existing"
            " message when `client_ref` was used before by this account (nothing new is"
            " stored). 402 when the balance does not cover the price (nothing stored or held)."
            " 422 `sender_not_allowed` for a sender the admin did not allow the account"
            " (PUT /v1/accounts/{account_id}/senders); 422 `opted_out` for a number on the"
            " account's opt-outs (bulk only) or the gateway's blocklist."
            " 429 `recipient_rate_limited` past the hourly limit for one number. Express: 503"
            " `express_unavailable` when it could not make its deadline (nothing held). With"
            ' `"wait": true` (express only): 200 with the sent message once the operator took'
            " it, 504 `deadline_exceeded` (failed, refunded) when the deadline passed, 502"
            " `operator_refused` (failed, refunded) when the operator refused it."
            " With `callback_url`, each status change (sent, failed, delivered, undelivered)"
            " is POSTed there. " + CALLBACKS + " " + OTP_SEND
        ),
    ),
    # one-time codes (routes/otp.py)
    Route(
        "POST",
        "/v1/otp/verify",
        "Check a one-time code sent to a number",
        "otp",
        request=OtpVerifyIn,
        responses={200: OtpVerifyOut},
        problems=(503,),
        idempotent=False,
        example={"to": "+4915123456789", "code": "123456"},
        description=(
            "`valid: true` once, for the number's live code (the last one sent to it through"
            " any node, while it has not expired); then false. A wrong code counts an attempt:"
            " the fifth wrong one in a row invalidates the code. `reason` when false:"
            " `mismatch`, `too_many_attempts` (this wrong code invalidated it), `expired`, or"
            " `no_code` (none is live: none was sent, it was used or invalidated, or the last"
            " send failed). `to` is taken as a send takes it; `code` is its digits (Persian and"
            " Arabic-Indic digits too). Counts against the account's request rate."
        ),
    ),
    # reports (routes/reports.py)
    Route(
        "GET",
        "/v1/messages",
        "The calling account's messages, newest first, a page at a time",
        "reports",
        responses={200: MessagePage},
        params=(
            Param("limit", "query", Annotated[int, msgspec.Meta(ge=1, le=1_000)]),
            Param("cursor", "query", str, description="`next_cursor` of the previous page"),
            Param(
                "status",
                "query",
                Literal["queued", "sent", "failed", "delivered", "undelivered"],
            ),
            Param("to", "query", Recipient),
            Param("client_ref", "query", ClientRef),
            Param("express", "query", bool),
            Param("created_from", "query", DateTime, description="inclusive"),
            Param("created_to", "query", DateTime, description="exclusive"),
        ),
    ),
    Route(
        "GET",
        "/v1/reports/summary",
        "Counts and credit per UTC day or per status",
        "reports",
        responses={200: SummaryOut},
        params=(
            Param("created_from", "query", DateTime, description="inclusive"),
            Param("created_to", "query", DateTime, description="exclusive"),
            Param("group_by", "query", Literal["day", "status"]),
            *_OLD_RANGE_NAMES,
        ),
        description="Messages created in [created_from, created_to). " + _OLD_RANGE,
    ),
    Route(
        "GET",
        "/v1/messages/export",
        "The calling account's messages as CSV, oldest first, streamed",
        "reports",
        responses={200: Content("text/csv", {"type": "string"})},
        params=(
            Param("created_from", "query", DateTime, description="inclusive"),
            Param("created_to", "query", DateTime, description="exclusive; default: now"),
            *_OLD_RANGE_NAMES,
        ),
        description="Messages created in [created_from, created_to). " + _OLD_RANGE,
    ),
    Route(
        "GET",
        "/v1/messages/{message_id}",
        "One message of the calling account",
        "messages",
        responses={200: MessageOut},
        params=(Param("message_id", "path", MessageId, required=True),),
    ),
    Route(
        "POST",
        "/v1/messages/batch",
        "Send up to 1,000 messages",
        "messages",
        request=BatchRequest,
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
            " `segments`, `price`), `duplicate` (the account already has a message with this"
            " `client_ref`: nothing new is stored, `id` is that message's, as a single send"
            " answers 200 with it) or `rejected` (`error`: the `code`, `field`, `detail` and"
            " HTTP `status` a single send of the item would have answered, `retry_after` for"
            " a 429 or 503). `accepted` + `duplicates` + `rejected` is the number of items."
            " 202 when any item was stored; 200 when none was but some were duplicates; 422"
            " problem `nothing_accepted`, with the same `results` and counts, when every item"
            " was rejected. Credit is held item by item; once it runs out, the rest are"
            " rejected with `insufficient_credit`. With `atomic`, all or none: 422"
            " `invalid_batch` (with `results`) when any item is invalid, 402 when the balance"
            " cannot cover them all, 409 when some but not all `client_ref`s are taken (all"
            " taken: 200, every item a duplicate). The batch's bulk is admitted or refused"
            " whole (429 `backlog_full`, 503 `overloaded`)."
        ),
    ),
    # delivery reports (routes/delivery.py)
    Route(
        "POST",
        "/v1/dlr/{operator}",
        "Delivery reports from an operator, up to 10,000 a request",
        "delivery",
        auth="operator",
        request=DeliveryReportsIn,
        responses={200: DeliveryReportsOut},
        params=(Param("operator", "path", OperatorName, required=True),),
        problems=(503,),
        description=(
            "Authenticated with the operator's own key. One result per report, in order:"
            " `applied` (the message moved from `sent` to `delivered` or `undelivered`),"
            " `duplicate` (it already has that status), `conflict` (it is final otherwise:"
            " the other report status, or `failed`; unchanged), `unknown` (no message sent"
            " through this operator has that id yet: the report is kept and applied if the"
            " message's `sent` is recorded within 24 hours). Credit was captured when the"
            " message was `sent`; an `undelivered` report does not refund it. A body that"
            " is not valid changes nothing (4xx)."
        ),
    ),
    # operations (routes/ops.py, routes/console.py, routes/metrics.py, routes/docs.py)
    Route("GET", "/health", "Liveness", "ops", auth="none", responses={200: HealthOut}),
    Route(
        "GET",
        "/ready",
        "Readiness: PostgreSQL answers and recovery is done",
        "ops",
        auth="none",
        responses={200: ReadyOut},
        problems=(503,),
    ),
    Route(
        "GET",
        "/v1/ops/supervisor",
        "The supervision tree: each actor's state, restarts, inbox and own figures",
        "ops",
        auth="admin",
        responses={200: SupervisorStatus},
        problems=(503,),
        params=(
            Param(
                "detail",
                "query",
                Literal["leases"],
                description="`leases`: child `shard_leases` lists every lease with its fencing"
                " token (default: `lease_summary`, its count, shard ranges and token span)",
            ),
        ),
    ),
    Route(
        "GET",
        "/v1/ops/cluster",
        "The nodes sharing this database: heartbeats and leased shards",
        "ops",
        auth="admin",
        responses={200: ClusterOut},
        problems=(503,),
        description=(
            "Accounts hash into 256 shards; each is dispatched by the one live node holding its"
            " lease. This node's own leases (with their fencing tokens) are in"
            " /v1/ops/supervisor, child `shard_leases`."
        ),
    ),
    Route(
        "GET",
        "/v1/ops/console",
        "Everything the ops console (GET /ops) draws, in one answer",
        "ops",
        auth="admin",
        responses={200: ConsoleOut},
        description=(
            "The supervision tree, the scheduler's lanes, each operator's breaker and figures,"
            " cumulative counters (a poller turns them into rates) and the nodes with the"
            " shard map, from the node that answered (`node_id`). The nodes' view is read from"
            " PostgreSQL at most once a second; `cluster.error` says why it is missing."
        ),
    ),
    Route(
        "POST",
        "/v1/ops/operators/{name}/drain",
        "Drain an operator: hold its breaker open on this node until released",
        "ops",
        auth="admin",
        responses={200: DrainOut},
        params=(Param("name", "path", str, True, "the operator's name"),),
        description=(
            "No call to the operator begins on the node that answers (`node_id`); its"
            " messages go to the other operators (a route override's only with `fallback`),"
            " calls in flight finish. Logged. Idempotent."
        ),
    ),
    Route(
        "POST",
        "/v1/ops/operators/{name}/release",
        "Release a drained operator: its breaker probes (half-open), then closes",
        "ops",
        auth="admin",
        responses={200: DrainOut},
        params=(Param("name", "path", str, True, "the operator's name"),),
        description="Logged. An operator that is not drained is left as it is.",
    ),
    Route(
        "GET",
        "/metrics",
        "Prometheus metrics (text format)",
        "ops",
        auth="admin",
        responses={200: Content("text/plain", {"type": "string"})},
        description=(
            "Needs the admin key unless the node runs with SMSGW_METRICS_PUBLIC=1; then it is"
            " open (keep it off public networks)."
        ),
    ),
    Route(
        "GET",
        "/openapi.json",
        "This document",
        "ops",
        auth="none",
        responses={200: Content("application/json", {"type": "object"})},
    ),
    Route(
        "GET",
        "/docs",
        "A page that shows this document",
        "ops",
        auth="none",
        responses={200: Content("text/html", {"type": "string"})},
    ),
    Route(
        "GET",
        "/ops",
        "The ops console: a live page of the supervision tree, queues, operators and nodes",
        "ops",
        auth="none",
        responses={200: Content("text/html", {"type": "string"})},
        description=(
            "Self-contained (no CDN). It asks for the admin key once, keeps it in the tab's"
            " sessionStorage and sends it as a Bearer header to GET /v1/ops/console every"
            " second; the drain and release buttons call the routes above after a confirm."
        ),
    ),
]


# --- the builder ---------------------------------------------------------------------------


_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "none": [],
    "account": [{"accountKey": []}],
    "admin": [{"adminKey": []}],
    "operator": [{"operatorKey": []}],
}
_STATUS_TEXT = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content"}
_REQUEST_ID = "X-Request-Id"


def document(routes: Sequence[Route] = ROUTES, *, title: str = "smsgw") -> dict[str, Any]:
    """The OpenAPI 3.1 document for `routes`, as a JSON-ready dict."""
    types = _types(routes)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation = _operation(route, schema_of)
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": API_VERSION,
            "description": (
                "An SMS gateway: prepaid credit, fair dispatch, an express lane. Errors are"
                " application/problem+json (RFC 9457) with a stable `code`.\n\nChanges:\n"
                + "\n".join(f"- {version}: {change}" for version, change in CHANGES)
            ),
        },
        "tags": [{"name": t} for t in dict.fromkeys(r.tag for r in routes)],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "accountKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An account's API key: `Authorization: Bearer sk_...`",
                },
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The node's admin key (SMSGW_ADMIN_KEY)",
                },
                "operatorKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "An operator's delivery report key, set when the node starts"
                        " (`smsgw serve --dlr-key NAME=KEY` or SMSGW_DLR_KEYS)"
                    ),
                },
            },
            "parameters": {
                "IdempotencyKey": {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": (
                        "Retry safely: the same key with the same request within 24 hours"
                        " replays the first answer; with another request it is a 422."
                    ),
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 255,
                        "pattern": "^[ -~]+$",
                    },
                },
                "RequestId": {
                    "name": _REQUEST_ID,
                    "in": "header",
                    "required": False,
                    "description": (
                        "Your id for this request (1 to 128 of A-Z a-z 0-9 . _ : -), echoed"
                        " in the answer and the gateway's logs; another value is replaced by"
                        " one the gateway makes."
                    ),
                    "schema": {"type": "string"},
                },
            },
            "headers": {
                "RequestId": {
                    "description": "The request's id, as in the gateway's logs",
                    "schema": {"type": "string"},
                },
                "RetryAfter": {
                    "description": "Seconds to wait before trying again",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
            },
        },
    }


def _types(routes: Iterable[Route]) -> list[Any]:
    """Every type the document describes, each once: Problem first, then in route order."""
    seen: dict[Any, None] = {Problem: None}

    def add(kind: Any) -> None:
        if isinstance(kind, Content):
            for ref in kind.refs:
                seen.setdefault(ref, None)
        elif kind is not None:
            seen.setdefault(kind, None)

    for route in routes:
        add(route.request)
        for body in route.responses.values():
            add(body)
        for param in _params(route):
            if not isinstance(param.schema, dict):
                add(param.schema)
    return list(seen)


def _operation(route: Route, schema_of: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.operation_id or _operation_id(route),
        "summary": route.summary,
        "tags": [route.tag],
        "security": _SECURITY[route.auth],
    }
    if route.description:
        operation["description"] = route.description
    parameters = [_parameter(p, schema_of) for p in _params(route)]
    if route.takes_idempotency_key:
        parameters.append({"$ref": "#/components/parameters/IdempotencyKey"})
    parameters.append({"$ref": "#/components/parameters/RequestId"})
    operation["parameters"] = parameters
    if route.request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": _content(route.request, schema_of),
        }
        named = dict(route.examples)
        if named and route.example is not None:
            named = {"default": route.example, **named}
        for media in operation["requestBody"]["content"].values():
            if named:
                media["examples"] = {name: {"value": value} for name, value in named.items()}
            elif route.example is not None:
                media["example"] = route.example
    responses: dict[str, Any] = {}
    for status, body in sorted(route.responses.items()):
        response: dict[str, Any] = {
            "description": _STATUS_TEXT.get(status, str(status)),
            "headers": {_REQUEST_ID: {"$ref": "#/components/headers/RequestId"}},
        }
        if body is not None:
            response["content"] = _content(body, schema_of)
        responses[str(status)] = response
    for status in route.problem_statuses():
        headers = {_REQUEST_ID: {"$ref": "#/components/headers/RequestId"}}
        if status in (429, 503):
            headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
        responses[str(status)] = {
            "description": TITLES.get(status, "Error"),
            "headers": headers,
            "content": {"application/problem+json": {"schema": schema_of[Problem]}},
        }
    operation["responses"] = responses
    return operation


def _params(route: Route) -> list[Param]:
    """The declared parameters, plus any path parameter the path names but they do not."""
    declared = {p.name for p in route.params if p.location == "path"}
    implied = [
        Param(name, "path", str, required=True)
        for name in re.findall(r"{([^}]+)}", route.path)
        if name not in declared
    ]
    return [*route.params, *implied]


def _parameter(param: Param, schema_of: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    schema = param.schema if isinstance(param.schema, dict) else schema_of[param.schema]
    out: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "required": param.required or param.location == "path",
        "schema": schema,
    }
    if param.description:
        out["description"] = param.description
    if param.deprecated:
        out["deprecated"] = True
    return out


def _content(body: Any, schema_of: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(body, Content):
        return {body.media_type: {} if body.schema is None else {"schema": body.schema}}
    return {"application/json": {"schema": schema_of[body]}}


def _operation_id(route: Route) -> str:
    words = re.sub(r"[{}]", "", route.path).strip("/").replace(".", "_")
    return route.method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", words).strip("_")


def rule_to_path(rule: str) -> str:
    """A werkzeug URL rule as an OpenAPI path: `/a/<int:id>` -> `/a/{id}`."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)
