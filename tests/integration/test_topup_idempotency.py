"""Top-ups over real HTTP and PostgreSQL: Idempotency-Key credits once, an amount the credit
columns cannot hold is a 422 that changes nothing."""

from __future__ import annotations

import httpx
import trio

from smsgw.engine.credit import CREDIT_MAX
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    assert_ledger_consistent,
    assert_problem,
    create_account,
    db_fetch,
    get_account,
    ledger,
    send,
    wait_final,
)


async def topup(
    client: httpx.AsyncClient, account_id: int, amount: int, key: str | None = None
) -> httpx.Response:
    headers = admin() if key is None else {**admin(), "Idempotency-Key": key}
    return await client.post(
        f"/v1/accounts/{account_id}/topups", json={"amount": amount}, headers=headers
    )


async def topped_up(database_url: str, schema: str, account_id: int) -> int:
    """What the ledger says the account was given (creation credit and top-ups)."""
    return (await ledger(database_url, schema))[account_id]["l_topup"]


async def fill_to(database_url: str, schema: str, account_id: int, room: int) -> None:
    """Top the account up in SQL (no request may add more than 10^15) until it can take only
    `room` more, keeping its ledger consistent."""
    rows = await db_fetch(
        database_url, schema, "SELECT topped_up FROM accounts WHERE id = $1", account_id
    )
    add = CREDIT_MAX - room - rows[0]["topped_up"]
    await db_fetch(
        database_url,
        schema,
        "WITH a AS (UPDATE accounts SET balance = balance + $2, topped_up = topped_up + $2"
        "           WHERE id = $1 RETURNING balance)"
        " INSERT INTO credit_ledger (account_id, kind, amount, balance_after)"
        " SELECT $1, 'topup', $2, a.balance FROM a",
        account_id,
        add,
    )


# --- Idempotency-Key ------------------------------------------------------------------------


async def test_a_retried_topup_credits_once_and_replays(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 100)
    first = await topup(client, account["id"], 50, "topup-1")
    assert first.status_code == 200, first.text
    assert first.json() == {"balance": 150}
    assert "Idempotent-Replayed" not in first.headers
    # Meanwhile the balance moves: the replay is still the first answer, not a new top-up.
    assert (await send(client, account["api_key"])).status_code == 202
    for _ in range(3):
        again = await topup(client, account["id"], 50, "topup-1")
        assert again.status_code == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == {"balance": 150}
    assert (await get_account(client, account["api_key"]))["balance"] == 145
    assert await topped_up(database_url, schema, account["id"]) == 150
    # A new key is a new top-up.
    assert (await topup(client, account["id"], 50, "topup-2")).json() == {"balance": 195}
    assert await topped_up(database_url, schema, account["id"]) == 200


async def test_concurrent_topups_with_one_key_credit_once(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 0)
    responses: list[httpx.Response] = []

    async def one() -> None:
        responses.append(await topup(client, account["id"], 70, "burst"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    credited = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 409]
    assert len(credited) + len(busy) == 20, [r.text for r in responses]
    assert {r.json()["balance"] for r in credited} == {70}
    for r in busy:
        assert assert_problem(r, 409)["code"] == "idempotency_key_in_progress"
    assert await topped_up(database_url, schema, account["id"]) == 70
    assert (await get_account(client, account["api_key"]))["balance"] == 70


async def test_same_topup_key_different_amount_is_422_and_changes_nothing(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 100)
    assert (await topup(client, account["id"], 50, "k")).status_code == 200
    problem = assert_problem(await topup(client, account["id"], 60, "k"), 422)
    assert problem["code"] == "idempotency_key_reused"
    assert await topped_up(database_url, schema, account["id"]) == 150


async def test_admin_topup_keys_are_per_target_account(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    alice = await create_account(client, 0, "alice")
    bob = await create_account(client, 0, "bob")
    a = await topup(client, alice["id"], 10, "shared")
    b = await topup(client, bob["id"], 20, "shared")
    assert (a.status_code, b.status_code) == (200, 200), b.text
    assert "Idempotent-Replayed" not in b.headers
    assert await topped_up(database_url, schema, alice["id"]) == 10
    assert await topped_up(database_url, schema, bob["id"]) == 20
    # The account's own keys are another namespace: its message under the same key is no
    # mismatch with the admin's top-up, either way round.
    r = await client.post(
        "/v1/messages",
        json={"to": "+4915123456789", "text": "hi"},
        headers={**bearer(alice["api_key"]), "Idempotency-Key": "shared"},
    )
    assert r.status_code == 202 and "Idempotent-Replayed" not in r.headers, r.text
    assert (await topup(client, alice["id"], 10, "shared")).headers["Idempotent-Replayed"] == "true"
    rows = await db_fetch(
        database_url, schema, "SELECT account_id FROM idempotency_keys ORDER BY account_id"
    )
    assert [r["account_id"] for r in rows] == sorted([-bob["id"], -alice["id"], alice["id"]])


async def test_only_the_admin_claims_a_topup_key(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 0)
    r = await client.post(
        f"/v1/accounts/{account['id']}/topups",
        json={"amount": 10**6},
        headers={**bearer(account["api_key"]), "Idempotency-Key": "mine"},
    )
    assert_problem(r, 403)
    assert await db_fetch(database_url, schema, "SELECT key FROM idempotency_keys") == []
    # So the admin's request with that key runs.
    assert (await topup(client, account["id"], 5, "mine")).json() == {"balance": 5}


# --- amounts the credit cannot hold ----------------------------------------------------------


async def test_a_topup_past_what_the_balance_holds_is_422_and_changes_nothing(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 100)
    sent = await send(client, account["api_key"])
    assert sent.status_code == 202
    await wait_final(client, account["api_key"], sent.json()["id"])  # nothing moves after
    await fill_to(database_url, schema, account["id"], room=1_000)
    before = await ledger(database_url, schema)

    for key in (None, "too-much"):
        problem = assert_problem(await topup(client, account["id"], 1_001, key), 422)
        assert problem["code"] == "amount_too_large" and problem["field"] == "amount"
        assert "1000" in problem["detail"]
    replay = await topup(client, account["id"], 1_001, "too-much")
    assert replay.status_code == 422 and replay.headers["Idempotent-Replayed"] == "true"
    assert await ledger(database_url, schema) == before

    # Exactly the room fits; then nothing more does.
    r = await topup(client, account["id"], 1_000)
    assert r.status_code == 200, r.text
    balance = r.json()["balance"]
    after = (await ledger(database_url, schema))[account["id"]]
    assert after["topped_up"] == CREDIT_MAX and after["balance"] == balance
    assert assert_problem(await topup(client, account["id"], 1), 422)["code"] == (
        "amount_too_large"
    )
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_a_topup_too_large_fails_no_one_elses_request(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    """The refusal is found in the group commit: the group's other requests commit anyway
    (before, the whole group failed with a 503 and the writer backed off)."""
    full = await create_account(client, 0, "full")
    sender = await create_account(client, 1_000, "sender")
    await fill_to(database_url, schema, full["id"], room=0)
    sends: list[httpx.Response] = []
    refused: list[httpx.Response] = []

    async def one_send() -> None:
        sends.append(await send(client, sender["api_key"]))

    async def one_topup() -> None:
        refused.append(await topup(client, full["id"], 1))

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one_topup if i % 4 == 0 else one_send)
    assert [r.status_code for r in sends] == [202] * 30, [r.text for r in sends]
    assert {r.status_code for r in refused} == {422}
    tree = (await client.get("/v1/ops/supervisor", headers=admin())).json()
    writer = {c["name"]: c["stats"] for c in tree["children"]}["store_writer"]
    assert writer["failed_groups"] == 0, writer["last_failure"]
    assert (await get_account(client, sender["api_key"]))["balance"] == 1_000 - 30 * 5
    assert_ledger_consistent(await ledger(database_url, schema))
