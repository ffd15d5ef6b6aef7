"""API key rotation: a new key at once, the old one retired at once on this node."""

from __future__ import annotations

import httpx
import trio

from tests.conftest import admin, bearer
from tests.integration.helpers import TO, assert_problem, create_account, get_account, send

BODY = {"to": TO, "text": "hello"}


async def test_rotating_a_key_retires_the_old_one_at_once(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    old = account["api_key"]
    sent = await send(client, old, "before")
    assert sent.status_code == 202
    r = await client.post("/v1/account/keys/rotate", headers=bearer(old))
    assert r.status_code == 200, r.text
    new = r.json()["api_key"]
    assert r.json()["account_id"] == account["id"] and new != old and new.startswith("sk_")
    for request in (
        client.get("/v1/account", headers=bearer(old)),
        client.post("/v1/messages", json=BODY, headers=bearer(old)),
        client.post("/v1/account/keys/rotate", headers=bearer(old)),
    ):
        assert_problem(await request, 401)
    me = await get_account(client, new)
    assert me["id"] == account["id"] and me["balance"] == 95
    # The account's messages are still its own under the new key.
    got = await client.get(f"/v1/messages/{sent.json()['id']}", headers=bearer(new))
    assert got.status_code == 200
    assert (await send(client, new, "after")).status_code == 202


async def test_concurrent_rotations_with_one_key_leave_one_key(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    responses: list[httpx.Response] = []

    async def rotate() -> None:
        r = await client.post("/v1/account/keys/rotate", headers=bearer(account["api_key"]))
        responses.append(r)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(rotate)
    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) == 1, [r.status_code for r in responses]
    for r in responses:
        if r.status_code != 200:
            assert_problem(r, 401)
    assert (await get_account(client, winners[0].json()["api_key"]))["id"] == account["id"]


async def test_the_admin_key_cannot_rotate(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/v1/account/keys/rotate", headers=admin()), 403)
    assert_problem(await client.post("/v1/account/keys/rotate"), 401)
