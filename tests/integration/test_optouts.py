"""Opt-outs and the blocklist over HTTP and PostgreSQL: a send to a number on the account's
opt-out list (bulk only: its OTPs still go) or on the gateway's blocklist (everything) is a
422 `opted_out` with nothing held; in a batch that item alone; on every node at once."""

from __future__ import annotations

import httpx

from tests.conftest import admin, bearer
from tests.integration.helpers import (
    assert_problem,
    create_account,
    db_fetch,
    get_account,
)
from tests.integration.nodes import balanced_nodes

IRAN = "+989121234567"
OTHER = "+4915123456789"


async def send(client: httpx.AsyncClient, key: str, to: str, **fields: object) -> httpx.Response:
    body = {"to": to, "text": "hi", **fields}
    return await client.post("/v1/messages", json=body, headers=bearer(key))


async def opt_out(client: httpx.AsyncClient, key: str, *numbers: str) -> httpx.Response:
    return await client.post(
        "/v1/account/opt-outs", json={"numbers": list(numbers)}, headers=bearer(key)
    )


async def test_an_opt_out_list_is_added_to_paged_and_taken_from(
    client: httpx.AsyncClient,
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    r = await opt_out(client, key, "09121234567", "۰۹۱۲۱۲۳۴۵۶۸", "+4915123456789", IRAN)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "added": 3,
        "numbers": [IRAN, "+989121234568", OTHER, IRAN],
    }
    assert (await opt_out(client, key, IRAN)).json()["added"] == 0
    # One number that is none: nothing is added, and the problem names it.
    problem = assert_problem(await opt_out(client, key, "+989121234569", "0912"), 422)
    assert problem["field"] == "numbers[1]"
    pages, cursor = [], None
    while True:
        params = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        r = await client.get("/v1/account/opt-outs", params=params, headers=bearer(key))
        assert r.status_code == 200, r.text
        pages.append([item["number"] for item in r.json()["items"]])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert pages == [[OTHER, IRAN], ["+989121234568"]]
    assert_problem(
        await client.get("/v1/account/opt-outs", params={"cursor": "nope"}, headers=bearer(key)),
        422,
    )
    # Taken off by any form of the number; a number not on the list is a 404.
    r = await client.delete("/v1/account/opt-outs/09121234568", headers=bearer(key))
    assert r.status_code == 204, r.text
    r = await client.delete("/v1/account/opt-outs/+989121234568", headers=bearer(key))
    assert assert_problem(r, 404)["code"] == "number_not_listed"
    r = await client.get("/v1/account/opt-outs", headers=bearer(key))
    assert [item["number"] for item in r.json()["items"]] == [OTHER, IRAN]
    # Each account's list is its own.
    other = await create_account(client, 1_000, name="other")
    r = await client.get("/v1/account/opt-outs", headers=bearer(other["api_key"]))
    assert r.json() == {"items": [], "next_cursor": None}


async def test_an_opted_out_number_gets_no_bulk_but_its_otps(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    assert (await opt_out(client, key, "09121234567")).status_code == 200
    before = await get_account(client, key)
    for typed in (IRAN, "0912 123 4567"):
        problem = assert_problem(await send(client, key, typed), 422)
        assert (problem["code"], problem["field"]) == ("opted_out", "to")
    assert await get_account(client, key) == before  # nothing held or charged
    rows = await db_fetch(database_url, schema, "SELECT count(*) AS n FROM messages")
    assert rows == [{"n": 0}]
    # The product decision: opt-outs stop campaigns, not login codes.
    r = await send(client, key, IRAN, express=True)
    assert r.status_code == 202, r.text
    # Another account's opt-outs are not this one's.
    other = await create_account(client, 1_000, name="other")
    assert (await send(client, other["api_key"], IRAN)).status_code == 202
    # Taken off the list: bulk goes again.
    assert (
        await client.delete(f"/v1/account/opt-outs/{IRAN}", headers=bearer(key))
    ).status_code == 204
    assert (await send(client, key, IRAN)).status_code == 202


async def test_the_blocklist_stops_every_message_of_every_account(
    client: httpx.AsyncClient,
) -> None:
    accounts = [await create_account(client, 1_000, name=f"a{i}") for i in range(2)]
    r = await client.post("/v1/blocklist", json={"numbers": ["09121234567"]}, headers=admin())
    assert r.status_code == 200, r.text
    assert r.json() == {"added": 1, "numbers": [IRAN]}
    key = accounts[0]["api_key"]
    assert_problem(
        await client.post("/v1/blocklist", json={"numbers": [OTHER]}, headers=bearer(key)), 403
    )
    assert_problem(await client.get("/v1/blocklist", headers=bearer(key)), 403)
    for account in accounts:
        for express in (False, True):
            problem = assert_problem(
                await send(client, account["api_key"], IRAN, express=express), 422
            )
            assert problem["code"] == "opted_out"
        assert (await send(client, account["api_key"], OTHER)).status_code == 202
    r = await client.get("/v1/blocklist", headers=admin())
    assert [item["number"] for item in r.json()["items"]] == [IRAN]
    r = await client.delete(f"/v1/blocklist/{IRAN}", headers=admin())
    assert r.status_code == 204
    assert (await send(client, key, IRAN, express=True)).status_code == 202


async def test_a_batch_refuses_only_the_opted_out_item(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100_000)
    key = account["api_key"]
    assert (await opt_out(client, key, IRAN)).status_code == 200
    items = [{"to": to, "text": "hi"} for to in (OTHER, "09121234567", "+4915123456788")]
    r = await client.post("/v1/messages/batch", json={"messages": items}, headers=bearer(key))
    assert r.status_code == 202, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == ["queued", "rejected", "queued"]
    error = body["results"][1]["error"]
    assert (error["code"], error["field"], error["status"]) == ("opted_out", "to", 422)
    balance = (await get_account(client, key))["balance"]
    assert balance == 100_000 - 10  # held, or captured once sent
    # Atomic: all or none.
    r = await client.post(
        "/v1/messages/batch", json={"messages": items, "atomic": True}, headers=bearer(key)
    )
    assert assert_problem(r, 422)["code"] == "opted_out"
    assert (await get_account(client, key))["balance"] == balance
    # A batch large enough to be written by COPY is checked the same way.
    many = [{"to": f"+4915{i:09d}", "text": "hi"} for i in range(500)]
    many[321] = {"to": "0912 123 4567", "text": "hi"}
    r = await client.post("/v1/messages/batch", json={"messages": many}, headers=bearer(key))
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (499, 1)
    assert body["results"][321]["error"]["code"] == "opted_out"


async def test_an_opt_out_holds_on_every_node_at_once(database_url: str, schema: str) -> None:
    async with balanced_nodes(database_url, schema, "a", "b") as members:
        [ca, cb] = [m.client for m in members]
        account = await create_account(ca, 1_000)
        key = account["api_key"]
        assert (await send(cb, key, IRAN)).status_code == 202
        assert (await opt_out(ca, key, IRAN)).status_code == 200
        # No waiting: the group commit that would store it reads the list.
        problem = assert_problem(await send(cb, key, IRAN), 422)
        assert problem["code"] == "opted_out"
        r = await ca.post("/v1/blocklist", json={"numbers": [OTHER]}, headers=admin())
        assert r.status_code == 200
        problem = assert_problem(await send(cb, key, OTHER, express=True), 422)
        assert problem["code"] == "opted_out"
