"""GET /metrics: Prometheus text, the admin key unless public, figures that follow traffic."""

from __future__ import annotations

from functools import partial

import httpx
import msgspec
import trio
from prometheus_client.parser import text_string_to_metric_families

from smsgw.runtime.server import Node, run_node
from tests.conftest import admin, bearer, node_options
from tests.integration.helpers import (
    RELIABLE,
    assert_problem,
    create_account,
    http_client,
    open_node,
    send,
    wait_final,
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample, keyed by name and labels."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


async def scrape(client: httpx.AsyncClient) -> dict:
    r = await client.get("/metrics", headers=admin())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


async def test_metrics_need_the_admin_key(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/metrics"), 401)
    account = await create_account(client, 0)
    assert_problem(await client.get("/metrics", headers=bearer(account["api_key"])), 403)


async def test_metrics_follow_the_traffic(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        await _follow_the_traffic(client)


async def _follow_the_traffic(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 10)
    key = account["api_key"]
    r = await send(client, key)
    assert r.status_code == 202, r.text
    await wait_final(client, key, r.json()["id"])
    assert_problem(await send(client, key, to="nope"), 422)
    assert_problem(await send(client, key, text="x" * 600, express=True), 402)

    found = await scrape(client)
    route = "/v1/messages"

    def requests(status: str, code: str = "") -> float:
        labels = {"route": route, "method": "POST", "status": status, "code": code}
        return value(found, "smsgw_http_requests_total", **labels)

    assert requests("202") == 1
    assert requests("422", "invalid_field") == 1
    assert requests("402", "insufficient_credit") == 1
    # Accept latency: one histogram series per route; the three POSTs are in it.
    assert (
        value(found, "smsgw_http_request_duration_seconds_count", route=route, method="POST") == 3
    )
    assert value(found, "smsgw_messages_accepted_total") == 1
    assert value(found, "smsgw_messages_refused_total", reason="insufficient_credit") == 1
    assert (
        value(found, "smsgw_messages_finished_total", operator="sim", status="sent", reason="") == 1
    )
    assert value(found, "smsgw_operator_attempts_total", operator="sim", result="sent") == 1
    assert value(found, "smsgw_operator_breaker_state", operator="sim", state="closed") == 1
    assert value(found, "smsgw_operator_breaker_opens_total", operator="sim") == 0
    assert value(found, "smsgw_accept_to_sent_seconds_count") == 1
    assert value(found, "smsgw_accept_to_sent_seconds_bucket", le="+Inf") == 1
    assert value(found, "smsgw_queue_depth", lane="express") == 0
    assert value(found, "smsgw_queue_depth", lane="bulk") == 0
    # Group commits: the account, the accept, the outcome (at least; they may share groups).
    assert value(found, "smsgw_group_commits_total", result="ok") >= 1
    assert value(found, "smsgw_group_commit_rows_sum") >= 3
    assert value(found, "smsgw_group_commit_seconds_count") >= 1
    assert value(found, "smsgw_credit_amount_total", kind="captured") == 5
    for actor in ("store_writer", "retry_timer", "provider_pool", "scheduler", "http"):
        assert value(found, "smsgw_actor_restarts_total", actor=actor) == 0
    assert value(found, "smsgw_actor_up", actor="scheduler", state="running") == 1
    assert value(found, "smsgw_actor_inbox_capacity", actor="scheduler") > 0
    assert any(name == "process_cpu_seconds_total" for name, _ in found)


async def test_metrics_can_be_public(database_url: str, schema: str) -> None:
    """SMSGW_METRICS_PUBLIC=1 (NodeOptions.metrics_public): a scraper needs no key."""
    options = msgspec.structs.replace(node_options(database_url, schema), metrics_public=True)
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(partial(run_node, options))
        try:
            async with http_client(node.url) as client:
                r = await client.get("/metrics")
                assert r.status_code == 200, r.text
                assert "smsgw_http_requests_total" in r.text
        finally:
            node.stop.set()
