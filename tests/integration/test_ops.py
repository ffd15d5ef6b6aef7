"""Operations endpoints: liveness, readiness and the inspectable supervision tree."""

from __future__ import annotations

import httpx
import trio

from smsgw.engine.node import EngineConfig
from smsgw.runtime.server import Node
from tests.conftest import admin
from tests.integration.helpers import create_account, send, wait_final

ACTORS = ("store_writer", "retry_timer", "provider_pool", "scheduler")
DELIVERY = ("callback_sender", "dlr_reconciler")


async def test_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_ready_once_the_node_is_up(node: Node, client: httpx.AsyncClient) -> None:
    assert node.engine.ready.is_set()
    r = await client.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "recovered": 0}


async def test_supervisor_lists_every_child(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/ops/supervisor", headers=admin())
    assert r.status_code == 200, r.text
    tree = r.json()
    assert tree["name"] == "node" and tree["state"] == "running"
    config = EngineConfig()
    assert (tree["max_restarts"], tree["within_seconds"]) == (
        config.max_restarts,
        config.restart_window,
    )
    children = {c["name"]: c for c in tree["children"]}
    assert list(children) == [
        *ACTORS,
        "shard_leases",
        "scheduled_sends",
        *DELIVERY,
        "api_shares",
        "send_shares",
        "otp_sweeper",
        "store_upkeep",
        "http",
        "handoff_announcer",
    ]

    for name in ACTORS:
        child = children[name]
        assert child["state"] == "running", child
        assert child["restart"] == "permanent"
        assert (child["restarts"], child["last_failure"]) == (0, None)
        # Bounded inboxes (how big is the engine's business): a depth within a capacity.
        assert isinstance(child["inbox_capacity"], int) and child["inbox_capacity"] > 0
        assert isinstance(child["inbox_depth"], int)
        assert 0 <= child["inbox_depth"] <= child["inbox_capacity"]
        assert isinstance(child["stats"], dict) and child["stats"]
    # The shard leases (recovery is theirs): a lone node leases every shard; the page
    # summarises them, and `?detail=leases` shows each lease with its fencing token.
    leases = children["shard_leases"]
    assert (leases["state"], leases["restart"]) == ("running", "permanent")
    stats = leases["stats"]
    assert stats["live_nodes"] == 1 and stats["owned"] == 256, stats
    assert "leases" not in stats
    summary = stats["lease_summary"]
    assert (summary["count"], summary["shards"]) == (256, "0-255")
    assert 0 < summary["token_min"] <= summary["token_max"]
    assert leases["inbox_depth"] is None and leases["inbox_capacity"] is None
    r = await client.get("/v1/ops/supervisor?detail=leases", headers=admin())
    assert r.status_code == 200, r.text
    [detailed] = [c for c in r.json()["children"] if c["name"] == "shard_leases"]
    listed = detailed["stats"]["leases"]
    assert sorted(lease["shard"] for lease in listed) == list(range(256))
    assert all(lease["token"] > 0 for lease in listed)
    r = await client.get("/v1/ops/supervisor?detail=everything", headers=admin())
    assert r.status_code == 422 and r.json()["field"] == "detail", r.text

    # The callback sender and the DLR reconciler: no inbox (their work is in PostgreSQL).
    for name in DELIVERY:
        child = children[name]
        assert (child["state"], child["restart"], child["restarts"]) == (
            "running",
            "permanent",
            0,
        )
        assert child["inbox_capacity"] is None and isinstance(child["stats"], dict)
    assert children["callback_sender"]["stats"]["in_flight"] == 0

    # Scheduled sends: no inbox either (they wait in PostgreSQL until due), permanent.
    scheduled = children["scheduled_sends"]
    assert (scheduled["state"], scheduled["restart"]) == ("running", "permanent")
    assert scheduled["inbox_capacity"] is None and isinstance(scheduled["stats"], dict)

    http = children["http"]
    assert (http["state"], http["restart"], http["restarts"]) == ("running", "transient", 0)

    # Bulk hand-offs told to their owners a few groups at a time (storage/announce.py).
    announcer = children["handoff_announcer"]
    assert (announcer["state"], announcer["restart"]) == ("running", "permanent")
    assert {"notifies", "messages", "failures", "waiting"} <= set(announcer["stats"])


async def test_cluster_view_of_a_lone_node(node: Node, client: httpx.AsyncClient) -> None:
    # The node's url is recorded with the first heartbeat after HTTP opened.
    with trio.fail_after(10):
        while True:
            r = await client.get("/v1/ops/cluster", headers=admin())
            assert r.status_code == 200, r.text
            view = r.json()
            if view["nodes"][0]["url"]:
                break
            await trio.sleep(0.1)
    assert view["node_id"] == node.node_id
    assert (view["shards"], view["unowned_shards"], view["handoffs_waiting"]) == (256, 0, 0)
    [me] = view["nodes"]
    assert (me["id"], me["alive"], me["shards"], me["url"]) == (node.node_id, True, 256, node.url)
    assert (await client.get("/v1/ops/cluster")).status_code == 401


async def test_supervisor_stats_follow_the_traffic(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    r = await send(client, account["api_key"])
    assert r.status_code == 202, r.text
    await wait_final(client, account["api_key"], r.json()["id"])
    tree = (await client.get("/v1/ops/supervisor", headers=admin())).json()
    children = {c["name"]: c for c in tree["children"]}
    # An account creation, an accept and an outcome have been committed.
    assert children["store_writer"]["stats"]["items"] >= 3
    assert children["scheduler"]["stats"]["dispatched"] >= 1
    pool = children["provider_pool"]["stats"]
    assert pool["sent"] + pool["temporary"] + pool["permanent"] >= 1
    # Each operator's breaker, in-flight count, window, recent error ratio and latency.
    sim = pool["operators"]["sim"]
    assert sim["state"] == "closed" and sim["inflight"] == 0 and sim["batches"] >= 1
    # Closed since the node started, moments ago (not since trio's clock's origin).
    assert 0 <= sim["state_for_s"] < 120
    assert {"window", "recent_error_ratio", "recent_latency_ms", "opens"} <= set(sim)
