"""Sender IDs over HTTP and PostgreSQL: an account sends only from the senders the admin
allowed it (PUT /v1/accounts/{id}/senders), a send without one uses its default, `from` is
an alias of `sender`, and a change holds on every node within a second."""

from __future__ import annotations

import httpx
import trio

from tests.conftest import admin, bearer
from tests.integration.helpers import TO, assert_problem, create_account, until
from tests.integration.nodes import balanced_nodes


async def send(client: httpx.AsyncClient, key: str, **fields: object) -> httpx.Response:
    return await client.post(
        "/v1/messages", json={"to": TO, "text": "hi", **fields}, headers=bearer(key)
    )


async def sender_of(client: httpx.AsyncClient, key: str, r: httpx.Response) -> str:
    assert r.status_code == 202, r.text
    message = await client.get(f"/v1/messages/{r.json()['id']}", headers=bearer(key))
    return str(message.json()["sender"])


async def put_senders(client: httpx.AsyncClient, account_id: int, body: dict) -> httpx.Response:
    return await client.put(f"/v1/accounts/{account_id}/senders", json=body, headers=admin())


async def test_without_a_list_any_valid_sender_goes_and_the_default_is_smsgw(
    client: httpx.AsyncClient,
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    assert await sender_of(client, key, await send(client, key)) == "smsgw"
    assert await sender_of(client, key, await send(client, key, sender="ANYONE")) == "ANYONE"
    assert await sender_of(client, key, await send(client, key, **{"from": "SEED"})) == "SEED"


async def test_an_account_sends_only_from_its_senders(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    r = await put_senders(
        client, account["id"], {"senders": ["BANK", "+98910000000"], "default": "BANK"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "account_id": account["id"],
        "senders": ["BANK", "+98910000000"],
        "default": "BANK",
    }
    assert await sender_of(client, key, await send(client, key)) == "BANK"
    r = await send(client, key, sender="+98910000000")
    assert await sender_of(client, key, r) == "+98910000000"
    assert await sender_of(client, key, await send(client, key, **{"from": "BANK"})) == "BANK"
    problem = assert_problem(await send(client, key, sender="OTHER"), 422)
    assert (problem["code"], problem["field"]) == ("sender_not_allowed", "sender")
    assert "BANK" in problem["detail"]
    problem = assert_problem(await send(client, key, **{"from": "bank"}), 422)
    assert (problem["code"], problem["field"]) == ("sender_not_allowed", "from")
    # Both names: the same value is one sender, two values are a mistake.
    assert (
        await sender_of(client, key, await send(client, key, sender="BANK", **{"from": "BANK"}))
        == "BANK"
    )
    problem = assert_problem(
        await send(client, key, sender="BANK", **{"from": "+98910000000"}), 422
    )
    assert (problem["code"], problem["field"]) == ("invalid_field", "from")


async def test_a_batch_refuses_only_the_item_with_another_sender(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    assert (await put_senders(client, account["id"], {"senders": ["BANK"]})).status_code == 200
    items = [
        {"to": TO, "text": "a"},
        {"to": TO, "text": "b", "sender": "SHOP"},
        {"to": TO, "text": "c", "from": "BANK"},
    ]
    r = await client.post("/v1/messages/batch", json={"messages": items}, headers=bearer(key))
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["queued", "rejected", "queued"]
    assert results[1]["error"] == {
        "code": "sender_not_allowed",
        "field": "sender",
        "detail": results[1]["error"]["detail"],
        "status": 422,
    }


async def test_the_list_is_checked_and_an_empty_one_lifts_it(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    bad = [
        ({"senders": ["BANK"], "default": "SHOP"}, "default"),
        ({"senders": ["BANK", "no!"]}, "senders[1]"),
        ({"senders": [], "default": "tooooooolong"}, "default"),
    ]
    for body, field in bad:
        assert assert_problem(await put_senders(client, account["id"], body), 422)["field"] == field
    assert_problem(await put_senders(client, 999_999, {"senders": ["BANK"]}), 404)
    r = await client.put(
        f"/v1/accounts/{account['id']}/senders", json={"senders": ["BANK"]}, headers=bearer(key)
    )
    assert_problem(r, 403)
    # No default: the first sender is.
    r = await put_senders(client, account["id"], {"senders": ["SHOP", "BANK"]})
    assert r.json()["default"] == "SHOP"
    assert await sender_of(client, key, await send(client, key)) == "SHOP"
    # An empty list: any valid sender again, with the default given (else smsgw).
    r = await put_senders(client, account["id"], {"senders": [], "default": "ACME"})
    assert r.json() == {"account_id": account["id"], "senders": [], "default": "ACME"}
    assert await sender_of(client, key, await send(client, key)) == "ACME"
    assert await sender_of(client, key, await send(client, key, sender="OTHER")) == "OTHER"
    r = await put_senders(client, account["id"], {"senders": []})
    assert r.json()["default"] == "smsgw"
    assert await sender_of(client, key, await send(client, key)) == "smsgw"


async def test_new_senders_hold_on_every_node_within_a_second(
    database_url: str, schema: str
) -> None:
    async with balanced_nodes(database_url, schema, "a", "b") as members:
        [ca, cb] = [m.client for m in members]
        account = await create_account(ca, 1_000)
        key = account["api_key"]
        # b knows the account (and its settings: none) before the change.
        assert (await send(cb, key, sender="OTHER")).status_code == 202
        r = await put_senders(ca, account["id"], {"senders": ["BANK"]})
        assert r.status_code == 200, r.text

        async def refused_on_b() -> bool:
            return (await send(cb, key, sender="OTHER")).status_code == 422

        with trio.fail_after(1.0):
            await until(refused_on_b, interval=0.05)
        assert await sender_of(cb, key, await send(cb, key)) == "BANK"
