"""Request ids, logs without secrets, the per-account rate limit, and a restart you can see."""

from __future__ import annotations

import logging
import re

import httpx
import msgspec
import pytest
import trio

from smsgw.logs import JsonFormatter, TextFormatter
from smsgw.runtime.server import Node
from tests.conftest import ADMIN_KEY, admin, bearer
from tests.integration.helpers import (
    RELIABLE,
    TO,
    assert_problem,
    create_account,
    http_client,
    open_node,
    send,
    wait_all_final,
    wait_final,
)

# --- request ids --------------------------------------------------------------------------


async def test_a_request_id_is_made_or_taken_and_returned(client: httpx.AsyncClient) -> None:
    made = (await client.get("/health")).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made)
    assert (await client.get("/health")).headers["x-request-id"] != made  # one per request
    mine = "trace-42:abc_DEF.1"
    r = await client.get("/health", headers={"X-Request-Id": mine})
    assert r.headers["x-request-id"] == mine
    # Something that could forge a log line or is too long is replaced, not refused.
    for bad in ("two words", "x" * 129, "a\tb"):
        r = await client.get("/health", headers={"X-Request-Id": bad})
        assert r.status_code == 200
        assert re.fullmatch(r"[0-9a-f]{16}", r.headers["x-request-id"])
    # Errors carry it too.
    r = await client.get("/v1/account", headers={"X-Request-Id": mine})
    assert_problem(r, 401)
    assert r.headers["x-request-id"] == mine
    # Sent twice, the first one counts (as werkzeug's `Headers.get` would have it).
    r = await client.get("/health", headers=[("X-Request-Id", mine), ("X-Request-Id", "other")])
    assert r.headers["x-request-id"] == mine
    # Header names are case-insensitive, the key's scheme too.
    r = await client.get("/v1/account", headers={"x-REQUEST-id": mine, "authorization": "x"})
    assert_problem(r, 401)
    assert r.headers["x-request-id"] == mine


async def test_the_request_id_follows_a_message_into_the_pool_logs(
    database_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 100)
        r = await client.post(
            "/v1/messages",
            json={"to": TO, "text": "hello"},
            headers={**bearer(account["api_key"]), "X-Request-Id": "req-follow-me"},
        )
        assert r.status_code == 202, r.text
        message_id = r.json()["id"]
        await wait_final(client, account["api_key"], message_id)
    ours = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "req-follow-me"]
    loggers = {rec.name for rec in ours}
    assert "smsgw.http.access" in loggers
    # The pool's line about the outcome, written in another task long after the request.
    pool = [rec for rec in ours if rec.name == "smsgw.pool"]
    assert pool and getattr(pool[0], "message_id", None) == message_id
    line = JsonFormatter().format(pool[0])
    assert '"request_id":"req-follow-me"' in line and message_id in line


# --- no secret in logs ----------------------------------------------------------------------


async def test_no_key_ever_reaches_the_logs(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Everything logged at any level while keys travel in every way a client may send them,
    good and bad, formatted both ways: neither the admin key nor an account key appears."""
    caplog.set_level(logging.DEBUG)
    account = await create_account(client, 1_000)
    key = account["api_key"]
    r = await send(client, key)
    assert r.status_code == 202, r.text
    await wait_final(client, key, r.json()["id"])
    await client.get(f"/v1/messages/{r.json()['id']}", headers=bearer(key))
    await client.get("/v1/account", headers={"Authorization": f"Bearer {key}x"})  # unknown
    await client.get("/v1/account", headers={"Authorization": f"Basic {key}"})  # wrong scheme
    await client.get("/v1/ops/supervisor", headers=bearer(key))  # not the admin
    await client.post("/v1/messages", headers=admin(), json={"to": TO, "text": "x"})  # admin
    await client.post("/v1/messages", headers=bearer(key), content=b"{not json")
    await client.get("/metrics", headers=admin())
    await client.post(f"/v1/accounts/{account['id']}/topups", json={"amount": 1}, headers=admin())
    r = await client.post("/v1/account/keys/rotate", headers=bearer(key))
    assert r.status_code == 200, r.text
    new_key = r.json()["api_key"]
    await client.get("/v1/account", headers=bearer(new_key))

    assert caplog.records, "nothing was logged: the test would prove nothing"
    assert any(rec.name == "smsgw.http.access" for rec in caplog.records)
    formatters: list[logging.Formatter] = [JsonFormatter(), TextFormatter()]
    for record in caplog.records:
        for formatter in formatters:
            text = formatter.format(record) + repr(vars(record))
            for secret in (ADMIN_KEY, key, new_key):
                assert secret not in text, (record.name, text)


# --- the per-account rate limit --------------------------------------------------------------


async def test_an_account_past_its_rate_gets_429_with_retry_after(
    database_url: str, schema: str
) -> None:
    async with (
        open_node(database_url, schema, RELIABLE, api_rate_per_second=0.5, api_burst=3) as node,
        http_client(node.url) as client,
    ):
        busy = await create_account(client, 1_000, name="busy")
        calm = await create_account(client, 1_000, name="calm")
        for _ in range(3):  # the burst
            assert (await client.get("/v1/account", headers=bearer(busy["api_key"]))).is_success
        r = await send(client, busy["api_key"])
        problem = assert_problem(r, 429)
        assert problem["code"] == "rate_limited"
        # One token every 2 s: the next one is 2 s away, and the header says so.
        assert r.headers["retry-after"] == "2" and problem["retry_after"] == 2
        # Another account is not held back, and the admin is never limited.
        assert (await send(client, calm["api_key"])).status_code == 202
        for _ in range(5):
            assert (await client.get("/v1/ops/supervisor", headers=admin())).status_code == 200
        # A refused request changed nothing: no message was stored for it.
        r = await client.get("/metrics", headers=admin())
        assert "smsgw_rate_limited_requests_total 1.0" in r.text
        assert 'code="rate_limited",method="POST",route="/v1/messages",status="429"' in r.text


# --- supervision: a crash you can see, while the node keeps serving ---------------------------


async def test_a_crashed_actor_is_restarted_and_the_tree_says_so(
    database_url: str, schema: str
) -> None:
    slow = msgspec.structs.replace(RELIABLE, latency_ms_median=300.0, latency_ms_p99=400.0)
    async with open_node(database_url, schema, slow) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        key = account["api_key"]
        sent = [await send(client, key, text=f"m{i}") for i in range(10)]
        assert all(r.status_code == 202 for r in sent)
        await until_inflight(node)
        # The pool dies with messages in flight at the operator.
        assert node.engine.supervisor is not None
        node.engine.supervisor.kill("provider_pool", "injected by the test")

        tree = (await client.get("/v1/ops/supervisor", headers=admin())).json()
        pool = {c["name"]: c for c in tree["children"]}["provider_pool"]
        assert pool["restarts"] == 1
        assert pool["last_failure"] == "ChildKilled: injected by the test"
        assert pool["last_failure_at"] is not None
        assert tree["state"] == "running"

        # The node kept serving: new work is accepted, and every message, including the ones
        # the dead pool had in flight, ends exactly once.
        late = await send(client, key, text="after the crash")
        assert late.status_code == 202, late.text
        ids = [r.json()["id"] for r in [*sent, late]]
        finals = await wait_all_final(client, key, ids)
        assert {m["status"] for m in finals} == {"sent"}

        tree = (await client.get("/v1/ops/supervisor", headers=admin())).json()
        children = {c["name"]: c for c in tree["children"]}
        # Restarted once, and the restarted pool did not trip over the orphans it took back.
        assert (children["provider_pool"]["state"], children["provider_pool"]["restarts"]) == (
            "running",
            1,
        )
        assert all(c["restarts"] == 0 for name, c in children.items() if name != "provider_pool")
        metrics = (await client.get("/metrics", headers=admin())).text
        assert re.search(r'smsgw_actor_restarts_total\{actor="provider_pool"\} [1-9]', metrics)


async def until_inflight(node: Node) -> None:
    with trio.fail_after(10):
        # The pool has no event for "something is in flight"; polling its state is enough here.
        while not node.engine.pool.inflight:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_each_actor_reports_its_own_figures(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 10)
    r = await send(client, account["api_key"])
    await wait_final(client, account["api_key"], r.json()["id"])
    assert_problem(await send(client, account["api_key"], text="x" * 1_000, express=True), 402)
    tree = (await client.get("/v1/ops/supervisor", headers=admin())).json()
    stats = {c["name"]: c["stats"] for c in tree["children"]}
    writer = stats["store_writer"]
    assert writer["credit"]["held_messages"] == 1
    assert writer["credit"]["refused"] == {"insufficient_credit": 1}
    assert writer["credit"]["topups"] == 0  # the account's credit came with its creation
    assert writer["group_rows"]["count"] >= 1
    assert writer["commit_seconds"]["count"] == writer["groups"]
    assert writer["failed_groups"] == 0
    scheduler = stats["scheduler"]
    assert scheduler["dispatched"] >= 1
    assert {"bulk_backlog", "express_backlog", "active_accounts"} <= set(scheduler)
    pool = stats["provider_pool"]
    assert sum(n for by_reason in pool["outcomes"]["sim"].values() for n in by_reason.values())
    assert pool["accept_to_sent_seconds"]["count"] + pool["failed"] >= 1
