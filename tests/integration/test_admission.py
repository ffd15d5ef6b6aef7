"""Admission control through the real API: past an account's backlog bound its bulk sends get
429 `backlog_full` with a Retry-After, a batch is refused whole, express still goes through,
and sends are admitted again once the backlog drains."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import trio

from smsgw.engine.admission import AdmissionConfig
from smsgw.engine.shards import shard_of
from smsgw.sim.operator import OperatorProfile
from tests.conftest import bearer
from tests.integration.helpers import (
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
