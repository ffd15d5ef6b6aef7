"""Account administration (issue 24): the admin lists and reads accounts, suspends and resumes
them (on every node within a second; a suspended account's queued messages wait, unsent and
uncharged, and go out when it resumes), and prices are configuration, per node and per
account."""

from __future__ import annotations

import httpx
import pytest
import trio

from smsgw.engine.messages import AccountSettings
from smsgw.engine.ports import WriteGroup
from smsgw.storage.pg import PgStore
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    TO,
    assert_ledger_consistent,
    assert_problem,
    create_account,
    db_fetch,
    ledger,
    open_database,
    until,
    wait_all_final,
)
from tests.integration.nodes import balanced_nodes, create_accounts


async def test_the_admin_lists_and_reads_accounts(client: httpx.AsyncClient) -> None:
    made = [await create_account(client, 100 + i, f"shop-{i}") for i in range(5)]
    await create_account(client, 7, "bakery")
    r = await client.get("/v1/accounts?limit=2", headers=admin())
    assert r.status_code == 200, r.text
    first = r.json()
    assert [a["name"] for a in first["items"]] == ["shop-0", "shop-1"] and first["next_cursor"]
    seen = [a["id"] for a in first["items"]]
    cursor = first["next_cursor"]
    while cursor:
        page = (await client.get(f"/v1/accounts?limit=2&cursor={cursor}", headers=admin())).json()
        seen += [a["id"] for a in page["items"]]
        cursor = page["next_cursor"]
    assert seen == sorted(seen) and len(seen) == 6
    r = await client.get("/v1/accounts?name=SHOP", headers=admin())
    assert [a["name"] for a in r.json()["items"]] == [f"shop-{i}" for i in range(5)]

    r = await client.get(f"/v1/accounts/{made[1]['id']}", headers=admin())
    assert r.status_code == 200, r.text
    one = r.json()
    assert (one["name"], one["balance"], one["held"], one["topped_up"]) == ("shop-1", 101, 0, 101)
    assert one["suspended"] is False and one["suspended_at"] is None
    assert one["created_at"].endswith("Z") and one["settings"]["account_id"] == made[1]["id"]
    assert one["senders"] == [] and one["default_sender"] is None

    assert_problem(await client.get("/v1/accounts/999999", headers=admin()), 404)
    for action in ("suspend", "resume"):
        missing = await client.post(f"/v1/accounts/999999/{action}", headers=admin())
        assert_problem(missing, 404)
        own = await client.post(
            f"/v1/accounts/{made[0]['id']}/{action}", headers=bearer(made[0]["api_key"])
        )
        assert_problem(own, 403)  # the admin's, not an account's
    assert_problem(await client.get("/v1/accounts?limit=0", headers=admin()), 422)
    assert_problem(await client.get("/v1/accounts?cursor=x", headers=admin()), 422)
    key = bearer(made[0]["api_key"])
    assert_problem(await client.get("/v1/accounts", headers=key), 403)


async def test_prices_are_the_nodes_unless_the_account_has_its_own(
    client: httpx.AsyncClient,
) -> None:
    account = await create_account(client, 1_000)
    key = bearer(account["api_key"])
    long = "x" * 200  # 2 segments
    r = await client.post("/v1/messages", json={"to": TO, "text": long}, headers=key)
    assert r.json()["price"] == 10  # the defaults: 5 a segment
    body = {"to": TO, "text": long, "express": True}
    assert (await client.post("/v1/messages", json=body, headers=key)).json()["price"] == 14
    r = await client.put(
        f"/v1/accounts/{account['id']}/settings",
        json={"price_per_segment": 3, "express_surcharge": 4},
        headers=admin(),
    )
    assert r.status_code == 200 and r.json()["price_per_segment"] == 3, r.text
    r = await client.post("/v1/messages", json={"to": TO, "text": long}, headers=key)
    assert r.json()["price"] == 6
    assert (await client.post("/v1/messages", json=body, headers=key)).json()["price"] == 14
    bad = {"price_per_segment": -1}
    url = f"/v1/accounts/{account['id']}/settings"
    assert_problem(await client.put(url, json=bad, headers=admin()), 422)


async def test_free_segments_are_sent_and_the_ledger_stays_exact(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    """An account whose segments cost 0 (an internal account): its messages hold nothing,
    single or in a batch large enough for COPY (the group commit's exact way), and a paying
    account's messages committed in the same groups are unaffected."""
    free, paying = await create_account(client, 100, "free"), await create_account(client, 10_000)
    r = await client.put(
        f"/v1/accounts/{free['id']}/settings",
        json={"price_per_segment": 0, "express_surcharge": 0},
        headers=admin(),
    )
    assert r.status_code == 200, r.text
    batch = {"messages": [{"to": f"+4915{i:09d}", "text": "hi"} for i in range(250)]}
    express = {"messages": [{"to": TO, "text": "x", "express": True}]}
    answers: list[httpx.Response] = []

    async def post(body: dict, key: dict[str, str]) -> None:
        answers.append(await client.post("/v1/messages/batch", json=body, headers=key))

    async with trio.open_nursery() as nursery:
        for account in (free, paying):
            for body in (batch, express):
                nursery.start_soon(post, body, bearer(account["api_key"]))
    assert [r.status_code for r in answers] == [202] * 4, [r.text for r in answers]
    key = bearer(free["api_key"])
    r = await client.post("/v1/messages", json={"to": TO, "text": "free"}, headers=key)
    assert r.status_code == 202 and r.json()["price"] == 0, r.text
    ids = [r.json()["id"]] + [
        item["id"]
        for a in answers
        for item in a.json()["results"]
        if a.request.headers["authorization"] == key["Authorization"]
    ]
    assert len(ids) == 252
    await wait_all_final(client, free["api_key"], ids)
    account = (await client.get("/v1/account", headers=key)).json()
    assert account["balance"] == 100 and account["held"] == 0, account
    assert_ledger_consistent(await ledger(database_url, schema))


@pytest.mark.slow
async def test_a_suspension_holds_on_every_node_and_its_backlog_waits(
    database_url: str, schema: str
) -> None:
    async with balanced_nodes(database_url, schema, "a", "b") as members:
        [ca, cb] = [m.client for m in members]
        [account] = await create_accounts(ca, 1, 10_000)
        key = bearer(account["api_key"])
        assert (await cb.get("/v1/account", headers=key)).status_code == 200  # b knows the key
        # A slow dispatch (1 a second) leaves a backlog queued when the account is suspended.
        r = await ca.put(
            f"/v1/accounts/{account['id']}/settings", json={"send_rate": 1}, headers=admin()
        )
        assert r.status_code == 200, r.text
        body = {"messages": [{"to": f"+4915{i:09d}", "text": "hi"} for i in range(20)]}
        r = await cb.post("/v1/messages/batch", json=body, headers=key)
        assert r.status_code == 202 and r.json()["accepted"] == 20, r.text
        r = await ca.post(f"/v1/accounts/{account['id']}/suspend", headers=admin())
        assert r.status_code == 200 and r.json()["suspended"] is True, r.text
        since = r.json()["suspended_at"]

        async def refused_on_b() -> bool:
            r = await cb.post("/v1/messages", json={"to": TO, "text": "x"}, headers=key)
            return r.status_code == 403 and r.json()["code"] == "account_suspended"

        with trio.fail_after(1.0):
            await until(refused_on_b, interval=0.05)
        batch = await ca.post("/v1/messages/batch", json=body, headers=key)
        assert_problem(batch, 403)
        # Reads still work; a second suspension keeps the first one's time.
        assert (await cb.get("/v1/account", headers=key)).status_code == 200
        again = await cb.post(f"/v1/accounts/{account['id']}/suspend", headers=admin())
        assert again.json()["suspended_at"] == since

        async def counts() -> dict[str, int]:
            rows = await db_fetch(
                database_url, schema, "SELECT status, count(*) AS n FROM messages GROUP BY 1"
            )
            return {r["status"]: r["n"] for r in rows}

        await trio.sleep(0.5)  # what was in flight at the operator when it was suspended
        before = await counts()
        await trio.sleep(2.5)  # at 1 a second, 2 more would have gone out
        during = await counts()
        assert during == before and during.get("queued", 0) > 0, (before, during)
        shown = await ca.get(f"/v1/accounts/{account['id']}", headers=admin())
        assert shown.json()["suspended"] is True

        # Resumed (and unpaced): the backlog goes out, each message charged once.
        r = await cb.post(f"/v1/accounts/{account['id']}/resume", headers=admin())
        assert r.status_code == 200 and r.json()["suspended"] is False, r.text
        r = await ca.put(f"/v1/accounts/{account['id']}/settings", json={}, headers=admin())
        assert r.status_code == 200, r.text

        async def sent_again() -> bool:
            return (await ca.post(
                "/v1/messages", json={"to": TO, "text": "back"}, headers=key
            )).status_code == 202  # fmt: skip

        with trio.fail_after(1.0):
            await until(sent_again, interval=0.05)

        async def all_final() -> bool:
            return (await counts()).get("queued", 0) == 0

        with trio.fail_after(30):
            await until(all_final, interval=0.2)
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_a_starting_node_paces_and_holds_what_it_must(database_url: str, schema: str) -> None:
    """At start, before any request names them, dispatch knows the paced accounts and the
    suspended ones (at 0: nothing goes out), whichever node set them."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        group = WriteGroup()
        group.creates += [(f"a{i}", 10, bytes([i]) * 32) for i in range(3)]
        paced, held, plain = (await store.commit_group(group)).creates
        await store.update_settings(paced.id, AccountSettings(send_rate=2.5))
        record = await store.set_suspended(held.id, True)
        assert record is not None and record.settings.suspended
        assert sorted(await store.dispatch_rates()) == [(paced.id, 2.5), (held.id, 0.0)]
        resumed = await store.set_suspended(held.id, False)
        assert resumed is not None and resumed.suspended_at is None
        assert await store.dispatch_rates() == [(paced.id, 2.5)]
        assert plain.id not in dict(await store.dispatch_rates())
