"""The client library without a gateway (httpx's MockTransport): the sync and the async client
offer the same operations and send the same requests for them, and read answers alike."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from smsgw.client import ApiError, AsyncClient, Client, OutgoingMessage

BASE = "http://gateway.test"
# (operation, args, kwargs, the status and body the mock gateway answers with)
CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], int, dict[str, Any]]] = [
    ("send", ("+4915100000001", "hi"), {"client_ref": "r1", "idempotency_key": "k1"}, 202,
     {"id": "m1", "status": "queued", "segments": 1, "price": 5}),
    ("batch", ([OutgoingMessage(to="+4915100000001", text="a"), {"to": "+1", "text": "b"}],),
     {"atomic": True}, 202, {"accepted": 1, "duplicates": 0, "rejected": 0,
     "results": [{"index": 0, "status": "queued", "id": "m2"}]}),
    ("list_messages", (), {"limit": 2, "express": False,
     "created_from": datetime(2026, 1, 2, tzinfo=UTC)}, 200, {"items": [], "next_cursor": None}),
    ("top_up", (7, 100), {"idempotency_key": "t1"}, 200, {"balance": 100}),
]  # fmt: skip


def operations(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")} - {"close", "aclose"}


def test_both_clients_offer_the_same_operations_with_the_same_parameters() -> None:
    assert operations(Client) == operations(AsyncClient)
    for name in operations(Client):
        sync, awaited = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(awaited) or inspect.isasyncgenfunction(awaited)
        assert inspect.signature(sync).parameters == inspect.signature(awaited).parameters
        assert sync.__doc__, name
    # What help() shows for an operation made from its Call: its own parameters and answer.
    signature = inspect.signature(Client.send_and_wait)
    assert list(signature.parameters)[:3] == ["self", "to", "text"]
    assert signature.return_annotation == "Message"


def recorder(
    status: int, body: dict[str, Any], seen: list[httpx.Request]
) -> Callable[[httpx.Request], httpx.Response]:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body)

    return handle


def described(request: httpx.Request) -> tuple[Any, ...]:
    body = json.loads(request.content) if request.content else None
    headers = {
        k: v for k, v in request.headers.items() if k in ("authorization", "idempotency-key")
    }
    return request.method, str(request.url), headers, body


@pytest.mark.parametrize(("name", "args", "kwargs", "status", "answer"), CALLS)
async def test_both_clients_send_the_same_request_and_read_the_same_answer(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], status: int, answer: dict[str, Any]
) -> None:
    sync_seen: list[httpx.Request] = []
    async_seen: list[httpx.Request] = []
    handler = recorder(status, answer, sync_seen)
    with Client(BASE, "key", transport=httpx.MockTransport(handler)) as client:
        sync_answer = getattr(client, name)(*args, **kwargs)
    async_handler = recorder(status, answer, async_seen)
    async with AsyncClient(BASE, "key", transport=httpx.MockTransport(async_handler)) as client:
        async_answer = await getattr(client, name)(*args, **kwargs)

    assert [described(r) for r in sync_seen] == [described(r) for r in async_seen]
    assert sync_answer == async_answer
    assert sync_seen[0].headers["authorization"] == "Bearer key"


def test_the_requests_say_what_the_operation_was_given() -> None:
    seen: list[httpx.Request] = []
    answer = {"code": "overloaded", "detail": "retry shortly"}
    with Client(BASE, "key", transport=httpx.MockTransport(recorder(503, answer, seen))) as sms:
        with pytest.raises(ApiError):
            sms.list_messages(express=False, created_from=datetime(2026, 1, 2, tzinfo=UTC))
        with pytest.raises(ApiError):
            sms.send("+4915100000001", "hi", express=True, callback_url="https://x.test/cb")

    assert dict(seen[0].url.params) == {
        "express": "false",
        "created_from": "2026-01-02T00:00:00+00:00",
    }
    assert json.loads(seen[1].content) == {
        "to": "+4915100000001",
        "text": "hi",
        "express": True,
        "callback_url": "https://x.test/cb",
    }
    with Client(BASE, "key") as sms, pytest.raises(ValueError, match="offset"):
        sms.list_messages(created_from=datetime(2026, 1, 2))  # no timezone: refused unsent


async def test_a_problem_answer_is_the_same_api_error_on_both_clients() -> None:
    problem = {"code": "insufficient_credit", "detail": "top up", "field": "text"}

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(402, json=problem, headers={"Retry-After": "3"})

    with (
        Client(BASE, "key", transport=httpx.MockTransport(handle)) as client,
        pytest.raises(ApiError) as sync_error,
    ):
        client.send("+4915100000001", "hi")
    async with AsyncClient(BASE, "key", transport=httpx.MockTransport(handle)) as aclient:
        with pytest.raises(ApiError) as async_error:
            await aclient.send("+4915100000001", "hi")

    for error in (sync_error.value, async_error.value):
        assert (error.status, error.code, error.detail) == (402, "insufficient_credit", "top up")
        assert (error.retry_after, error.field) == (3, "text")
