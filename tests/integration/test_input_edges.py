"""Inputs PostgreSQL cannot store are refused at the edge, never inside a group commit.

A group commit is one transaction for many requests: one value PostgreSQL refuses (a NUL in
text, an id past bigint) would fail every request in the group with 503. Schemathesis found
both; these pin them down.
"""

from __future__ import annotations

import httpx

from tests.conftest import admin, bearer
from tests.integration.helpers import TO, assert_problem, create_account


async def test_nul_characters_are_422_naming_the_field(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    cases = [
        ({"to": TO, "text": "a\u0000b"}, "text"),
        ({"to": TO, "text": "ok", "client_ref": "r\u0000"}, "client_ref"),
        ({"to": TO, "text": "ok", "sender": "\u0000"}, "sender"),
    ]
    for body, field in cases:
        problem = assert_problem(
            await client.post("/v1/messages", json=body, headers=bearer(key)), 422
        )
        assert problem["field"] == field, problem
    problem = assert_problem(
        await client.post("/v1/accounts", json={"name": "a\u0000"}, headers=admin()), 422
    )
    assert problem["field"] == "name"
    # A literal backslash-u in text is just text.
    r = await client.post("/v1/messages", json={"to": TO, "text": "\\u0000"}, headers=bearer(key))
    assert r.status_code == 202, r.text


async def test_a_nul_in_one_batch_item_refuses_that_item_only(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    body = {"messages": [{"to": TO, "text": "fine"}, {"to": TO, "text": "bad\u0000"}]}
    r = await client.post("/v1/messages/batch", json=body, headers=bearer(account["api_key"]))
    assert r.status_code == 202, r.text
    first, second = r.json()["results"]
    assert first["status"] == "queued"
    error = second["error"]
    assert (second["status"], error["code"], error["field"]) == (
        "rejected",
        "invalid_field",
        "text",
    )


async def test_an_account_id_past_bigint_is_no_account(client: httpx.AsyncClient) -> None:
    r = await client.post(f"/v1/accounts/{2**63}/topups", json={"amount": 1}, headers=admin())
    assert_problem(r, 404)
    r = await client.post(f"/v1/accounts/{2**63 - 1}/topups", json={"amount": 1}, headers=admin())
    assert assert_problem(r, 404)["code"] == "account_not_found"
