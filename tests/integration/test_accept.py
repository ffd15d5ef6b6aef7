"""Accept to sent over real HTTP and a real PostgreSQL."""

from __future__ import annotations

import httpx
import trio

from tests.conftest import admin, bearer


async def create_account(client: httpx.AsyncClient, credit: int, name: str = "acme") -> dict:
    r = await client.post("/v1/accounts", json={"name": name, "credit": credit}, headers=admin())
    assert r.status_code == 201, r.text
    return r.json()


async def wait_final(client: httpx.AsyncClient, key: str, message_id: str) -> dict:
    with trio.fail_after(30):
        while True:
            r = await client.get(f"/v1/messages/{message_id}", headers=bearer(key))
            assert r.status_code == 200, r.text
            if r.json()["status"] in ("sent", "failed"):
                return r.json()
            await trio.sleep(0.02)


async def test_accept_then_sent(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    assert account["balance"] == 100
    r = await client.post(
        "/v1/messages",
        json={"to": "+4915123456789", "text": "hello", "client_ref": "r1"},
        headers=bearer(account["api_key"]),
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and body["segments"] == 1 and body["price"] == 5
    final = await wait_final(client, account["api_key"], body["id"])
    assert final["to"] == "+4915123456789" and final["attempts"] >= 1
    me = (await client.get("/v1/account", headers=bearer(account["api_key"]))).json()
    assert me["held"] == 0
    assert me["balance"] == (95 if final["status"] == "sent" else 100)
