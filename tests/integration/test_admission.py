"""Admission control through the real API: past an account's backlog bound its bulk sends get
429 `backlog_full` with a Retry-After, a batch is refused whole, express still goes through,
and sends are admitted again once the backlog drains; past the node's budget of request body
bytes a request gets 503 unread, and the budget comes back when requests end, however they
end."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from smsgw.engine.admission import AdmissionConfig
from smsgw.engine.ports import shard_of
from smsgw.sim.operator import OperatorProfile
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    RELIABLE,
    assert_problem,
    create_account,
    http_client,
    open_node,
    until,
)
from tests.integration.nodes import (
    Member,
    balanced,
    create_accounts,
    serve_node,
    shard_owners,
)

# Slow enough that a burst of sends waits for it: a window of 2 at ~150 ms a batch of 1.
SLOW = OperatorProfile(
    name="sim", latency_ms_median=150.0, latency_ms_p99=200.0, p_temporary=0.0, p_permanent=0.0
)
BOUND = 20


@pytest.mark.slow
async def test_an_accounts_backlog_past_its_bound_is_refused_until_it_drains(
    database_url: str, schema: str
) -> None:
    async with (
        open_node(
            database_url,
            schema,
            SLOW,
            window=2,
            max_batch=1,
            express_reserve_share=0.5,
            admission=AdmissionConfig(account_backlog=BOUND, node_backlog=10_000),
        ) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 1_000_000)
        key = bearer(account["api_key"])
        statuses = []
        for n in range(BOUND + 15):
            r = await client.post(
                "/v1/messages", json={"to": f"+4915{n:09d}", "text": "hi"}, headers=key
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                problem = assert_problem(r, 429)
                assert problem["code"] == "backlog_full"
                assert int(r.headers["Retry-After"]) >= 1
        assert statuses.count(202) >= BOUND - 2 and 429 in statuses, statuses
        # A batch is refused whole, nothing stored.
        before = (await client.get("/v1/account", headers=key)).json()
        r = await client.post(
            "/v1/messages/batch",
            json={"messages": [{"to": f"+4916{n:09d}", "text": "b"} for n in range(5)]},
            headers=key,
        )
        assert_problem(r, 429)
        after = (await client.get("/v1/account", headers=key)).json()
        assert after["held"] <= before["held"]
        # Express keeps its lane.
        r = await client.post(
            "/v1/messages",
            json={"to": "+4917000000001", "text": "otp", "express": True},
            headers=key,
        )
        assert r.status_code == 202, r.text

        async def admitted() -> bool:
            r = await client.post(
                "/v1/messages", json={"to": "+4918000000001", "text": "again"}, headers=key
            )
            return r.status_code == 202

        with trio.fail_after(60):
            await until(admitted, interval=0.5)


@pytest.mark.slow
async def test_a_node_refuses_what_the_accounts_dispatcher_refuses(
    database_url: str, schema: str
) -> None:
    """An account floods node a while node b dispatches it: b publishes its refusal with its
    heartbeat, and a refuses the account's bulk too, instead of handing b more and more."""
    slow = ("--operator-latency-ms", "400,500", "--window", "2", "--operator-errors", "0,0")
    bounds = ("--max-account-backlog", str(BOUND))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        async with (
            serve_node(database_url, schema, "a", log, *slow, *bounds) as a,
            serve_node(database_url, schema, "b", log, *slow, *bounds) as b,
            http_client(a.url) as ca,
            http_client(b.url) as cb,
        ):
            with trio.fail_after(30):
                await until(lambda: balanced(ca, ["a", "b"]), interval=0.2)
            owner = await shard_owners([Member(a, ca), Member(b, cb)])
            accounts = await create_accounts(ca, 8, 10**9)
            [account] = [x for x in accounts if owner[shard_of(x["id"])] == "b"][:1]
            key = bearer(account["api_key"])
            statuses: list[int] = []
            with trio.move_on_after(20):
                for n in range(400):
                    r = await ca.post(
                        "/v1/messages", json={"to": f"+4915{n:09d}", "text": "hi"}, headers=key
                    )
                    statuses.append(r.status_code)
                    if r.status_code == 429:
                        assert r.json()["code"] == "backlog_full"
                        assert int(r.headers["Retry-After"]) >= 1
                        break
                    await trio.sleep(0.02)
            assert statuses[-1] == 429, statuses
            # b refused from its published backlog: a let through little past the bound (what
            # arrived within a heartbeat of b crossing it).
            assert statuses.count(202) <= BOUND + 40, statuses.count(202)


# --- request bodies within the node's budget ------------------------------------------------

BODY_BUDGET = 100_000
TO_SMALL = "+4915123456789"
# A batch whose body takes most of the budget: a second one at the same time does not fit.
BIG_BATCH = {"messages": [{"to": f"+4915{n:09d}", "text": "x" * 150} for n in range(300)]}


def big_batch_body() -> bytes:
    body = httpx.Request("POST", "http://x", json=BIG_BATCH).content
    assert BODY_BUDGET // 2 < len(body) < BODY_BUDGET
    return body


async def request_bodies(client: httpx.AsyncClient) -> dict:
    """The admission figures of /v1/ops/supervisor, request bodies among them."""
    r = await client.get("/v1/ops/supervisor", headers=admin())
    [scheduler] = [c for c in r.json()["children"] if c["name"] == "scheduler"]
    return scheduler["stats"]["admission"]


async def held_is(client: httpx.AsyncClient, size: int) -> None:
    async def holds() -> bool:
        return (await request_bodies(client))["request_body_bytes"] == size

    with trio.fail_after(10):
        await until(holds)


async def started_upload(url: str, key: str, body: bytes) -> trio.SocketStream:
    """A batch request whose head and first bytes are sent and the rest never: its body is
    being read, and holds its declared length, until the connection closes."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    head = (
        "POST /v1/messages/batch HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    await stream.send_all(head.encode() + body[:1000])
    return stream


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    """`body` in parts, sent chunked (no Content-Length)."""
    for start in range(0, len(body), 8_192):
        yield body[start : start + 8_192]


@pytest.mark.slow
async def test_a_body_past_the_nodes_budget_is_refused_unread_and_the_budget_comes_back(
    database_url: str, schema: str
) -> None:
    body = big_batch_body()
    async with (
        open_node(
            database_url,
            schema,
            RELIABLE,
            admission=AdmissionConfig(request_body_bytes=BODY_BUDGET),
        ) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 1_000_000)
        key = bearer(account["api_key"])
        json_type = {"Content-Type": "application/json"}
        await held_is(client, 0)
        stream = await started_upload(node.url, account["api_key"], body)
        await held_is(client, len(body))
        # A second large body at the same time does not fit: 503, unread, nothing stored;
        # declared (Content-Length) and chunked alike.
        for content in (body, chunks(body)):
            r = await client.post(
                "/v1/messages/batch", content=content, headers={**key, **json_type}
            )
            problem = assert_problem(r, 503)
            assert problem["code"] == "overloaded"
            assert r.headers["Retry-After"] == "1"
        answer = (await client.get("/v1/account", headers=key)).json()
        assert answer["held"] == 0 and answer["balance"] == 1_000_000
        # A small request still fits beside the held body.
        r = await client.post("/v1/messages", json={"to": TO_SMALL, "text": "hi"}, headers=key)
        assert r.status_code == 202, r.text
        # The client that started the upload goes away mid-body: its bytes come back.
        await stream.aclose()
        await held_is(client, 0)
        r = await client.post("/v1/messages/batch", content=body, headers={**key, **json_type})
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == len(BIG_BATCH["messages"])
        figures = await request_bodies(client)
        assert figures["request_body_bytes"] == 0
        assert figures["request_bodies_refused"] == 2
        assert figures["request_body_bytes_bound"] == BODY_BUDGET
        metrics = (await client.get("/metrics", headers=admin())).text
        assert "smsgw_request_bodies_refused_total 2.0" in metrics
        assert f"smsgw_request_body_bytes_bound {float(BODY_BUDGET)}" in metrics
