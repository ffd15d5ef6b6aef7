"""The client's operations, each written once: a function that takes the operation's
arguments and returns its `Call`, the request to send and how to read the answer. `Client`
and `AsyncClient` turn each into a method of the same name, signature and docstring, and
differ only in how they send."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import httpx
import msgspec

from smsgw.client.errors import ApiError
from smsgw.client.models import (
    Accepted,
    Account,
    AccountCreated,
    Balance,
    BatchResponse,
    Cancelled,
    Message,
    MessageEvents,
    MessagePage,
    OutgoingMessage,
    Summary,
)

T = TypeVar("T")
Time = datetime | str  # an aware datetime, or RFC 3339 text with its offset

_encode = msgspec.json.Encoder().encode
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request, as httpx takes it, and `read`: its answer as `T`, or an ApiError."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


# --- the operations --------------------------------------------------------------------------


def send(
    to: str,
    text: str,
    *,
    sender: str | None = None,
    express: bool = False,
    client_ref: str | None = None,
    callback_url: str | None = None,
    validity: int | None = None,
    send_at: Time | None = None,
    idempotency_key: str | None = None,
) -> Call[Accepted | Message]:
    """Send one message: `Accepted` once it is stored and its price held; the existing
    `Message` when the account already used `client_ref` (nothing new is stored).
    `validity` (bulk, 60 to 259,200 s): not sent within it, the message ends `expired`.
    `send_at` (up to 30 days ahead): `Accepted` with status `scheduled`, sent then; its
    validity counts from it."""
    body = _message(to, text, sender, express, client_ref, callback_url, wait=False)
    if validity is not None:
        body["validity"] = validity
    if send_at is not None:
        body["send_at"] = _time(send_at)
    return _json("POST", "/v1/messages", body, _sent, idempotency_key)


def send_and_wait(
    to: str,
    text: str,
    *,
    sender: str | None = None,
    client_ref: str | None = None,
    callback_url: str | None = None,
    idempotency_key: str | None = None,
) -> Call[Message]:
    """Send an express message (an OTP) and answer once the operator took it: the sent
    `Message`. ApiError 504 `deadline_exceeded` or 502 `operator_refused` when it could
    not be sent (failed and refunded), 503 `express_unavailable` when it could not even
    be tried (nothing held)."""
    body = _message(to, text, sender, True, client_ref, callback_url, wait=True)
    return _json("POST", "/v1/messages", body, _answer(Message, 200), idempotency_key)


def batch(
    messages: Sequence[OutgoingMessage | Mapping[str, Any]],
    *,
    atomic: bool = False,
    idempotency_key: str | None = None,
) -> Call[BatchResponse]:
    """Send up to 1,000 messages: one result per item, in order. Returned (not raised)
    when every item was rejected too (`accepted == 0`); with `atomic`, a refusal of the
    whole batch is an ApiError."""
    items = [m if isinstance(m, OutgoingMessage) else dict(m) for m in messages]
    body: dict[str, Any] = {"messages": items}
    if atomic:
        body["atomic"] = True
    return _json("POST", "/v1/messages/batch", body, _batch_answer, idempotency_key)


def cancel(message_id: str) -> Call[Cancelled]:
    """Cancel a scheduled or queued message: `Cancelled` with the price refunded. ApiError
    409 `not_cancellable` once it is sending or final."""
    return Call("POST", f"/v1/messages/{message_id}/cancel", _answer(Cancelled, 200))


def get_message(message_id: str) -> Call[Message]:
    """One of the account's messages, by its id."""
    return Call("GET", f"/v1/messages/{message_id}", _answer(Message, 200))


def message_events(message_id: str) -> Call[MessageEvents]:
    """What happened to one of the account's messages, oldest first."""
    return Call("GET", f"/v1/messages/{message_id}/events", _answer(MessageEvents, 200))


def list_messages(
    *,
    limit: int | None = None,
    cursor: str | None = None,
    status: str | None = None,
    to: str | None = None,
    client_ref: str | None = None,
    express: bool | None = None,
    created_from: Time | None = None,
    created_to: Time | None = None,
) -> Call[MessagePage]:
    """One page of the account's messages, newest first; pass its `next_cursor` as
    `cursor` for the next one."""
    params = _query(
        limit=limit,
        cursor=cursor,
        status=status,
        to=to,
        client_ref=client_ref,
        express=express,
        created_from=created_from,
        created_to=created_to,
    )
    return Call("GET", "/v1/messages", _answer(MessagePage, 200), params)


def summary(
    *,
    created_from: Time | None = None,
    created_to: Time | None = None,
    group_by: Literal["day", "status", "operator", "sender", "country"] = "day",
    tz: str | None = None,
) -> Call[Summary]:
    """Counts and credit of the account's messages created in [created_from, created_to),
    per day (in the IANA zone `tz`, default UTC), status, operator, sender or country calling
    code, with totals."""
    params = _query(created_from=created_from, created_to=created_to, group_by=group_by, tz=tz)
    return Call("GET", "/v1/reports/summary", _answer(Summary, 200), params)


def account() -> Call[Account]:
    """The key's account: its name, balance, credit held and callback URL."""
    return Call("GET", "/v1/account", _answer(Account, 200))


def create_account(name: str, *, credit: int = 0) -> Call[AccountCreated]:
    """Admin: a new account; its API key and signing secret are shown only here."""
    body = {"name": name, "credit": credit}
    return _json("POST", "/v1/accounts", body, _answer(AccountCreated, 201))


def top_up(account_id: int, amount: int, *, idempotency_key: str | None = None) -> Call[Balance]:
    """Admin: add `amount` to an account's credit; with `idempotency_key`, a retry
    credits once."""
    path = f"/v1/accounts/{account_id}/topups"
    return _json("POST", path, {"amount": amount}, _answer(Balance, 200), idempotency_key)


def export(*, created_from: Time | None = None, created_to: Time | None = None) -> Call[None]:
    """The CSV export, streamed by the client: `read` only raises the ApiError of an answer
    that is not 200 (read its body first)."""
    params = _query(created_from=created_from, created_to=created_to)
    return Call("GET", "/v1/messages/export", _expect(200), params)


# --- requests ----------------------------------------------------------------------------


def _json(
    method: str,
    path: str,
    body: Any,
    read: Callable[[httpx.Response], T],
    idempotency_key: str | None = None,
) -> Call[T]:
    headers = {"Content-Type": "application/json"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return Call(method, path, read, body=_encode(body), headers=headers)


def _message(
    to: str,
    text: str,
    sender: str | None,
    express: bool,
    client_ref: str | None,
    callback_url: str | None,
    *,
    wait: bool,
) -> dict[str, Any]:
    optional = {
        "sender": sender,
        "express": express or None,
        "client_ref": client_ref,
        "callback_url": callback_url,
        "wait": wait or None,
    }
    return {"to": to, "text": text, **{k: v for k, v in optional.items() if v is not None}}


def _time(value: Time) -> str:
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        raise ValueError("a time in a query needs its offset (a timezone-aware datetime)")
    return value.isoformat()


def _query(**values: Any) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            params[name] = "true" if value else "false"
        elif isinstance(value, datetime):
            params[name] = _time(value)
        else:
            params[name] = str(value)
    return params


# --- answers -----------------------------------------------------------------------------


def problem(response: httpx.Response) -> ApiError:
    """The ApiError for an answer that is not a success."""
    try:
        members = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        members = None
    if not isinstance(members, dict):
        members = {}
    retry_after = members.get("retry_after")
    if not isinstance(retry_after, int):
        header = response.headers.get("Retry-After", "")
        retry_after = int(header) if header.isascii() and header.isdigit() else None
    field_name = members.get("field")
    return ApiError(
        response.status_code,
        str(members.get("code") or f"http_{response.status_code}"),
        str(members.get("detail") or response.reason_phrase or "no detail"),
        retry_after=retry_after,
        field=field_name if isinstance(field_name, str) else None,
        problem=members,
    )


def _decoded(kind: type[T], data: bytes) -> T:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    value: T = decoder.decode(data)
    return value


def _answer(kind: type[T], *statuses: int) -> Callable[[httpx.Response], T]:
    """Read the body as `kind` when the status is one of `statuses`, else raise an ApiError."""

    def read(response: httpx.Response) -> T:
        if response.status_code not in statuses:
            raise problem(response)
        return _decoded(kind, response.content)

    return read


def _expect(status: int) -> Callable[[httpx.Response], None]:
    def read(response: httpx.Response) -> None:
        if response.status_code != status:
            raise problem(response)

    return read


def _sent(response: httpx.Response) -> Accepted | Message:
    if response.status_code == 200:  # the client_ref was used already: that message
        return _decoded(Message, response.content)
    return _answer(Accepted, 202)(response)


def _batch_answer(response: httpx.Response) -> BatchResponse:
    """202 and 200, and the 422 that says no item was accepted: its members are the same."""
    if response.status_code == 422 and b'"nothing_accepted"' in response.content:
        members = msgspec.json.decode(response.content)
        if isinstance(members, dict) and members.get("code") == "nothing_accepted":
            return msgspec.convert(members, BatchResponse)
    return _answer(BatchResponse, 200, 202)(response)
