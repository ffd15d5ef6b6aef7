"""Numbers as people type them, over HTTP and PostgreSQL: `to` in the national forms of the
account's `default_country` (IR unless set), stored and answered as E.164; a number that is
none is a 422 naming the field, in a single send and in a batch item."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from tests.conftest import admin, bearer
from tests.integration.helpers import assert_problem, create_account, db_fetch, http_client
from tests.integration.nodes import serve_node

IRAN = "+989121234567"


async def send(client: httpx.AsyncClient, key: str, to: str, **fields: object) -> httpx.Response:
    body = {"to": to, "text": "hi", **fields}
    return await client.post("/v1/messages", json=body, headers=bearer(key))


async def test_iranian_forms_are_stored_and_answered_as_e164(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    for typed in ("09121234567", "0098 912 123 4567", "+98-912-1234567", "۰۹۱۲۱۲۳۴۵۶۷"):
        r = await send(client, key, typed)
        assert r.status_code == 202, (typed, r.text)
        message = (await client.get(f"/v1/messages/{r.json()['id']}", headers=bearer(key))).json()
        assert message["to"] == IRAN, typed
    rows = await db_fetch(database_url, schema, "SELECT DISTINCT recipient FROM messages")
    assert rows == [{"recipient": IRAN}]
    # The list filters by the stored form.
    r = await client.get("/v1/messages", params={"to": IRAN}, headers=bearer(key))
    assert len(r.json()["items"]) == 4


async def test_a_number_that_is_none_is_a_422_naming_to(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    for typed in ("0912123456", "+98912123456", "015123456789", "hello", "+999123456789"):
        problem = assert_problem(await send(client, account["api_key"], typed), 422)
        assert problem["field"] == "to", typed
        assert "IR" in problem["detail"]
    assert (await client.get("/v1/account", headers=bearer(account["api_key"]))).json()["held"] == 0


async def test_the_accounts_default_country_reads_its_national_forms(
    client: httpx.AsyncClient,
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    assert_problem(await send(client, key, "015123456789"), 422)
    r = await client.put(
        f"/v1/accounts/{account['id']}/settings", json={"default_country": "DE"}, headers=admin()
    )
    assert r.status_code == 200, r.text
    assert r.json()["default_country"] == "DE"
    r = await send(client, key, "0151 23456789")
    assert r.status_code == 202, r.text
    message = (await client.get(f"/v1/messages/{r.json()['id']}", headers=bearer(key))).json()
    assert message["to"] == "+4915123456789"
    # E.164 is E.164 whatever the country; a national form is now read as German.
    assert (await send(client, key, IRAN)).status_code == 202
    r = await send(client, key, "09121234567")
    message = (await client.get(f"/v1/messages/{r.json()['id']}", headers=bearer(key))).json()
    assert message["to"] == "+499121234567"  # a Franconian landline, not a Tehran mobile
    for bad in ("de", "XX", "DEU"):
        r = await client.put(
            f"/v1/accounts/{account['id']}/settings", json={"default_country": bad}, headers=admin()
        )
        assert "default_country" in assert_problem(r, 422)["detail"], bad


async def test_a_batch_normalises_each_item_and_refuses_only_the_bad_one(
    client: httpx.AsyncClient,
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    items = [{"to": to, "text": "hi"} for to in ("09121234567", "0912", "+4915123456789")]
    r = await client.post("/v1/messages/batch", json={"messages": items}, headers=bearer(key))
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["queued", "rejected", "queued"]
    assert results[1]["error"]["field"] == "to" and results[1]["error"]["status"] == 422
    message = (await client.get(f"/v1/messages/{results[0]['id']}", headers=bearer(key))).json()
    assert message["to"] == IRAN


async def test_the_hourly_limit_counts_a_number_however_it_is_written(
    client: httpx.AsyncClient,
) -> None:
    account = await create_account(client, 1_000)
    r = await client.put(
        f"/v1/accounts/{account['id']}/settings",
        json={"recipient_limit_per_hour": 2},
        headers=admin(),
    )
    assert r.status_code == 200
    key = account["api_key"]
    assert (await send(client, key, "09121234567")).status_code == 202
    assert (await send(client, key, "۰۹۱۲۱۲۳۴۵۶۷")).status_code == 202
    assert_problem(await send(client, key, "+98 912 123 4567"), 429)


async def test_serve_default_country_sets_the_nodes(database_url: str, schema: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            serve_node(
                database_url, schema, "de", Path(tmp) / "log", "--default-country", "DE"
            ) as node,
            http_client(node.url) as client,
        ):
            account = await create_account(client, 1_000)
            r = await send(client, account["api_key"], "0151 23456789")
            assert r.status_code == 202, r.text
            assert_problem(await send(client, account["api_key"], "0151 2345"), 422)
