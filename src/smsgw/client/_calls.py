"""The requests each operation makes and how its answers decode: shared by the sync and the
async client, which only differ in how they send."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import httpx
import msgspec

from smsgw.client.errors import ApiError
from smsgw.client.models import (
    Accepted,
    Account,
    AccountCreated,
    Balance,
    BatchResponse,
    Message,
    MessagePage,
    OutgoingMessage,
    Summary,
)

T = TypeVar("T")
_encode = msgspec.json.Encoder().encode
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


@dataclass(frozen=True)
class Call:
    """One HTTP request, as httpx takes it."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _json(method: str, path: str, body: Any, idempotency_key: str | None = None) -> Call:
    headers = {"Content-Type": "application/json"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return Call(method, path, body=_encode(body), headers=headers)


def _time(value: datetime | str) -> str:
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


# --- requests ----------------------------------------------------------------------------


def send(
    to: str,
    text: str,
    *,
    sender: str | None,
    express: bool,
    client_ref: str | None,
    callback_url: str | None,
    wait: bool,
    idempotency_key: str | None,
) -> Call:
    optional = {
        "sender": sender,
        "express": express or None,
        "client_ref": client_ref,
        "callback_url": callback_url,
        "wait": wait or None,
    }
    body = {"to": to, "text": text, **{k: v for k, v in optional.items() if v is not None}}
    return _json("POST", "/v1/messages", body, idempotency_key)


def batch(
    messages: Sequence[OutgoingMessage | Mapping[str, Any]],
    *,
    atomic: bool,
    idempotency_key: str | None,
) -> Call:
    items = [m if isinstance(m, OutgoingMessage) else dict(m) for m in messages]
    body: dict[str, Any] = {"messages": items}
    if atomic:
        body["atomic"] = True
    return _json("POST", "/v1/messages/batch", body, idempotency_key)


def get_message(message_id: str) -> Call:
    return Call("GET", f"/v1/messages/{message_id}")


def list_messages(
    *,
    limit: int | None,
    cursor: str | None,
    status: str | None,
    to: str | None,
    client_ref: str | None,
    express: bool | None,
    created_from: datetime | str | None,
    created_to: datetime | str | None,
) -> Call:
    return Call(
        "GET",
        "/v1/messages",
        _query(
            limit=limit,
            cursor=cursor,
            status=status,
            to=to,
            client_ref=client_ref,
            express=express,
            created_from=created_from,
            created_to=created_to,
        ),
    )


def summary(
    *, created_from: datetime | str | None, created_to: datetime | str | None, group_by: str
) -> Call:
    params = _query(created_from=created_from, created_to=created_to, group_by=group_by)
    return Call("GET", "/v1/reports/summary", params)


def export(*, created_from: datetime | str | None, created_to: datetime | str | None) -> Call:
    return Call(
        "GET", "/v1/messages/export", _query(created_from=created_from, created_to=created_to)
    )


def account() -> Call:
    return Call("GET", "/v1/account")


def create_account(name: str, credit: int) -> Call:
    return _json("POST", "/v1/accounts", {"name": name, "credit": credit})


def top_up(account_id: int, amount: int, idempotency_key: str | None) -> Call:
    return _json("POST", f"/v1/accounts/{account_id}/topups", {"amount": amount}, idempotency_key)


# --- answers -----------------------------------------------------------------------------


def decoded(kind: type[T], data: bytes) -> T:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    value: T = decoder.decode(data)
    return value


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


def answer(response: httpx.Response, kind: type[T], *statuses: int) -> T:
    """The body as `kind` when the status is one of `statuses`, else an ApiError."""
    if response.status_code not in statuses:
        raise problem(response)
    return decoded(kind, response.content)


def sent(response: httpx.Response) -> Accepted | Message:
    if response.status_code == 200:  # the client_ref was used already: that message
        return decoded(Message, response.content)
    return answer(response, Accepted, 202)


def batch_answer(response: httpx.Response) -> BatchResponse:
    """202 and 200, and the 422 that says no item was accepted: its members are the same."""
    if response.status_code == 422 and b'"nothing_accepted"' in response.content:
        members = msgspec.json.decode(response.content)
        if isinstance(members, dict) and members.get("code") == "nothing_accepted":
            return msgspec.convert(members, BatchResponse)
    return answer(response, BatchResponse, 200, 202)


def message_page(response: httpx.Response) -> MessagePage:
    return answer(response, MessagePage, 200)


def message(response: httpx.Response) -> Message:
    return answer(response, Message, 200)


def summary_answer(response: httpx.Response) -> Summary:
    return answer(response, Summary, 200)


def account_answer(response: httpx.Response) -> Account:
    return answer(response, Account, 200)


def created_answer(response: httpx.Response) -> AccountCreated:
    return answer(response, AccountCreated, 201)


def balance_answer(response: httpx.Response) -> Balance:
    return answer(response, Balance, 200)
