"""Bad input is refused at the edge with a problem+json saying what is wrong; nothing changes."""

from __future__ import annotations

import json
from typing import Any

import h11
import httpx
import pytest
import trio

from smsgw.runtime.server import Node
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    TO,
    assert_problem,
    create_account,
    db_fetch,
    get_account,
    message_count,
    wait_final,
)

OVER_ONE_MIB = 1024 * 1024 + 1


def as_json(body: Any) -> dict[str, Any]:
    return {"content": json.dumps(body).encode(), "content_type": "application/json"}


BAD_REQUESTS = [
    pytest.param(as_json({"to": "12345", "text": "hi"}), 422, "to", id="to-no-plus"),
    pytest.param(as_json({"to": "+0123456789", "text": "hi"}), 422, "to", id="to-leading-zero"),
    pytest.param(as_json({"to": "abc", "text": "hi"}), 422, "to", id="to-letters"),
    pytest.param(as_json({"to": "+4915123456789012", "text": "hi"}), 422, "to", id="to-too-long"),
    # A line break around a number is a separator (stored as E.164), inside it is not one.
    pytest.param(as_json({"to": TO + "\nhi", "text": "hi"}), 422, "to", id="to-newline"),
    pytest.param(
        as_json({"to": TO, "text": "hi", "sender": "ACME\n"}), 422, "sender", id="sender-newline"
    ),
    pytest.param(as_json({"to": TO, "text": ""}), 422, "text", id="text-empty"),
    pytest.param(as_json({"to": TO}), 422, None, id="text-missing"),
    pytest.param(as_json({"to": TO, "text": "hi", "priority": 1}), 422, None, id="unknown-field"),
    pytest.param(as_json({"to": 123, "text": "hi"}), 422, None, id="to-wrong-type"),
    pytest.param(as_json({"to": TO, "text": "hi", "express": "yes"}), 422, None, id="express-str"),
    pytest.param(as_json({"to": TO, "text": "hi", "express": 1}), 422, None, id="express-int"),
    pytest.param(
        as_json({"to": TO, "text": "hi", "sender": "ABCDEFGHIJKL"}), 422, "sender", id="sender-12"
    ),
    pytest.param(
        as_json({"to": TO, "text": "hi", "sender": "héllo"}), 422, "sender", id="sender-accent"
    ),
    pytest.param(
        as_json({"to": TO, "text": "hi", "client_ref": "r" * 101}), 422, None, id="client-ref-long"
    ),
    pytest.param(as_json({"to": TO, "text": "x" * 1531}), 422, "text", id="text-11-segments"),
    pytest.param(as_json({"to": TO, "text": "س" * 671}), 422, "text", id="ucs2-11-segments"),
    pytest.param(as_json([TO, "hi"]), 422, None, id="not-an-object"),
    pytest.param(
        {"content": b'{"to": "+4915123456789", "text": ', "content_type": "application/json"},
        400,
        None,
        id="malformed-json",
    ),
    pytest.param({"content": b"", "content_type": "application/json"}, 400, None, id="empty-body"),
    pytest.param(
        {"content": json.dumps({"to": TO, "text": "hi"}).encode(), "content_type": "text/plain"},
        415,
        None,
        id="text-plain",
    ),
    pytest.param(
        {
            "content": b"to=%2B4915123456789&text=hi",
            "content_type": "application/x-www-form-urlencoded",
        },
        415,
        None,
        id="form-encoded",
    ),
    pytest.param(as_json({"to": TO, "text": "x" * OVER_ONE_MIB}), 413, None, id="body-over-1mib"),
]


@pytest.mark.parametrize(("request_args", "status", "field"), BAD_REQUESTS)
async def test_bad_send_changes_nothing(
    client: httpx.AsyncClient,
    database_url: str,
    schema: str,
    request_args: dict[str, Any],
    status: int,
    field: str | None,
) -> None:
    account = await create_account(client, 100)
    key = account["api_key"]
    # One good message first, so "nothing changed" is checked against a non-empty state.
    r = await client.post("/v1/messages", json={"to": TO, "text": "ok"}, headers=bearer(key))
    assert r.status_code == 202, r.text
    await wait_final(client, key, r.json()["id"])
    before = await get_account(client, key)
    count = await message_count(database_url, schema)

    headers = {**bearer(key), "Content-Type": request_args["content_type"]}
    # Its own connection: test_refusal_before_the_body_is_read_keeps_keep_alive_honest covers
    # what happens to a connection after a body the app did not read.
    async with httpx.AsyncClient(base_url=client.base_url, timeout=30) as once:
        r = await once.post("/v1/messages", content=request_args["content"], headers=headers)
    problem = assert_problem(r, status)
    if field is not None:
        assert problem["field"] == field

    after = await get_account(client, key)
    assert after == before
    assert await message_count(database_url, schema) == count == 1


@pytest.mark.parametrize(
    ("fields", "segments"),
    [
        ({"text": "x" * 1530}, 10),  # 10 parts of 153: the limit itself
        ({"text": "س" * 670}, 10),  # 10 parts of 67
        ({"text": "hi", "sender": "ABCDEFGHIJK"}, 1),  # 11 characters
        ({"text": "hi", "sender": "491512345678901"}, 1),  # 15 digits
        ({"text": "hi", "to": "+2902345"}, 1),  # the shortest E.164 number (St Helena)
        ({"text": "hi", "client_ref": "r" * 100}, 1),
    ],
)
async def test_limits_themselves_are_accepted(
    client: httpx.AsyncClient, node: Node, fields: dict[str, Any], segments: int
) -> None:
    account = await create_account(client, 1_000)
    r = await client.post(
        "/v1/messages", json={"to": TO, **fields}, headers=bearer(account["api_key"])
    )
    assert r.status_code == 202, r.text
    assert (r.json()["segments"], r.json()["price"]) == (segments, 5 * segments)


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/json"]
)
async def test_json_is_json_whatever_the_header_s_spelling(
    client: httpx.AsyncClient, content_type: str
) -> None:
    account = await create_account(client, 100)
    headers = {**bearer(account["api_key"]), "Content-Type": content_type}
    body = json.dumps({"to": TO, "text": "hi"}).encode()
    r = await client.post("/v1/messages", content=body, headers=headers)
    assert r.status_code == 202, r.text


async def test_bad_account_creation_changes_nothing(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    for body, status in [
        ({"name": "", "credit": 10}, 422),
        ({"name": "x", "credit": -1}, 422),
        ({"name": "x", "credit": "10"}, 422),
        ({"credit": 10}, 422),
        ({"name": "x", "credit": 10, "plan": "gold"}, 422),
    ]:
        assert_problem(await client.post("/v1/accounts", json=body, headers=admin()), status)
    rows = await db_fetch(database_url, schema, "SELECT count(*) AS n FROM accounts")
    assert rows[0]["n"] == 0


async def _read_response(conn: h11.Connection, stream: trio.SocketStream) -> h11.Response:
    """The next complete response on `stream`; AssertionError if the server closes instead."""
    response: h11.Response | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            assert data, "the server closed the connection without a response"
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return response
        elif isinstance(event, h11.ConnectionClosed):
            raise AssertionError("the server closed the connection without a response")


@pytest.mark.parametrize(
    ("auth", "content_type", "size", "status"),
    [
        ("valid", "application/json", OVER_ONE_MIB, 413),
        ("unknown", "application/json", 900 * 1024, 401),
        ("valid", "text/plain", 900 * 1024, 415),
    ],
)
async def test_refusal_before_the_body_is_read_keeps_keep_alive_honest(
    client: httpx.AsyncClient, auth: str, content_type: str, size: int, status: int
) -> None:
    """A refusal sent before the body is read must either announce `Connection: close` or
    leave the connection able to serve the next request. Raw HTTP/1.1 through h11, so no client
    pool can hide a dropped connection; the body goes only after the refusal has arrived (as a
    client that waits a little for an early answer would do), so the outcome is not a race."""
    account = await create_account(client, 100)
    key = account["api_key"] if auth == "valid" else "sk_unknown"
    body = json.dumps({"to": TO, "text": "x" * size}).encode()
    url = httpx.URL(str(client.base_url))
    assert url.host and url.port
    conn = h11.Connection(h11.CLIENT)
    headers = [
        ("Host", url.host),
        ("Authorization", f"Bearer {key}"),
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
    ]
    stream = await trio.open_tcp_stream(url.host, url.port)
    async with stream:
        with trio.fail_after(10):  # a bound on a hang, not a timing assertion
            request = h11.Request(method="POST", target="/v1/messages", headers=headers)
            await stream.send_all(conn.send(request))
            response = await _read_response(conn, stream)
            assert response.status_code == status
            if (b"connection", b"close") in [(k.lower(), v.lower()) for k, v in response.headers]:
                return  # announced: the client knows not to reuse the connection
            try:
                for start in range(0, len(body), 65536):
                    await stream.send_all(conn.send(h11.Data(data=body[start : start + 65536])))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            except trio.BrokenResourceError:
                raise AssertionError(
                    f"the server closed a keep-alive connection after a {status} without saying so"
                ) from None
            conn.start_next_cycle()
            request = h11.Request(method="GET", target="/health", headers=[("Host", url.host)])
            await stream.send_all(conn.send(request))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            health = await _read_response(conn, stream)
            assert health.status_code == 200
