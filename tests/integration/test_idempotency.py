"""Idempotency-Key and client_ref over real HTTP and PostgreSQL: one message per key or ref."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import trio

from smsgw.engine.messages import Account, OutboundSms
from smsgw.engine.ports import WriteGroup
from smsgw.http import idempotency
from smsgw.http.context import uuid7
from smsgw.storage.pg import PgStore
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    RELIABLE,
    TO,
    assert_ledger_consistent,
    assert_problem,
    create_account,
    db_fetch,
    get_account,
    http_client,
    ledger,
    message_count,
    open_database,
    open_node,
    send,
)

BODY = {"to": TO, "text": "your code is 1234"}


async def post(
    client: httpx.AsyncClient, api_key: str, body: object, idem: str | None, **kw: str
) -> httpx.Response:
    headers = bearer(api_key)
    if idem is not None:
        headers["Idempotency-Key"] = idem
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(
        "/v1/messages",
        content=content,
        headers={**headers, "Content-Type": "application/json", **kw},
    )


# --- Idempotency-Key ------------------------------------------------------------------------


async def test_same_key_same_body_replays_the_first_answer(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 100)
    key = account["api_key"]
    first = await post(client, key, BODY, "k-1")
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    # The same request, written differently: key order and whitespace do not matter.
    reordered = json.dumps({"text": BODY["text"], "to": TO}, indent=2).encode()
    for body in (BODY, reordered):
        again = await post(client, key, body, "k-1")
        assert again.status_code == 202
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
        assert again.headers["content-type"] == "application/json"
    assert await message_count(database_url, schema) == 1
    assert (await ledger(database_url, schema))[account["id"]]["l_hold"] == 5  # held once


async def test_same_key_different_body_is_422_and_changes_nothing(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 100)
    key = account["api_key"]
    assert (await post(client, key, BODY, "k-2")).status_code == 202
    problem = assert_problem(await post(client, key, {**BODY, "text": "other"}, "k-2"), 422)
    assert problem["code"] == "idempotency_key_reused"
    # Another route with the same key is another request too.
    assert await message_count(database_url, schema) == 1
    assert (await ledger(database_url, schema))[account["id"]]["l_hold"] == 5


async def test_keys_are_per_account(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    alice = await create_account(client, 100, "alice")
    bob = await create_account(client, 100, "bob")
    a = await post(client, alice["api_key"], BODY, "shared")
    b = await post(client, bob["api_key"], BODY, "shared")
    assert a.status_code == b.status_code == 202
    assert "Idempotent-Replayed" not in b.headers
    assert a.json()["id"] != b.json()["id"]
    # Bob's different body under the same key is not a mismatch with Alice's.
    c = await post(client, bob["api_key"], {**BODY, "text": "x"}, "shared-2")
    assert c.status_code == 202
    assert await message_count(database_url, schema) == 3


async def test_concurrent_requests_with_one_key_create_one_message(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(await post(client, key, BODY, "burst"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    created = [r for r in responses if r.status_code == 202]
    busy = [r for r in responses if r.status_code == 409]
    assert len(created) + len(busy) == 20, [r.text for r in responses]
    assert created, "no request ran"
    assert len({r.json()["id"] for r in created}) == 1
    for r in busy:
        assert assert_problem(r, 409)["code"] == "idempotency_key_in_progress"
    assert await message_count(database_url, schema) == 1
    assert (await ledger(database_url, schema))[account["id"]]["l_hold"] == 5
    # Once answered, the key replays.
    again = await post(client, key, BODY, "burst")
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"


async def test_a_key_in_progress_is_409(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 100)
    body = json.dumps(BODY).encode()
    fingerprint = idempotency.request_hash("POST", "/v1/messages", body)
    await db_fetch(
        database_url,
        schema,
        "INSERT INTO idempotency_keys (account_id, key, request_hash) VALUES ($1, $2, $3)",
        account["id"],
        "running",
        fingerprint,
    )
    r = await post(client, account["api_key"], body, "running")
    assert assert_problem(r, 409)["code"] == "idempotency_key_in_progress"
    assert await message_count(database_url, schema) == 0


async def test_refusals_are_replayed_and_validation_errors_too(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 0)
    key = account["api_key"]
    refused = await post(client, key, BODY, "poor")
    assert_problem(refused, 402)
    await client.post(f"/v1/accounts/{account['id']}/topups", json={"amount": 50}, headers=admin())
    replay = await post(client, key, BODY, "poor")
    assert replay.status_code == 402 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["content-type"] == "application/problem+json"
    assert replay.json() == refused.json()
    # A new key after the top-up is a new request.
    assert (await post(client, key, BODY, "rich")).status_code == 202

    invalid = {"to": "12", "text": "x"}
    first = assert_problem(await post(client, key, invalid, "bad"), 422)
    again = await post(client, key, invalid, "bad")
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first
    assert await message_count(database_url, schema) == 1


@pytest.mark.parametrize("value", ["", "x" * 256, "naïve"])
async def test_a_malformed_key_is_422(
    client: httpx.AsyncClient, database_url: str, schema: str, value: str
) -> None:
    account = await create_account(client, 100)
    headers = [
        *bearer(account["api_key"]).items(),
        ("Content-Type", "application/json"),
        ("Idempotency-Key", value.encode()),
    ]
    r = await client.post("/v1/messages", content=json.dumps(BODY).encode(), headers=headers)
    assert assert_problem(r, 422)["code"] == "invalid_idempotency_key"
    assert await message_count(database_url, schema) == 0


async def test_keys_expire_after_24_hours(
    client: httpx.AsyncClient,
    database_url: str,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = await create_account(client, 100)
    key = account["api_key"]
    first = await post(client, key, BODY, "old")
    await db_fetch(
        database_url,
        schema,
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'",
    )
    # An expired key is a new request: a new message, and a different body is no mismatch.
    second = await post(client, key, {**BODY, "text": "again"}, "old")
    assert second.status_code == 202 and "Idempotent-Replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]
    assert await message_count(database_url, schema) == 2

    # The periodic purge deletes expired records.
    await post(client, key, BODY, "stale")
    await db_fetch(
        database_url,
        schema,
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'stale'",
    )
    monkeypatch.setattr(idempotency, "PURGE_EVERY_S", 0.0)
    await post(client, key, {**BODY, "text": "third"}, "fresh")
    rows = await db_fetch(database_url, schema, "SELECT key FROM idempotency_keys ORDER BY key")
    assert [r["key"] for r in rows] == ["fresh", "old"]


async def test_a_request_that_changed_nothing_frees_its_key(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 100)
    key = account["api_key"]
    # Refused by the body limit before the handler ran: the key may be used again.
    huge = b'{"to": "' + b"1" * (5 << 20) + b'"}'
    r = await post(client, key, huge, "big")
    assert r.status_code == 413
    assert await db_fetch(database_url, schema, "SELECT key FROM idempotency_keys") == []
    assert (await post(client, key, BODY, "big")).status_code == 202


async def test_no_key_no_record(client: httpx.AsyncClient, database_url: str, schema: str) -> None:
    account = await create_account(client, 100)
    assert (await post(client, account["api_key"], BODY, None)).status_code == 202
    assert (await post(client, account["api_key"], BODY, None)).status_code == 202
    assert await message_count(database_url, schema) == 2
    assert await db_fetch(database_url, schema, "SELECT key FROM idempotency_keys") == []


# --- client_ref ---------------------------------------------------------------------------


async def test_a_duplicate_client_ref_returns_the_existing_message(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 100)
    key = account["api_key"]
    first = await send(client, key, "order 17 shipped", client_ref="order-17")
    assert first.status_code == 202, first.text
    balance = (await get_account(client, key))["balance"]

    dup = await send(client, key, "order 17 shipped, again", client_ref="order-17")
    assert dup.status_code == 200, dup.text
    existing = dup.json()
    assert existing["id"] == first.json()["id"]
    assert existing["text"] == "order 17 shipped" and existing["client_ref"] == "order-17"
    got = await client.get(f"/v1/messages/{existing['id']}", headers=bearer(key))
    assert set(existing) == set(got.json())
    # Nothing stored, nothing held.
    assert await message_count(database_url, schema) == 1
    assert (await get_account(client, key))["balance"] == balance
    # A different ref is a different message.
    assert (await send(client, key, "x", client_ref="order-18")).status_code == 202
    assert await message_count(database_url, schema) == 2


async def test_client_refs_are_per_account(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    alice = await create_account(client, 100, "alice")
    bob = await create_account(client, 100, "bob")
    a = await send(client, alice["api_key"], "a", client_ref="same")
    b = await send(client, bob["api_key"], "b", client_ref="same")
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


async def test_invalid_message_with_a_used_client_ref_is_still_422(
    client: httpx.AsyncClient,
) -> None:
    account = await create_account(client, 100)
    assert (await send(client, account["api_key"], "a", client_ref="r")).status_code == 202
    r = await client.post(
        "/v1/messages",
        json={"to": "nope", "text": "a", "client_ref": "r"},
        headers=bearer(account["api_key"]),
    )
    assert_problem(r, 422)


async def test_concurrent_sends_with_one_new_client_ref_store_one_message(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        key = account["api_key"]
        for round_ in range(5):
            responses: list[httpx.Response] = []

            async def one(i: int, ref: str, out: list[httpx.Response]) -> None:
                out.append(await send(client, key, f"race {i}", client_ref=ref))

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(one, i, f"race-{round_}", responses)
            statuses = sorted(r.status_code for r in responses)
            assert statuses.count(202) == 1 and statuses.count(200) == 9, statuses
            assert len({r.json()["id"] for r in responses}) == 1
        assert await message_count(database_url, schema) == 5
        assert 1_000 - (await get_account(client, key))["balance"] == 25
        assert_ledger_consistent(await ledger(database_url, schema))


def sms(account_id: int, client_ref: str | None, price: int = 5) -> OutboundSms:
    return OutboundSms(
        id=uuid7(),
        account_id=account_id,
        to=TO,
        sender="smsgw",
        text="x",
        segments=1,
        price=price,
        express=False,
        created_at=time.time(),
        client_ref=client_ref,
    )


async def test_group_commit_stores_and_holds_one_message_per_client_ref(
    database_url: str, schema: str
) -> None:
    """The store is the arbiter: a group with two new messages sharing a client_ref, and a
    later group repeating it, store one message and hold its price once; the others are
    answered `duplicate_client_ref`, and no group fails."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        group = WriteGroup()
        group.creates.append(("acme", 100, b"k" * 32))
        [account] = (await store.commit_group(group)).creates
        assert isinstance(account, Account)

        group = WriteGroup()
        first, twin, free = (
            sms(account.id, "ref"),
            sms(account.id, "ref"),
            sms(account.id, None),
        )
        group.accepts += [((first,), True), ((twin,), True), ((free,), True)]
        result = await store.commit_group(group)
        assert [r[0].accepted for r in result.accepts] == [True, False, True]
        assert result.accepts[1][0].reason == "duplicate_client_ref"

        group = WriteGroup()
        group.accepts.append(((sms(account.id, "ref"),), True))
        result = await store.commit_group(group)
        assert result.accepts[0][0].reason == "duplicate_client_ref"
    rows = await db_fetch(database_url, schema, "SELECT id::text FROM messages")
    assert sorted(r["id"] for r in rows) == sorted([first.id, free.id])
    accounts = await ledger(database_url, schema)
    assert accounts[account.id]["held"] == 10 and accounts[account.id]["balance"] == 90
    assert_ledger_consistent(accounts)


async def test_a_retried_batch_with_one_key_stores_its_messages_once(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    """A batch without client_refs is only safe to retry under an Idempotency-Key."""
    account = await create_account(client, 100)
    headers = {**bearer(account["api_key"]), "Idempotency-Key": "batch-1"}
    body = {"messages": [BODY, {**BODY, "text": "second"}]}
    first = await client.post("/v1/messages/batch", json=body, headers=headers)
    assert first.status_code == 202, first.text
    again = await client.post("/v1/messages/batch", json=body, headers=headers)
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert await message_count(database_url, schema) == 2
    assert (await ledger(database_url, schema))[account["id"]]["l_hold"] == 10
    other = await client.post("/v1/messages/batch", json={"messages": [BODY]}, headers=headers)
    assert_problem(other, 422)
    assert await message_count(database_url, schema) == 2
