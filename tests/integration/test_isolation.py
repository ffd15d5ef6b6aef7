"""Who may see and do what: accounts are isolated, admin routes need the admin key."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import admin, bearer
from tests.integration.helpers import (
    assert_problem,
    create_account,
    get_account,
    send,
    wait_all_final,
)


async def test_another_accounts_message_is_not_found(client: httpx.AsyncClient) -> None:
    alice = await create_account(client, 100, "alice")
    bob = await create_account(client, 100, "bob")
    r = await send(client, alice["api_key"])
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]

    mine = await client.get(f"/v1/messages/{message_id}", headers=bearer(alice["api_key"]))
    assert mine.status_code == 200 and mine.json()["id"] == message_id
    theirs = await client.get(f"/v1/messages/{message_id}", headers=bearer(bob["api_key"]))
    problem = assert_problem(theirs, 404)
    # Indistinguishable from a message that does not exist at all.
    missing = await client.get(f"/v1/messages/{uuid.uuid4()}", headers=bearer(bob["api_key"]))
    assert assert_problem(missing, 404)["code"] == problem["code"]
    assert_problem(await client.get("/v1/messages/not-a-uuid", headers=bearer(bob["api_key"])), 404)


async def test_each_account_sees_its_own_balance(client: httpx.AsyncClient) -> None:
    alice = await create_account(client, 100, "alice")
    bob = await create_account(client, 30, "bob")
    assert (await send(client, alice["api_key"])).status_code == 202
    me = await get_account(client, bob["api_key"])
    assert (me["id"], me["name"], me["balance"], me["held"]) == (bob["id"], "bob", 30, 0)
    assert (await get_account(client, alice["api_key"]))["id"] == alice["id"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/accounts", {"name": "mallory", "credit": 10**6}),
        ("POST", "/v1/accounts/{id}/topups", {"amount": 10**6}),
        ("GET", "/v1/ops/supervisor", None),
    ],
)
async def test_account_key_on_admin_routes_is_forbidden(
    client: httpx.AsyncClient, method: str, path: str, body: dict | None
) -> None:
    account = await create_account(client, 100)
    r = await client.request(
        method,
        path.format(id=account["id"]),
        json=body,
        headers=bearer(account["api_key"]),
    )
    assert_problem(r, 403)
    assert (await get_account(client, account["api_key"]))["balance"] == 100


async def test_admin_key_has_no_account(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/account", headers=admin()), 403)
    r = await client.post(
        "/v1/messages", json={"to": "+4915123456789", "text": "x"}, headers=admin()
    )
    assert_problem(r, 403)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk_not-a-real-key"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["missing", "unknown", "empty", "basic"],
)
async def test_missing_or_unknown_key_is_401(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    assert_problem(await client.get("/v1/account", headers=headers), 401)
    r = await client.post(
        "/v1/messages", json={"to": "+4915123456789", "text": "x"}, headers=headers
    )
    assert_problem(r, 401)
    assert_problem(await client.get(f"/v1/messages/{uuid.uuid4()}", headers=headers), 401)


async def test_admin_routes_without_a_key_are_401(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/v1/accounts", json={"name": "x"}), 401)
    assert_problem(await client.post("/v1/accounts/1/topups", json={"amount": 5}), 401)
    assert_problem(await client.get("/v1/ops/supervisor"), 401)


async def test_admin_topup_grows_the_balance(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    r = await client.post(
        f"/v1/accounts/{account['id']}/topups", json={"amount": 50}, headers=admin()
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"balance": 150}
    assert (await get_account(client, account["api_key"]))["balance"] == 150
    r = await client.post(
        f"/v1/accounts/{account['id']}/topups", json={"amount": 7}, headers=admin()
    )
    assert r.json() == {"balance": 157}


async def test_topup_of_an_unknown_account_is_404(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    r = await client.post("/v1/accounts/999999/topups", json={"amount": 50}, headers=admin())
    assert_problem(r, 404)
    assert (await get_account(client, account["api_key"]))["balance"] == 100


@pytest.mark.parametrize("amount", [0, -5, "50", 1.5])
async def test_topup_needs_a_positive_whole_amount(
    client: httpx.AsyncClient, amount: object
) -> None:
    account = await create_account(client, 100)
    r = await client.post(
        f"/v1/accounts/{account['id']}/topups", json={"amount": amount}, headers=admin()
    )
    assert_problem(r, 422)
    assert (await get_account(client, account["api_key"]))["balance"] == 100


# --- No account key reaches another account: read, list, export, summarise, spend, top up ---


async def two_accounts_with_messages(client: httpx.AsyncClient) -> tuple[dict, dict, list[str]]:
    """Alice with three messages (one with a client_ref, one express), Bob with none."""
    alice = await create_account(client, 1_000, "alice")
    bob = await create_account(client, 1_000, "bob")
    ids = []
    for fields in ({"client_ref": "alice-1"}, {"express": True}, {}):
        r = await send(client, alice["api_key"], "alice's", **fields)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return alice, bob, ids


async def test_no_key_lists_or_filters_another_accounts_messages(
    client: httpx.AsyncClient,
) -> None:
    alice, bob, ids = await two_accounts_with_messages(client)
    mine = await client.get("/v1/messages", headers=bearer(alice["api_key"]))
    assert {m["id"] for m in mine.json()["items"]} == set(ids)
    for params in (
        {},
        {"client_ref": "alice-1"},
        {"to": "+4915123456789"},
        {"express": "true"},
        {"status": "queued"},
        {"created_from": "2000-01-01T00:00:00Z"},
    ):
        r = await client.get("/v1/messages", params=params, headers=bearer(bob["api_key"]))
        assert r.status_code == 200, r.text
        assert r.json() == {"items": [], "next_cursor": None}, params


async def test_a_cursor_is_a_position_not_a_permission(client: httpx.AsyncClient) -> None:
    alice, bob, _ = await two_accounts_with_messages(client)
    page = await client.get("/v1/messages", params={"limit": 1}, headers=bearer(alice["api_key"]))
    cursor = page.json()["next_cursor"]
    assert cursor
    r = await client.get("/v1/messages", params={"cursor": cursor}, headers=bearer(bob["api_key"]))
    assert r.status_code == 200 and r.json()["items"] == []


async def test_no_key_exports_or_summarises_another_account(client: httpx.AsyncClient) -> None:
    alice, bob, ids = await two_accounts_with_messages(client)
    theirs = await client.get("/v1/messages/export", headers=bearer(bob["api_key"]))
    assert theirs.status_code == 200
    assert theirs.text.count("\n") == 1  # the header only
    assert not any(message_id in theirs.text for message_id in ids)
    mine = await client.get("/v1/messages/export", headers=bearer(alice["api_key"]))
    assert all(message_id in mine.text for message_id in ids)

    summary = await client.get("/v1/reports/summary", headers=bearer(bob["api_key"]))
    assert summary.json()["groups"] == [] and summary.json()["totals"]["messages"] == 0
    summary = await client.get("/v1/reports/summary", headers=bearer(alice["api_key"]))
    assert summary.json()["totals"]["messages"] == 3


async def test_no_key_spends_another_accounts_credit(client: httpx.AsyncClient) -> None:
    alice, bob, ids = await two_accounts_with_messages(client)
    await wait_all_final(client, alice["api_key"], ids)
    alice_before = await get_account(client, alice["api_key"])
    # Bob's client_ref equal to Alice's is Bob's own new message, charged to Bob; it neither
    # returns nor reveals Alice's.
    r = await send(client, bob["api_key"], "bob's", client_ref="alice-1")
    assert r.status_code == 202, r.text
    [bobs] = await wait_all_final(client, bob["api_key"], [r.json()["id"]])
    assert bobs["text"] == "bob's" and bobs["id"] not in ids
    bob_now = await get_account(client, bob["api_key"])
    assert bob_now["balance"] == (995 if bobs["status"] == "sent" else 1_000)
    assert await get_account(client, alice["api_key"]) == alice_before
    # The same Idempotency-Key replays only within the account that used it.
    headers = {**bearer(bob["api_key"]), "Idempotency-Key": "k"}
    a = await client.post(
        "/v1/messages",
        json={"to": "+4915123456789", "text": "x"},
        headers={**bearer(alice["api_key"]), "Idempotency-Key": "k"},
    )
    b = await client.post(
        "/v1/messages", json={"to": "+4915123456789", "text": "x"}, headers=headers
    )
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"] and "Idempotent-Replayed" not in b.headers
    got = await client.get(f"/v1/messages/{a.json()['id']}", headers=bearer(bob["api_key"]))
    assert_problem(got, 404)


async def test_no_account_key_tops_up_any_account(client: httpx.AsyncClient) -> None:
    alice, bob, _ = await two_accounts_with_messages(client)
    for target in (alice, bob):
        r = await client.post(
            f"/v1/accounts/{target['id']}/topups",
            json={"amount": 10**6},
            headers=bearer(alice["api_key"]),
        )
        assert_problem(r, 403)
    assert (await get_account(client, bob["api_key"]))["balance"] == 1_000


async def test_rotating_one_accounts_key_leaves_the_others_alone(
    client: httpx.AsyncClient,
) -> None:
    alice, bob, _ = await two_accounts_with_messages(client)
    r = await client.post("/v1/account/keys/rotate", headers=bearer(alice["api_key"]))
    assert r.status_code == 200
    assert (await get_account(client, bob["api_key"]))["id"] == bob["id"]
    assert (await get_account(client, r.json()["api_key"]))["id"] == alice["id"]
