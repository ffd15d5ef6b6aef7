"""Scheduling over real HTTP and PostgreSQL: express deadlines and `"wait": true`, rate limits,
per-account settings, paging of bounded mailboxes, and the scheduler's view."""

from __future__ import annotations

import httpx

from smsgw.sim.operator import OperatorProfile
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    RELIABLE,
    TO,
    assert_ledger_consistent,
    assert_problem,
    create_account,
    get_account,
    http_client,
    ledger,
    message_count,
    open_node,
    send,
    wait_all_final,
    wait_final,
)


def slow(latency_ms: float) -> OperatorProfile:
    """An operator that takes every message after exactly `latency_ms`."""
    return OperatorProfile(
        name="slow",
        latency_ms_median=latency_ms,
        latency_ms_p99=latency_ms,
        p_temporary=0.0,
        p_permanent=0.0,
    )


async def put_settings(client: httpx.AsyncClient, account_id: int, **fields: object) -> dict:
    r = await client.put(f"/v1/accounts/{account_id}/settings", json=fields, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()


async def scheduler_view(client: httpx.AsyncClient) -> dict:
    r = await client.get("/v1/ops/supervisor", headers=admin())
    assert r.status_code == 200, r.text
    children = {c["name"]: c for c in r.json()["children"]}
    return children["scheduler"]["stats"]


# --- "wait": true and the express deadline ---------------------------------------------------


async def test_wait_answers_200_once_the_operator_took_the_message(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 100)
        r = await send(client, account["api_key"], express=True, wait=True)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "sent" and body["operator_message_id"]
        assert body["express"] is True and body["price"] == 7
        stored = await wait_final(client, account["api_key"], body["id"])
        assert stored["status"] == "sent"
        assert stored["operator_message_id"] == body["operator_message_id"]
        assert (await get_account(client, account["api_key"]))["balance"] == 93


async def test_wait_answers_504_failed_and_refunded_when_the_deadline_passes(
    database_url: str, schema: str
) -> None:
    """The operator answers in 1 s; the account's deadline is 300 ms. The attempt is cut at
    the deadline, the message fails with `deadline_exceeded`, its hold is released, and the
    miss is counted."""
    async with (
        open_node(database_url, schema, slow(1_000)) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 100)
        await put_settings(client, account["id"], express_deadline_ms=300)
        r = await send(client, account["api_key"], express=True, wait=True)
        problem = assert_problem(r, 504)
        assert problem["code"] == "deadline_exceeded"
        assert problem["message_status"] == "failed" and problem["refunded"] is True
        stored = await wait_final(client, account["api_key"], problem["message_id"])
        assert stored["status"] == "failed" and stored["reason"] == "deadline_exceeded"
        assert (await get_account(client, account["api_key"]))["balance"] == 100
        view = await scheduler_view(client)
        assert view["express_deadline_misses"] == 1
        metrics = (await client.get("/metrics", headers=admin())).text
        assert "smsgw_express_deadline_misses_total 1.0" in metrics
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_an_express_message_that_cannot_make_its_deadline_is_refused_with_503(
    database_url: str, schema: str
) -> None:
    """Once the operator is known to answer in 1 s, an express message with a 500 ms deadline
    is refused before anything is stored or held; bulk is still accepted."""
    async with (
        open_node(database_url, schema, slow(1_000)) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 100)
        key = account["api_key"]
        first = await send(client, key)
        assert first.status_code == 202
        await wait_final(client, key, first.json()["id"])  # the pool has seen its latency
        await put_settings(client, account["id"], express_deadline_ms=500)
        before = await message_count(database_url, schema)
        r = await send(client, key, express=True)
        problem = assert_problem(r, 503)
        assert problem["code"] == "express_unavailable"
        assert "deadline" in problem["detail"] and r.headers["retry-after"]
        assert await message_count(database_url, schema) == before
        assert (await get_account(client, key))["balance"] == 95
        # Without the tight deadline (2 s default) it is accepted again.
        await put_settings(client, account["id"])
        assert (await send(client, key, express=True)).status_code == 202


async def test_wait_is_for_express_messages_only(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 100)
        problem = assert_problem(await send(client, account["api_key"], wait=True), 422)
        assert problem["field"] == "wait"
        r = await client.post(
            "/v1/messages/batch",
            json={"messages": [{"to": TO, "text": "x", "express": True, "wait": True}]},
            headers=bearer(account["api_key"]),
        )
        problem = assert_problem(r, 422)  # no item accepted
        assert problem["results"][0]["error"]["field"] == "wait"
        assert await message_count(database_url, schema) == 0


# --- rate limits ------------------------------------------------------------------------------


async def test_a_recipient_past_its_hourly_limit_gets_429_and_others_do_not(
    database_url: str, schema: str
) -> None:
    async with (
        open_node(database_url, schema, RELIABLE, recipient_limit_per_hour=3) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 1_000)
        key = account["api_key"]
        for _ in range(3):
            assert (await send(client, key)).status_code == 202
        r = await send(client, key)
        problem = assert_problem(r, 429)
        assert problem["code"] == "recipient_rate_limited"
        # 3 an hour: the next one in 20 minutes.
        assert r.headers["retry-after"] == "1200" and problem["retry_after"] == 1200
        assert (await send(client, key, to="+4915100000001")).status_code == 202
        other = await create_account(client, 1_000, name="other")
        assert (await send(client, other["api_key"])).status_code == 202
        assert await message_count(database_url, schema) == 5
        # The account's own limit overrides the node's.
        await put_settings(client, account["id"], recipient_limit_per_hour=5)
        assert (await send(client, key)).status_code == 202
        r = await client.post(
            "/v1/messages/batch",
            json={"messages": [{"to": TO, "text": "a"}, {"to": TO, "text": "b"}]},
            headers=bearer(key),
        )
        results = r.json()["results"]
        assert results[0]["status"] == "queued"
        error = results[1]["error"]
        assert (error["status"], error["code"]) == (429, "recipient_rate_limited")
        assert error["retry_after"] >= 1


async def test_an_account_api_rate_setting_limits_its_requests(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        calm = await create_account(client, 1_000, name="calm")
        await put_settings(client, account["id"], api_rate=0.5)  # bursts of 1
        headers = bearer(account["api_key"])
        statuses = [
            (await client.get("/v1/account", headers=headers)).status_code for _ in range(3)
        ]
        assert statuses[0] == 200 and 429 in statuses
        for _ in range(3):
            assert (await send(client, calm["api_key"])).status_code == 202


async def test_a_send_rate_paces_dispatch_but_refuses_nothing(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        settings = await put_settings(client, account["id"], send_rate=5.0)
        assert settings["send_rate"] == 5.0
        r = await client.post(
            "/v1/messages/batch",
            json={"messages": [{"to": TO, "text": f"m{i}"} for i in range(12)]},
            headers=bearer(account["api_key"]),
        )
        ids = [x["id"] for x in r.json()["results"]]
        assert len(ids) == 12
        view = await scheduler_view(client)
        assert view["paced_accounts"] == 1
        final = await wait_all_final(client, account["api_key"], ids)
        assert {m["status"] for m in final} == {"sent"}
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_settings_validate_and_need_the_admin_key(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 10)
        url = f"/v1/accounts/{account['id']}/settings"
        assert_problem(await client.put(url, json={}, headers=bearer(account["api_key"])), 403)
        assert_problem(await client.put(url, json={"send_rate": -1}, headers=admin()), 422)
        assert_problem(await client.put(url, json={"nope": 1}, headers=admin()), 422)
        assert_problem(
            await client.put("/v1/accounts/999999/settings", json={}, headers=admin()), 404
        )
        stored = await put_settings(client, account["id"], express_deadline_ms=1_500)
        assert stored == {
            "account_id": account["id"],
            "send_rate": None,
            "express_deadline_ms": 1_500,
            "recipient_limit_per_hour": None,
            "api_rate": None,
            "default_country": None,
            "price_per_segment": None,
            "express_surcharge": None,
        }


# --- bounded mailboxes, paging, and the scheduler's view --------------------------------------


async def test_bounded_mailboxes_page_from_postgresql_and_send_each_message_once(
    database_url: str, schema: str
) -> None:
    """Tiny bounds: nearly every message spills, is paged back in after its account's cursor
    and has its body read at dispatch. Each ends exactly once, in credit and in the store."""
    async with (
        open_node(
            database_url,
            schema,
            RELIABLE,
            mailbox_bound=4,
            scheduler_memory_bound=6,
            body_cache=2,
            page_size=3,
            window=4,
            max_batch=2,
        ) as node,
        http_client(node.url) as client,
    ):
        accounts = [await create_account(client, 10_000, name=f"a{i}") for i in range(3)]
        sent: dict[str, list[str]] = {}
        for round_ in range(3):
            for account in accounts:
                r = await client.post(
                    "/v1/messages/batch",
                    json={
                        "messages": [
                            {"to": TO, "text": f"r{round_} m{i}"} for i in range(20 + round_)
                        ]
                    },
                    headers=bearer(account["api_key"]),
                )
                assert r.status_code == 202, r.text
                sent.setdefault(account["api_key"], []).extend(x["id"] for x in r.json()["results"])
        for key, ids in sent.items():
            final = await wait_all_final(client, key, ids)
            assert {m["status"] for m in final} == {"sent"}
            assert all(m["attempts"] == 1 for m in final)
        view = await scheduler_view(client)
        assert view["pages"] > 0 and view["paged_entries"] > 0 and view["body_reads"] > 0
        assert view["bulk_backlog"] == 0 and view["bulk_in_store"] == 0
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_the_supervisor_shows_the_scheduler_view(database_url: str, schema: str) -> None:
    async with (
        open_node(database_url, schema, slow(2_000), window=2, max_batch=1) as node,
        http_client(node.url) as client,
    ):
        heavy = await create_account(client, 10_000, name="heavy")
        light = await create_account(client, 10_000, name="light")
        r = await client.post(
            "/v1/messages/batch",
            json={"messages": [{"to": TO, "text": f"m{i}"} for i in range(30)]},
            headers=bearer(heavy["api_key"]),
        )
        assert r.status_code == 202
        assert (await send(client, light["api_key"])).status_code == 202
        # The 2 s operator holds the window: the backlog is there at once and for a while.
        view = await scheduler_view(client)
        assert view["active_accounts"] >= 1
        assert view["largest_backlogs"][0]["account_id"] == heavy["id"]
        assert view["express_backlog"] == 0 and view["express_deadline_misses"] == 0
        assert {"bulk_in_memory", "bulk_in_store", "dispatched"} <= set(view)
