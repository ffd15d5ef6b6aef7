"""Hostile input (issue 29): every one gets a 4xx problem+json answer and changes nothing.

Each case here answered 500 once: bytes that are not UTF-8 inside a JSON body, arrays nested
50,000 deep (msgspec's RecursionError), numbers Python's int() takes but a person would not
write (`²`, 5,000 digits), and timestamps at the ends of the calendar whose UTC time does not
fit in a datetime. An export checks its range before the first byte; a failure after it is an
incomplete chunked body the client cannot mistake for a whole one.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from smsgw.http.routes import reports
from smsgw.runtime.server import Node
from tests.conftest import DLR_KEY, admin, bearer
from tests.integration.helpers import (
    TO,
    assert_problem,
    create_account,
    db_fetch,
    get_account,
    message_count,
    send,
    wait_all_final,
)

JSON = {"Content-Type": "application/json"}
# Digits that str.isdigit or int() take, and ASCII-only parsers must not.
SUPERSCRIPT_2 = "\N{SUPERSCRIPT TWO}"
ARABIC_3 = "\N{ARABIC-INDIC DIGIT THREE}"
ARABIC_1 = "\N{ARABIC-INDIC DIGIT ONE}"
FULLWIDTH_1 = "\N{FULLWIDTH DIGIT ONE}"
FULLWIDTH_0 = "\N{FULLWIDTH DIGIT ZERO}"
DEEP = 50_000
# At the ends of the calendar with offsets that push the UTC time past year 1 or year 9999.
UNREPRESENTABLE = ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59")
# Not RFC 3339 as the API documents it, though datetime.fromisoformat takes some of them.
NOT_RFC3339 = (
    "2025-01-31T00:00:00",  # no offset
    "2025-01-31",
    "2025-W05-1T00:00:00Z",  # an ISO week date
    "20250131T000000Z",  # basic format
    "2025-01-31T00:00Z",  # no seconds
    f"{FULLWIDTH_1}{FULLWIDTH_0}25-01-31T00:00:00Z",  # full-width digits
    "2025-01-31T00:00:00+24:00",
    "2025-01-31T00:00:00.1234567890Z",  # ten fraction digits
    "2025-01-31T00:00:00Z" + " " * 5_000,
)
STRANGE_LIMITS = (
    SUPERSCRIPT_2,
    ARABIC_3,
    FULLWIDTH_1 + FULLWIDTH_0,
    "1" * 5_000,
    "1_0",
    "+10",
    " 10",
    "10.0",
    "0x10",
    "1e3",
    "",
)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def assert_unchanged(
    client: httpx.AsyncClient, database_url: str, schema: str, key: str, balance: int
) -> None:
    assert await message_count(database_url, schema) == 0
    assert (await get_account(client, key))["balance"] == balance
    accounts = await db_fetch(database_url, schema, "SELECT count(*) AS n FROM accounts")
    assert accounts[0]["n"] == 1


async def post_raw(
    client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    return await client.post(path, content=body, headers={**JSON, **headers})


async def test_a_body_that_is_not_utf8_is_400(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    value = b'{"to": "' + TO.encode() + b'", "text": "caf\xe9"}'
    in_key = b'{"to": "' + TO.encode() + b'", "te\xffxt": "hi"}'
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("/v1/messages", value, bearer(key)),
        ("/v1/messages", in_key, bearer(key)),
        ("/v1/messages", value, {**bearer(key), "Idempotency-Key": "utf8-1"}),
        ("/v1/messages/batch", b'{"messages": [' + value + b"]}", bearer(key)),
        ("/v1/messages/batch", b'{"messages": [' + in_key + b"]}", bearer(key)),
        # One good item and one bad: the body is malformed, so nothing of it is taken.
        (
            "/v1/messages/batch",
            b'{"messages": [{"to": "' + TO.encode() + b'", "text": "ok"}, ' + value + b"]}",
            bearer(key),
        ),
        ("/v1/messages/batch", b'{"messages": [], "\xc3": 1}', bearer(key)),
        (
            "/v1/messages/batch",
            b'{"messages": [' + value + b"]}",
            {**bearer(key), "Idempotency-Key": "utf8-2"},
        ),
        ("/v1/accounts", b'{"name": "\xed\xa0\x80"}', admin()),  # a UTF-8 encoded surrogate
        (
            "/v1/dlr/sim",
            b'{"reports": [{"operator_message_id": "\xff", "status": "delivered"}]}',
            bearer(DLR_KEY),
        ),
    ]
    for path, body, headers in cases:
        problem = assert_problem(await post_raw(client, path, body, headers), 400)
        assert problem["code"] == "malformed_json", problem
        assert "UTF-8" in problem["detail"], problem
    r = await client.patch(
        "/v1/account", content=b'{"callback_url": "\x80"}', headers={**JSON, **bearer(key)}
    )
    assert assert_problem(r, 400)["code"] == "malformed_json"
    await assert_unchanged(client, database_url, schema, key, 1_000)
    assert (await get_account(client, key))["callback_url"] is None


async def test_deeply_nested_bodies_are_refused_whole(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    deep = nested(DEEP)
    good = b'{"to": "' + TO.encode() + b'", "text": "ok"}'
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("/v1/messages/batch", b'{"messages": ' + deep + b"}", bearer(key)),
        ("/v1/messages/batch", b'{"messages": [' + deep + b"]}", bearer(key)),
        ("/v1/messages/batch", b'{"messages": [' + good + b", " + deep + b"]}", bearer(key)),
        ("/v1/messages/batch", b'{"messages": [{"to": ' + deep + b"}]}", bearer(key)),
        ("/v1/messages/batch", b'{"messages": [], "atomic": ' + deep + b"}", bearer(key)),
        (
            "/v1/messages/batch",
            b'{"messages": [' + deep + b"]}",
            {**bearer(key), "Idempotency-Key": "deep-1"},
        ),
        ("/v1/messages", deep, bearer(key)),
        ("/v1/messages", b'{"to": "' + TO.encode() + b'", "text": ' + deep + b"}", bearer(key)),
        ("/v1/messages", deep, {**bearer(key), "Idempotency-Key": "deep-2"}),
        ("/v1/accounts", b'{"name": ' + deep + b"}", admin()),
        ("/v1/dlr/sim", b'{"reports": ' + deep + b"}", bearer(DLR_KEY)),
    ]
    for path, body, headers in cases:
        problem = assert_problem(await post_raw(client, path, body, headers), 400)
        assert problem["code"] == "malformed_json", problem
        assert "too deeply" in problem["detail"], problem
    await assert_unchanged(client, database_url, schema, key, 1_000)


@pytest.mark.parametrize("limit", STRANGE_LIMITS)
async def test_a_limit_of_anything_but_ascii_digits_is_422(
    client: httpx.AsyncClient, limit: str
) -> None:
    account = await create_account(client, 1_000)
    r = await client.get(
        "/v1/messages", params={"limit": limit}, headers=bearer(account["api_key"])
    )
    problem = assert_problem(r, 422)
    assert problem["field"] == "limit", problem


async def test_a_limit_with_leading_zeros_is_still_a_number(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    for i in range(3):
        assert (await send(client, key, f"m{i}")).status_code == 202
    r = await client.get("/v1/messages", params={"limit": "002"}, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 2


ROUTE_RANGES = (
    ("/v1/messages", "created_from", "created_to"),
    ("/v1/reports/summary", "created_from", "created_to"),
    ("/v1/messages/export", "created_from", "created_to"),
)


@pytest.mark.parametrize(("path", "start", "end"), ROUTE_RANGES)
async def test_timestamps_outside_the_calendar_are_422_before_any_byte(
    client: httpx.AsyncClient, path: str, start: str, end: str
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    for value in (*UNREPRESENTABLE, *NOT_RFC3339):
        for name in (start, end):
            r = await client.get(path, params={name: value}, headers=bearer(key))
            problem = assert_problem(r, 422)
            assert problem["field"] == name, (value, problem)


@pytest.mark.parametrize(("path", "start", "end"), ROUTE_RANGES)
async def test_the_ends_of_the_calendar_in_utc_are_valid_bounds(
    client: httpx.AsyncClient, path: str, start: str, end: str
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    message = (await send(client, key, "inside")).json()
    await wait_all_final(client, key, [message["id"]])
    bounds = [
        {start: "0001-01-01T00:00:00Z", end: "9999-12-31T23:59:59.999999Z"},
        {start: "0001-01-01T23:59:00+23:59", end: "9999-12-31T00:00:00-23:59"},
        {start: "2000-01-01T00:00:00.123456789z", end: "9999-12-31t00:00:00+00:00"},
    ]
    for params in bounds:
        r = await client.get(path, params=params, headers=bearer(key))
        assert r.status_code == 200, (params, r.text)
        assert message["id"] in r.text or path == "/v1/reports/summary"
        if path == "/v1/reports/summary":
            assert r.json()["totals"]["messages"] == 1
    # And an empty range at either end is empty, not an error.
    r = await client.get(
        path,
        params={start: "0001-01-01T00:00:00Z", end: "0001-01-01T00:00:00Z"},
        headers=bearer(key),
    )
    assert r.status_code == 200 and message["id"] not in r.text


async def test_other_query_values_postgresql_cannot_take_are_422(
    client: httpx.AsyncClient,
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    for params, field in (
        ({"client_ref": "a\x00b"}, "client_ref"),
        ({"to": f"+{FULLWIDTH_1}915123456789"}, "to"),
        ({"limit": ARABIC_1}, "limit"),
        ({"cursor": ARABIC_3 * 32}, "cursor"),
        ({"cursor": "A" * 31 + "="}, "cursor"),
        ({"cursor": "A" * 5_000}, "cursor"),
    ):
        r = await client.get("/v1/messages", params=params, headers=bearer(key))
        assert assert_problem(r, 422)["field"] == field


async def test_a_message_id_of_other_digits_is_no_message(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    for message_id in (
        ARABIC_1 * 32,
        "0_" + "0" * 30,
        "{" + "0" * 32 + "}",
        "urn:uuid:" + "0" * 32,
    ):
        r = await client.get(f"/v1/messages/{message_id}", headers=bearer(key))
        assert assert_problem(r, 404)["code"] == "message_not_found", message_id


async def test_an_account_id_of_other_digits_is_no_route(client: httpx.AsyncClient) -> None:
    await create_account(client, 1_000)
    for account_id in (ARABIC_1, SUPERSCRIPT_2, FULLWIDTH_1):
        r = await client.post(
            f"/v1/accounts/{account_id}/topups", json={"amount": 5}, headers=admin()
        )
        assert_problem(r, 404)


async def test_an_export_that_fails_midway_ends_as_an_incomplete_body(
    client: httpx.AsyncClient, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the 200 and the header line are sent, a failure cannot become a problem answer:
    the gateway aborts the chunked body without its last chunk, and httpx (like any HTTP/1.1
    client) reports the transfer as incomplete instead of handing over a short CSV."""
    monkeypatch.setattr(reports, "EXPORT_PAGE", 1)
    account = await create_account(client, 1_000)
    key = account["api_key"]
    ids = [(await send(client, key, f"m{i}")).json()["id"] for i in range(3)]
    await wait_all_final(client, key, ids)
    pages = 0
    real = node.store.messages_csv

    async def second_page_fails(*args: Any) -> Any:
        nonlocal pages
        pages += 1
        if pages == 2:
            raise ConnectionResetError("PostgreSQL went away")
        return await real(*args)

    monkeypatch.setattr(node.store, "messages_csv", second_page_fails)
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("GET", "/v1/messages/export", headers=bearer(key)) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_bytes():
                received += chunk
    assert pages == 2
    assert received.startswith(",".join(reports.EXPORT_COLUMNS).encode())
    # The next request on a new connection is answered as usual.
    monkeypatch.setattr(node.store, "messages_csv", real)
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as fresh:
        r = await fresh.get("/v1/messages/export", headers=bearer(key))
        assert r.status_code == 200 and all(i in r.text for i in ids)
