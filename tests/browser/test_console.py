"""The ops console (GET /ops) in a real Chromium against a running node.

Set SMSGW_UPDATE_SCREENSHOT=1 to write the screenshot of the console under load to
docs/ops-console.png (the README shows it); otherwise it goes to a temporary folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from tests.browser.conftest import CAP_PER_OPERATOR, OPERATORS, Browser, ServedNode
from tests.conftest import ADMIN_KEY, admin, bearer
from tests.integration.helpers import create_account

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "ops-console.png"

# What the page shows now: each lane's backlog, the rates, each operator's rate and state.
READ_PAGE = """() => {
  const q = (sel) => document.querySelector(sel);
  const lane = (id) => Number(q(`[data-testid="lane-${id}"]`)?.dataset.value || 0);
  const rate = (id) => Number(q(`[data-testid="rate-${id}"]`)?.dataset.rate || 0);
  const ops = {};
  for (const row of document.querySelectorAll('tr[data-operator]')) {
    const cell = q(`[data-testid="op-rate-${row.dataset.operator}"]`).textContent;
    ops[row.dataset.operator] = {
      rate: Number(cell.replace(/,/g, "")) || 0,  // "-" (no rate yet) is 0
      held: row.dataset.held, state: row.dataset.state,
    };
  }
  const inWindow = q('[data-testid="scheduler"]').textContent.match(/window in use\\s*([\\d,]+)/);
  return {
    backlog: lane("express") + lane("bulk") + lane("retrying") + lane("waiting"),
    window: inWindow ? Number(inWindow[1].replace(/,/g, "")) : 0,
    accepted: rate("accepted"), sent: rate("sent"), dlrs: rate("dlrs"), ops,
    connection: q('[data-testid="connection"]').textContent,
  };
}"""


def open_console(context: Any, url: str, key: str, requests: list[str]) -> Any:
    """A new tab on /ops, the key typed into its prompt; every request it makes is recorded."""
    page = context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url + "/ops")
    page.fill('[data-testid="key-input"]', key)
    page.click('[data-testid="key-submit"]')
    return page


def wait_live(page: Any) -> None:
    page.wait_for_selector('tr[data-actor="provider_pool"]', timeout=10_000)


def only_local(requests: list[str]) -> list[str]:
    """The requests that went anywhere but 127.0.0.1."""
    return [
        u
        for u in requests
        if urlsplit(u).scheme not in ("data", "about", "blob")
        and urlsplit(u).hostname != "127.0.0.1"
    ]


async def send_messages(client: httpx.AsyncClient, key: str, count: int, per_batch: int) -> None:
    for start in range(0, count, per_batch):
        items = [{"to": "+4915123456789", "text": f"m{i}"} for i in range(start, start + per_batch)]
        r = await client.post("/v1/messages/batch", json={"messages": items}, headers=bearer(key))
        assert r.status_code == 202, r.text
        await trio.sleep(0.3)


async def console_json(client: httpx.AsyncClient) -> dict:
    r = await client.get("/v1/ops/console", headers=admin())
    assert r.status_code == 200, r.text
    return r.json()


async def test_the_console_shows_a_running_node_and_loads_nothing_from_elsewhere(
    browser: Browser, served: ServedNode, client: httpx.AsyncClient
) -> None:
    assert served.node is not None
    account = await create_account(client, 1_000_000)
    await send_messages(client, account["api_key"], 200, 100)
    requests: list[str] = []

    def check(context: Any) -> dict[str, Any]:
        page = open_console(context, served.url, ADMIN_KEY, requests)
        wait_live(page)
        page.wait_for_function(  # two samples make a rate
            "() => document.querySelector('[data-testid=\"rate-accepted\"]').dataset.rate !== ''"
        )
        shown = {
            "node": page.inner_text('[data-testid="node-id"]'),
            "actors": page.eval_on_selector_all(
                "tr[data-actor]", "rows => rows.map(r => [r.dataset.actor, r.innerText])"
            ),
            "operators": page.eval_on_selector_all(
                "tr[data-operator]", "rows => rows.map(r => [r.dataset.operator, r.innerText])"
            ),
            "owners": page.eval_on_selector_all(
                '[data-testid="shard-map"] rect', "cells => cells.map(c => c.dataset.owner)"
            ),
            "cluster": page.inner_text('[data-testid="cluster"]'),
            "scheduler": page.inner_text('[data-testid="scheduler"]'),
            "rates": page.eval_on_selector_all(
                '[data-testid="rates"] .chart', "charts => charts.map(c => c.dataset.testid)"
            ),
            "stored": page.evaluate("() => sessionStorage.getItem('smsgw.adminKey')"),
        }
        page.close()
        return shown

    shown = await browser.run(check)
    assert only_local(requests) == [], requests
    assert not any(ADMIN_KEY in u for u in requests), "the key must never be in a URL"
    assert shown["stored"] == ADMIN_KEY
    node_id = served.node.node_id
    assert shown["node"] == node_id
    actors = dict(shown["actors"])
    assert {"store_writer", "scheduler", "provider_pool", "shard_leases", "http"} <= set(actors)
    assert "running" in actors["provider_pool"]
    assert "/" in actors["scheduler"]  # mailbox depth / capacity
    operators = dict(shown["operators"])
    assert set(operators) == set(OPERATORS)
    assert all("closed" in text and f"{CAP_PER_OPERATOR:g}" in text for text in operators.values())
    assert shown["owners"] == [node_id] * 256
    assert node_id in shown["cluster"] and "256" in shown["cluster"]
    assert "window in use" in shown["scheduler"] and "light reserve" in shown["scheduler"]
    assert shown["rates"] == [
        f"rate-{n}" for n in ("accepted", "sent", "failed", "dlrs", "callbacks")
    ]
    # The figures the page shows are the node's.
    figures = await console_json(client)
    assert figures["counters"]["accepted"] == 200


async def test_a_wrong_key_is_refused(browser: Browser, served: ServedNode) -> None:
    requests: list[str] = []

    def check(context: Any) -> dict[str, Any]:
        page = open_console(context, served.url, "not-the-admin-key", requests)
        page.wait_for_function(
            "() => document.querySelector('[data-testid=\"key-error\"]').textContent !== ''"
        )
        shown = {
            "error": page.inner_text('[data-testid="key-error"]'),
            "prompt": page.is_visible('[data-testid="key-input"]'),
            "actors": page.locator("tr[data-actor]").count(),
            "stored": page.evaluate("() => sessionStorage.getItem('smsgw.adminKey')"),
        }
        page.close()
        return shown

    shown = await browser.run(check)
    assert "refused" in shown["error"] and "403" in shown["error"]
    assert shown["prompt"] and shown["actors"] == 0 and shown["stored"] is None
    assert not any("not-the-admin-key" in u for u in requests)


async def test_a_thousand_messages_move_the_rates_and_the_backlog(
    browser: Browser, served: ServedNode, client: httpx.AsyncClient
) -> None:
    account = await create_account(client, 1_000_000)
    requests: list[str] = []
    page: Any = await browser.run(
        lambda context: open_console(context, served.url, ADMIN_KEY, requests)
    )
    await browser.run(lambda _: wait_live(page))
    await trio.sleep(3)  # a few quiet seconds in the charts first
    screenshot = SCREENSHOT if os.environ.get("SMSGW_UPDATE_SCREENSHOT") == "1" else None

    def watch(seconds: float) -> list[dict[str, Any]]:
        seen = []
        end = time.monotonic() + seconds
        shot_at = time.monotonic() + 3.0
        while time.monotonic() < end:
            seen.append(page.evaluate(READ_PAGE))
            if shot_at is not None and time.monotonic() >= shot_at:
                page.screenshot(path=str(screenshot or TMP_SHOT), full_page=True)
                shot_at = None  # type: ignore[assignment]
            page.wait_for_timeout(250)
        return seen

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_messages, client, account["api_key"], 1_000, 100)
        seen = await browser.run(lambda _: watch(9.0))
    await browser.run(lambda _: page.close())
    assert max(s["backlog"] for s in seen) > 0, "the backlog never showed"
    assert max(s["window"] for s in seen) > 0, "the window was never in use"
    assert max(s["accepted"] for s in seen) > 50, "the accept rate never moved"
    assert max(s["sent"] for s in seen) > 50, "the send rate never moved"
    assert max(sum(o["rate"] for o in s["ops"].values()) for s in seen) > 50
    assert all(s["connection"] == "live" for s in seen)
    assert (screenshot or TMP_SHOT).stat().st_size > 10_000
    assert only_local(requests) == []
    figures = await console_json(client)
    assert figures["counters"]["accepted"] == 1_000


TMP_SHOT = Path(os.environ.get("TMPDIR", "/tmp")) / "smsgw-ops-console.png"


async def test_a_crash_shows_as_a_restart_within_two_seconds(
    browser: Browser, served: ServedNode
) -> None:
    assert served.node is not None and served.node.engine.supervisor is not None
    requests: list[str] = []
    page: Any = await browser.run(
        lambda context: open_console(context, served.url, ADMIN_KEY, requests)
    )
    await browser.run(lambda _: wait_live(page))
    before = int(
        await browser.run(lambda _: page.inner_text('[data-testid="restarts-provider_pool"]'))
    )
    # The supervisor's own fault injection (Erlang's exit/2): the pool's run loop fails now.
    served.node.engine.supervisor.kill("provider_pool", "injected by the ops console test")
    killed = trio.current_time()
    await browser.run(
        lambda _: page.wait_for_function(
            "n => Number(document.querySelector('[data-testid=\"restarts-provider_pool\"]')"
            ".textContent) > n",
            arg=before,
            timeout=2_000,
        )
    )
    assert trio.current_time() - killed < 2.0
    row = await browser.run(lambda _: page.inner_text('tr[data-actor="provider_pool"]'))
    await browser.run(lambda _: page.close())
    assert "ChildKilled: injected by the ops console test" in row


async def test_draining_an_operator_in_the_page_moves_its_traffic_to_the_others(
    browser: Browser, served: ServedNode, client: httpx.AsyncClient
) -> None:
    account = await create_account(client, 1_000_000)
    requests: list[str] = []
    dialogs: list[str] = []
    page: Any = await browser.run(
        lambda context: open_console(context, served.url, ADMIN_KEY, requests)
    )
    await browser.run(lambda _: wait_live(page))

    def confirm_and_click(testid: str) -> None:
        def answer(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.accept()

        page.once("dialog", answer)
        page.click(f'[data-testid="{testid}"]')

    await browser.run(lambda _: confirm_and_click("drain-alpha"))
    await browser.run(
        lambda _: page.wait_for_selector('tr[data-operator="alpha"][data-held="yes"]')
    )
    assert "Drain operator alpha?" in dialogs[0]
    before = {o["name"]: o["messages"] for o in (await console_json(client))["operators"]}

    def watch(seconds: float) -> list[dict[str, Any]]:
        seen = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            seen.append(page.evaluate(READ_PAGE))
            page.wait_for_timeout(250)
        return seen

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_messages, client, account["api_key"], 400, 100)
        seen = await browser.run(lambda _: watch(5.0))
    with trio.fail_after(30):
        while True:
            figures = await console_json(client)
            if figures["counters"]["sent"] >= 380:  # ~2% fail for now and are retried
                break
            await trio.sleep(0.1)
    after = {o["name"]: o["messages"] for o in figures["operators"]}
    assert after["alpha"] == before["alpha"]
    assert after["beta"] + after["gamma"] > before["beta"] + before["gamma"]
    assert all(s["ops"]["alpha"]["rate"] == 0 and s["ops"]["alpha"]["held"] == "yes" for s in seen)
    assert max(s["ops"]["beta"]["rate"] + s["ops"]["gamma"]["rate"] for s in seen) > 0

    await browser.run(lambda _: confirm_and_click("release-alpha"))
    await browser.run(lambda _: page.wait_for_selector('tr[data-operator="alpha"][data-held="no"]'))
    await browser.run(lambda _: page.close())
    assert "Release operator alpha?" in dialogs[1]
    [alpha] = [o for o in (await console_json(client))["operators"] if o["name"] == "alpha"]
    assert alpha["held_open"] is None and alpha["state"] in ("half_open", "closed")


async def test_the_console_says_so_when_the_node_restarts_and_picks_up_again(
    browser: Browser, served: ServedNode
) -> None:
    requests: list[str] = []
    page: Any = await browser.run(
        lambda context: open_console(context, served.url, ADMIN_KEY, requests)
    )
    await browser.run(lambda _: wait_live(page))
    await served.stop()
    down = await browser.run(
        lambda _: (
            page.wait_for_selector('[data-testid="connection"].down', timeout=10_000)
            and page.inner_text('[data-testid="connection"]')
        )
    )
    assert "unreachable" in down and "reconnecting" in down
    await served.start()  # the same port, the same database
    back = await browser.run(
        lambda _: (
            page.wait_for_selector('[data-testid="connection"].back', timeout=15_000)
            and page.inner_text('[data-testid="connection"]')
        )
    )
    assert "reconnected" in back
    prompt = await browser.run(lambda _: page.is_visible('[data-testid="key-input"]'))
    actors = await browser.run(lambda _: page.locator("tr[data-actor]").count())
    await browser.run(lambda _: page.close())
    assert not prompt and actors >= 5  # the key was kept; the figures are the new run's
    assert only_local(requests) == []
