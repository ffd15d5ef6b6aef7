"""Reports over real HTTP and PostgreSQL: cursor pages, filters, summaries, CSV exports."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from smsgw.engine.retry import RetryPolicy
from smsgw.http.routes import reports
from smsgw.sim.operator import OperatorProfile
from tests.conftest import bearer
from tests.integration.helpers import (
    FLAKY,
    RELIABLE,
    TO,
    assert_problem,
    create_account,
    get_account,
    http_client,
    open_node,
    send,
    wait_all_final,
)

FAST_RETRY = RetryPolicy(backoff_base=0.02)
OTHER = "+4915199999999"


async def send_ok(client: httpx.AsyncClient, key: str, text: str, **fields: Any) -> dict:
    r = await send(client, key, text, **fields)
    assert r.status_code == 202, r.text
    return r.json()


async def page(client: httpx.AsyncClient, key: str, **params: Any) -> dict:
    r = await client.get("/v1/messages", params=params, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()


async def list_all(client: httpx.AsyncClient, key: str, **params: Any) -> list[dict]:
    items: list[dict] = []
    cursor = None
    for _ in range(1_000):
        body = await page(client, key, **params, **({"cursor": cursor} if cursor else {}))
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


def order_key(item: dict) -> tuple[str, str]:
    # RFC 3339 in UTC with a fixed format sorts as text; ids break ties.
    return (item["created_at"], item["id"])


async def test_pages_are_stable_while_messages_arrive(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 10_000)
    key = account["api_key"]
    before = [(await send_ok(client, key, f"old {i}"))["id"] for i in range(23)]

    seen: list[dict] = []
    cursor = None
    pages = 0
    while True:
        body = await page(client, key, limit=5, **({"cursor": cursor} if cursor else {}))
        pages += 1
        assert len(body["items"]) <= 5
        seen += body["items"]
        # New messages between pages: they are newer than every cursor, so they neither
        # shift the following pages nor appear in them.
        for i in range(3):
            await send_ok(client, key, f"new {pages}.{i}")
        cursor = body["next_cursor"]
        if cursor is None:
            break
    ids = [item["id"] for item in seen]
    assert len(ids) == len(set(ids)), "an item was repeated"
    assert set(ids) == set(before), "an item was skipped, or a new one slipped in"
    assert pages == 5
    keys = [order_key(item) for item in seen]
    assert keys == sorted(keys, reverse=True), "not newest first"
    # A fresh listing sees everything, the new messages first.
    everything = await list_all(client, key, limit=7)
    assert len(everything) == 23 + 3 * pages
    assert {i["id"] for i in everything[-23:]} == set(before)


async def test_items_have_the_shape_of_a_single_message(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    key = account["api_key"]
    sent = await send_ok(client, key, "shape", client_ref="ref-1", express=True)
    [final] = await wait_all_final(client, key, [sent["id"]])
    body = await page(client, key)
    assert body["next_cursor"] is None
    assert body["items"] == [final]


async def test_the_last_page_has_no_cursor(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    key = account["api_key"]
    assert await page(client, key) == {"items": [], "next_cursor": None}
    for i in range(4):
        await send_ok(client, key, f"m{i}")
    first = await page(client, key, limit=2)
    second = await page(client, key, limit=2, cursor=first["next_cursor"])
    # Exactly two left: a full last page still says there is nothing after it.
    assert len(second["items"]) == 2 and second["next_cursor"] is None
    assert len((await page(client, key, limit=4))["items"]) == 4
    assert (await page(client, key, limit=4))["next_cursor"] is None


async def test_filters(database_url: str, schema: str) -> None:
    async with (
        open_node(database_url, schema, FLAKY, retry=FAST_RETRY) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 10_000)
        key = account["api_key"]
        ids = []
        for i in range(30):
            fields: dict[str, Any] = {"express": i % 3 == 0}
            if i % 5 == 0:
                fields["to"] = OTHER
            if i % 4 == 0:
                fields["client_ref"] = f"order-{i}"
            ids.append((await send_ok(client, key, f"message {i}", **fields))["id"])
        finals = await wait_all_final(client, key, ids)
        by_id = {m["id"]: m for m in finals}

        def expect(predicate: Any) -> set[str]:
            return {m["id"] for m in finals if predicate(m)}

        async def got(**params: Any) -> set[str]:
            items = await list_all(client, key, limit=4, **params)
            assert all(by_id[i["id"]] == i for i in items)
            return {i["id"] for i in items}

        statuses = {m["status"] for m in finals}
        assert statuses == {"sent", "failed"}, "the seeded operator fails some"
        for status in ("sent", "failed", "queued"):
            assert await got(status=status) == expect(lambda m, s=status: m["status"] == s)
        assert await got(to=OTHER) == expect(lambda m: m["to"] == OTHER)
        assert await got(to=TO) == expect(lambda m: m["to"] == TO)
        assert await got(express="true") == expect(lambda m: m["express"])
        assert await got(express="false") == expect(lambda m: not m["express"])
        assert await got(client_ref="order-8") == expect(lambda m: m["client_ref"] == "order-8")
        assert len(await got(client_ref="order-8")) == 1
        assert await got(client_ref="nope") == set()
        both = await got(status="sent", express="true", to=OTHER)
        assert both == expect(lambda m: m["status"] == "sent" and m["express"] and m["to"] == OTHER)

        # created range: [from, to)
        ordered = sorted(finals, key=order_key)
        middle, later = ordered[10], ordered[20]
        window = await got(created_from=middle["created_at"], created_to=later["created_at"])
        assert window == {m["id"] for m in ordered if middle["created_at"] <= m["created_at"]} & {
            m["id"] for m in ordered if m["created_at"] < later["created_at"]
        }
        assert middle["id"] in window and later["id"] not in window
        offset = await got(created_from=middle["created_at"].replace("Z", "+00:00"))
        assert offset == {m["id"] for m in ordered if m["created_at"] >= middle["created_at"]}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "ten"},
        {"limit": -1},
        {"cursor": "not-a-cursor"},
        {"cursor": "AAAA"},
        {"status": "delivered!"},
        {"express": "yes"},
        {"to": "12345"},
        {"created_from": "yesterday"},
        {"created_from": "2025-01-01T00:00:00"},  # no offset
        {"created_from": "2025-02-01T00:00:00Z", "created_to": "2025-01-01T00:00:00Z"},
        {"created_after": "2025-01-01T00:00:00Z"},
        {"client_ref": "x" * 101},
    ],
    ids=lambda p: ",".join(f"{k}={str(v)[:12]}" for k, v in p.items()),
)
async def test_bad_list_parameters_are_422(client: httpx.AsyncClient, params: dict) -> None:
    account = await create_account(client, 100)
    await send_ok(client, account["api_key"], "x")
    r = await client.get("/v1/messages", params=params, headers=bearer(account["api_key"]))
    assert_problem(r, 422)


async def test_limit_bounds(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 10_000)
    key = account["api_key"]
    for i in range(3):
        await send_ok(client, key, f"m{i}")
    assert len((await page(client, key, limit=1000))["items"]) == 3
    assert len((await page(client, key, limit=1))["items"]) == 1


async def test_summary_counts_segments_cost_and_held(database_url: str, schema: str) -> None:
    async with (
        open_node(database_url, schema, FLAKY, retry=FAST_RETRY) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 10_000)
        key = account["api_key"]
        ids = [(await send_ok(client, key, "x" * (60 * (i % 4)) + "hi"))["id"] for i in range(20)]
        ids += [(await send_ok(client, key, "quick", express=True))["id"] for _ in range(5)]
        finals = await wait_all_final(client, key, ids)
        r = await client.get(
            "/v1/reports/summary", params={"group_by": "status"}, headers=bearer(key)
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["group_by"] == "status"
        assert body["created_from"] is body["created_to"] is body["from"] is body["to"] is None
        expected: dict[str, dict[str, int]] = {}
        for m in finals:
            g = expected.setdefault(
                m["status"],
                {"messages": 0, "sent": 0, "failed": 0, "pending": 0, "segments": 0, "cost": 0},
            )
            g["messages"] += 1
            g[m["status"]] += 1
            g["segments"] += m["segments"]
            g["cost"] += m["price"] if m["status"] == "sent" else 0
        groups = {g["status"]: g for g in body["groups"]}
        assert set(groups) == set(expected) == {"sent", "failed"}
        for status, want in expected.items():
            assert {k: groups[status][k] for k in want} == want
            assert groups[status]["held"] == 0
        totals = body["totals"]
        assert totals["messages"] == 25
        assert totals["cost"] == sum(m["price"] for m in finals if m["status"] == "sent")
        assert totals["segments"] == sum(m["segments"] for m in finals)
        # The cost is what the account was charged.
        me = await get_account(client, key)
        assert me["balance"] == 10_000 - totals["cost"] and me["held"] == 0

        day = finals[0]["created_at"][:10]
        r = await client.get("/v1/reports/summary", headers=bearer(key))
        by_day = r.json()
        assert by_day["group_by"] == "day"
        assert [g["day"] for g in by_day["groups"]] == [day]
        assert by_day["totals"] == totals

        # A range with nothing in it.
        r = await client.get(
            "/v1/reports/summary",
            params={"created_from": "2000-01-01T00:00:00Z", "created_to": "2000-02-01T00:00:00Z"},
            headers=bearer(key),
        )
        assert r.json()["groups"] == [] and r.json()["totals"]["messages"] == 0
        assert r.json()["created_from"] == r.json()["from"] == "2000-01-01T00:00:00Z"
        # The names before API 2.0.0 still work, deprecated; one name for each end.
        r = await client.get(
            "/v1/reports/summary",
            params={"from": "2000-01-01T00:00:00Z", "created_to": "2000-02-01T00:00:00Z"},
            headers=bearer(key),
        )
        assert r.json()["created_to"] == "2000-02-01T00:00:00Z", r.text
        assert r.json()["created_from"] == "2000-01-01T00:00:00Z"


async def test_summary_reports_held_credit_of_messages_not_final(
    database_url: str, schema: str
) -> None:
    slow = OperatorProfile(name="slow", latency_ms_median=20_000.0, latency_ms_p99=30_000.0)
    async with open_node(database_url, schema, slow) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        key = account["api_key"]
        for i in range(6):
            await send_ok(client, key, f"waiting {i}", express=i == 0)
        r = await client.get(
            "/v1/reports/summary", params={"group_by": "status"}, headers=bearer(key)
        )
        [queued] = r.json()["groups"]
        assert queued["status"] == "queued"
        assert (queued["messages"], queued["pending"], queued["cost"]) == (6, 6, 0)
        assert queued["held"] == 5 * 5 + 7 == (await get_account(client, key))["held"]


@pytest.mark.parametrize(
    "params",
    [
        {"group_by": "month"},
        {"created_from": "soon"},
        {"from": "soon"},
        {"created_from": "2025-02-01T00:00:00Z", "created_to": "2025-01-01T00:00:00Z"},
        {"from": "2025-02-01T00:00:00Z", "created_to": "2025-01-01T00:00:00Z"},
        {"from": "2025-01-01T00:00:00Z", "created_from": "2025-01-01T00:00:00Z"},
        {"status": "sent"},
    ],
)
async def test_bad_summary_parameters_are_422(client: httpx.AsyncClient, params: dict) -> None:
    account = await create_account(client, 100)
    r = await client.get("/v1/reports/summary", params=params, headers=bearer(account["api_key"]))
    assert_problem(r, 422)


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


async def test_export_streams_every_message_as_csv(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pages, so the export crosses several keyset pages.
    monkeypatch.setattr(reports, "EXPORT_PAGE", 4)
    account = await create_account(client, 10_000)
    key = account["api_key"]
    awkward = 'a "quoted", multi-line\ntext with ünïcödé ✓'
    ids = [(await send_ok(client, key, f"m{i}", client_ref=f"r{i}"))["id"] for i in range(13)]
    ids.append((await send_ok(client, key, awkward))["id"])
    finals = await wait_all_final(client, key, ids)

    async with client.stream("GET", "/v1/messages/export", headers=bearer(key)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        text = (await r.aread()).decode()
    assert text.splitlines()[0] == ",".join(reports.EXPORT_COLUMNS)
    rows = parse_csv(text)
    assert [row["id"] for row in rows] == [m["id"] for m in sorted(finals, key=order_key)]
    by_id = {m["id"]: m for m in finals}
    for row in rows:
        m = by_id[row["id"]]
        assert row["text"] == m["text"] and row["to"] == m["to"] and row["status"] == m["status"]
        assert int(row["price"]) == m["price"] and int(row["segments"]) == m["segments"]
        assert row["express"] == "false" and row["client_ref"] == (m["client_ref"] or "")
        for name in ("created_at", "updated_at"):
            assert row[name].endswith("Z")
            assert datetime.fromisoformat(row[name]) == datetime.fromisoformat(m[name])
    assert rows[-1]["text"] == awkward

    # [from, to) selects by creation time, like the list.
    ordered = sorted(finals, key=order_key)
    r = await client.get(
        "/v1/messages/export",
        params={"created_from": ordered[3]["created_at"], "created_to": ordered[9]["created_at"]},
        headers=bearer(key),
    )
    assert [row["id"] for row in parse_csv(r.text)] == [m["id"] for m in ordered[3:9]]
    # And by the deprecated names of before API 2.0.0.
    r = await client.get(
        "/v1/messages/export",
        params={"from": ordered[3]["created_at"], "to": ordered[9]["created_at"]},
        headers=bearer(key),
    )
    assert [row["id"] for row in parse_csv(r.text)] == [m["id"] for m in ordered[3:9]]


async def test_export_of_nothing_is_a_header(client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    r = await client.get("/v1/messages/export", headers=bearer(account["api_key"]))
    assert r.status_code == 200
    assert r.text == ",".join(reports.EXPORT_COLUMNS) + "\n"
    r = await client.get(
        "/v1/messages/export", params={"created_from": "later"}, headers=bearer(account["api_key"])
    )
    assert_problem(r, 422)
    r = await client.get(
        "/v1/messages/export", params={"status": "sent"}, headers=bearer(account["api_key"])
    )
    assert_problem(r, 422)


async def test_reports_need_an_account_key(client: httpx.AsyncClient) -> None:
    for path in ("/v1/messages", "/v1/reports/summary", "/v1/messages/export"):
        assert_problem(await client.get(path), 401)


def test_cursor_round_trip() -> None:
    at = datetime(2025, 3, 4, 5, 6, 7, 891_011, tzinfo=UTC)
    message_id = "0195a2b3-c4d5-7e6f-8a9b-0c1d2e3f4a5b"
    cursor = reports.encode_cursor(at, message_id)
    assert cursor.isascii() and "=" not in cursor
    assert reports.decode_cursor(cursor) == (at, message_id)


async def test_reports_work_with_a_reliable_operator_too(database_url: str, schema: str) -> None:
    # Everything sent: the summary's cost is the whole spend, held nothing.
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 100)
        key = account["api_key"]
        ids = [(await send_ok(client, key, f"m{i}"))["id"] for i in range(4)]
        await wait_all_final(client, key, ids)
        r = await client.get("/v1/reports/summary", headers=bearer(key))
        assert r.json()["totals"] == {
            "messages": 4,
            "sent": 4,
            "failed": 0,
            "pending": 0,
            "segments": 4,
            "cost": 20,
            "held": 0,
            "delivered": 0,
            "undelivered": 0,
            "expired": 0,
            "cancelled": 0,
            "scheduled": 0,
        }
