"""The ops console's JSON (GET /v1/ops/console), its page, and draining an operator over HTTP."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from functools import partial

import httpx
import msgspec
import pytest
import trio

from smsgw.runtime.server import Node, run_node
from smsgw.sim.operator import OperatorProfile
from tests.conftest import admin, bearer, node_options
from tests.integration.helpers import create_account, http_client

OPERATORS = ("alpha", "beta", "gamma")


def quiet(name: str) -> OperatorProfile:
    """A simulated operator that answers fast and fails nothing: every message is sent."""
    return OperatorProfile(
        name=name, latency_ms_median=2.0, latency_ms_p99=8.0, p_temporary=0.0, p_permanent=0.0
    )


@pytest.fixture
async def three(database_url: str, schema: str) -> AsyncIterator[tuple[Node, httpx.AsyncClient]]:
    options = msgspec.structs.replace(
        node_options(database_url, schema), operators=tuple(quiet(n) for n in OPERATORS)
    )
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(partial(run_node, options))
        async with http_client(node.url) as client:
            yield node, client
        node.stop.set()


async def figures(client: httpx.AsyncClient) -> dict:
    r = await client.get("/v1/ops/console", headers=admin())
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return r.json()


async def send_batch(client: httpx.AsyncClient, key: str, count: int) -> None:
    body = {"messages": [{"to": "+4915123456789", "text": f"m{i}"} for i in range(count)]}
    r = await client.post("/v1/messages/batch", json=body, headers=bearer(key))
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == count


async def all_sent(client: httpx.AsyncClient, count: int) -> dict:
    with trio.fail_after(30):
        while True:
            view = await figures(client)
            if view["counters"]["sent"] >= count:
                return view
            await trio.sleep(0.05)


def sent_by(view: dict) -> dict[str, int]:
    return {o["name"]: o["messages"] for o in view["operators"]}


async def test_console_figures_need_the_admin_key(three: tuple[Node, httpx.AsyncClient]) -> None:
    _, client = three
    assert (await client.get("/v1/ops/console")).status_code == 401
    r = await client.get("/v1/ops/console", headers=bearer("not-the-key"))
    assert r.status_code == 403
    r = await client.post("/v1/ops/operators/alpha/drain", headers=bearer("not-the-key"))
    assert r.status_code == 403
    account = await create_account(client, 100)
    r = await client.post("/v1/ops/operators/alpha/drain", headers=bearer(account["api_key"]))
    assert r.status_code == 403
    assert (await figures(client))["operators"][0]["held_open"] is None


async def test_console_figures_follow_the_traffic(three: tuple[Node, httpx.AsyncClient]) -> None:
    node, client = three
    before = await figures(client)
    actors = {a["name"]: a for a in before["supervisor"]["actors"]}
    assert actors["provider_pool"]["state"] == "running"
    assert actors["scheduler"]["inbox_capacity"] > 0
    assert {o["name"] for o in before["operators"]} == set(OPERATORS)
    assert before["cluster"]["node_id"] == node.node_id
    # A lone node leases every shard: the map is its own, whole.
    assert before["cluster"]["shard_owners"] == [node.node_id] * 256
    [me] = before["cluster"]["nodes"]
    assert me["alive"] and me["shards"] == 256 and me["heartbeat_age_s"] < 10
    account = await create_account(client, 1_000_000)
    await send_batch(client, account["api_key"], 300)
    after = await all_sent(client, 300)
    assert after["counters"]["accepted"] - before["counters"]["accepted"] == 300
    assert after["scheduler"]["dispatched"] >= 300
    assert sum(sent_by(after).values()) >= 300
    used = [o for o in after["operators"] if o["batches"]]
    assert used and all(0 < o["latency_p50_ms"] <= o["latency_p99_ms"] for o in used)


async def test_a_drained_operator_takes_nothing_until_released(
    three: tuple[Node, httpx.AsyncClient],
) -> None:
    _, client = three
    account = await create_account(client, 1_000_000)
    r = await client.post("/v1/ops/operators/alpha/drain", headers=admin())
    assert r.status_code == 200, r.text
    drained = r.json()["operator"]
    assert (drained["name"], drained["state"], drained["held_open"]) == (
        "alpha",
        "open",
        "drained by an admin",
    )
    before = sent_by(await figures(client))
    await send_batch(client, account["api_key"], 400)
    view = await all_sent(client, 400)
    moved = {name: n - before[name] for name, n in sent_by(view).items()}
    assert moved["alpha"] == 0
    # (Batches of up to 100 go to beta or gamma by weight: either may take all four.)
    assert moved["beta"] + moved["gamma"] == 400
    # Held open past its cool-down (2 s): a drain is not a failure the breaker forgets.
    await trio.sleep(2.5)
    [alpha] = [o for o in (await figures(client))["operators"] if o["name"] == "alpha"]
    assert alpha["state"] == "open" and alpha["held_open"]

    r = await client.post("/v1/ops/operators/alpha/release", headers=admin())
    assert r.status_code == 200, r.text
    assert r.json()["operator"]["held_open"] is None
    assert r.json()["operator"]["state"] == "half_open"
    # Probes, then a share again (batches go to operators by weight: send until one does).
    sent = 400
    with trio.fail_after(30):
        while sent_by(await all_sent(client, sent))["alpha"] == before["alpha"]:
            await send_batch(client, account["api_key"], 50)
            sent += 50


async def test_draining_an_unknown_operator_is_404(three: tuple[Node, httpx.AsyncClient]) -> None:
    _, client = three
    for action in ("drain", "release"):
        r = await client.post(f"/v1/ops/operators/nobody/{action}", headers=admin())
        assert r.status_code == 404
        assert r.json()["code"] == "unknown_operator"


async def test_the_console_page_loads_nothing_from_elsewhere(
    three: tuple[Node, httpx.AsyncClient],
) -> None:
    _, client = three
    r = await client.get("/ops")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    # The only absolute URL in the page is SVG's namespace name, which is never fetched.
    urls = set(re.findall(r"""(?:https?:)?//[\w.-]+[^\s"'<>)]*""", r.text))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    for testid in ("supervisor-tree", "scheduler", "operators", "cluster", "rates"):
        assert f'data-testid="{testid}"' in r.text
