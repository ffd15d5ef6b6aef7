"""Delivery reports (POST /v1/dlr/{operator}) against a real node and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

import httpx
import msgspec
import trio

from smsgw.engine.messages import DeliveryReport, OutboundSms, SendResult
from smsgw.engine.ports import WriteGroup
from smsgw.runtime.server import Node, run_node
from smsgw.storage.pg import PgStore
from smsgw.storage.rows import id_floor_s
from tests.conftest import ADMIN_KEY, DLR_KEY, bearer, node_options
from tests.integration.helpers import (
    RELIABLE,
    assert_ledger_consistent,
    assert_problem,
    create_account,
    db_fetch,
    get_account,
    ledger,
    open_database,
    open_node,
    send,
    store_account,
    until,
    wait_all_final,
)


def dlr_headers(key: str = DLR_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post_dlr(
    client: httpx.AsyncClient, reports: list[dict[str, Any]], operator: str = "sim"
) -> httpx.Response:
    return await client.post(
        f"/v1/dlr/{operator}", json={"reports": reports}, headers=dlr_headers()
    )


async def sent_messages(client: httpx.AsyncClient, key: str, n: int) -> list[dict[str, Any]]:
    ids = []
    for i in range(n):
        r = await send(client, key, f"hello {i}")
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    finals = await wait_all_final(client, key, ids)
    assert all(m["status"] == "sent" for m in finals), finals
    return finals


async def statuses(client: httpx.AsyncClient, key: str, ids: Sequence[str]) -> list[str]:
    out = []
    for message_id in ids:
        r = await client.get(f"/v1/messages/{message_id}", headers=bearer(key))
        out.append(r.json()["status"])
    return out


async def test_reports_move_sent_messages_and_say_what_became_of_each(
    database_url: str, schema: str
) -> None:
    async with (
        open_node(database_url, schema, RELIABLE) as node,
        httpx.AsyncClient(base_url=node.url, timeout=30) as client,
    ):
        account = await create_account(client, 1_000)
        key = account["api_key"]
        m1, m2, m3 = await sent_messages(client, key, 3)
        before = await get_account(client, key)

        r = await post_dlr(
            client,
            [
                {"operator_message_id": m1["operator_message_id"], "status": "delivered"},
                {
                    "operator_message_id": m2["operator_message_id"],
                    "status": "undelivered",
                    "error": "absent_subscriber",
                },
                {"operator_message_id": "no-such-id", "status": "delivered"},
                # The same report twice in one request: the second is a duplicate.
                {"operator_message_id": m1["operator_message_id"], "status": "delivered"},
                # And a contrary one: a conflict, nothing changes.
                {"operator_message_id": m1["operator_message_id"], "status": "undelivered"},
            ],
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["result"] for x in body["results"]] == [
            "applied",
            "applied",
            "unknown",
            "duplicate",
            "conflict",
        ]
        assert body["results"][0]["message_id"] == m1["id"]
        assert body["results"][0]["status"] == "delivered"
        assert body["results"][4]["status"] == "delivered"
        assert body["counts"] == {"applied": 2, "duplicate": 1, "conflict": 1, "unknown": 1}

        assert await statuses(client, key, [m1["id"], m2["id"], m3["id"]]) == [
            "delivered",
            "undelivered",
            "sent",
        ]
        r = await client.get(f"/v1/messages/{m2['id']}", headers=bearer(key))
        assert r.json()["reason"] == "absent_subscriber"

        # A later request: the same report is a duplicate, the other status a conflict.
        r = await post_dlr(
            client,
            [
                {"operator_message_id": m1["operator_message_id"], "status": "delivered"},
                {"operator_message_id": m2["operator_message_id"], "status": "delivered"},
            ],
        )
        assert [x["result"] for x in r.json()["results"]] == ["duplicate", "conflict"]
        assert await statuses(client, key, [m1["id"], m2["id"]]) == ["delivered", "undelivered"]

        # The unknown id was recorded, not dropped.
        kept = await db_fetch(database_url, schema, "SELECT * FROM dlr_unmatched")
        assert [(k["operator"], k["operator_message_id"]) for k in kept] == [("sim", "no-such-id")]

        # Credit: captured at `sent`; an undelivered report refunds nothing.
        after = await get_account(client, key)
        assert after["balance"] == before["balance"] and after["held"] == 0
        assert_ledger_consistent(await ledger(database_url, schema))

        # The new statuses in every report.
        r = await client.get("/v1/messages?status=delivered", headers=bearer(key))
        assert [m["id"] for m in r.json()["items"]] == [m1["id"]]
        r = await client.get("/v1/messages?status=undelivered", headers=bearer(key))
        assert [m["id"] for m in r.json()["items"]] == [m2["id"]]
        r = await client.get("/v1/reports/summary?group_by=status", headers=bearer(key))
        groups = {g["status"]: g for g in r.json()["groups"]}
        assert set(groups) == {"delivered", "undelivered", "sent"}
        assert groups["delivered"]["delivered"] == 1 and groups["delivered"]["sent"] == 1
        totals = r.json()["totals"]
        assert (totals["sent"], totals["delivered"], totals["undelivered"]) == (3, 1, 1)
        assert totals["cost"] == m1["price"] + m2["price"] + m3["price"]
        r = await client.get("/v1/messages/export", headers=bearer(key))
        rows = {line.split(",")[0]: line for line in r.text.splitlines()[1:]}
        assert ",delivered," in rows[m1["id"]] and ",undelivered," in rows[m2["id"]]

        metrics = (
            await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        ).text
        assert 'smsgw_delivery_reports_total{operator="sim",result="applied"} 2.0' in metrics
        assert 'smsgw_messages_delivery_status_total{status="undelivered"} 1.0' in metrics


async def test_only_the_operators_own_key_is_taken(node: Node, client: httpx.AsyncClient) -> None:
    account = await create_account(client, 100)
    report = {"reports": [{"operator_message_id": "x", "status": "delivered"}]}
    for operator, headers in (
        ("sim", {}),
        ("sim", dlr_headers("wrong")),
        ("sim", {"Authorization": f"Bearer {ADMIN_KEY}"}),
        ("sim", bearer(account["api_key"])),
        ("other", dlr_headers()),  # the sim operator's key for another operator
    ):
        r = await client.post(f"/v1/dlr/{operator}", json=report, headers=headers)
        assert_problem(r, 401)
    assert node.engine.writer.deliveries == {}


async def test_bad_input_is_a_problem_and_changes_nothing(database_url: str, schema: str) -> None:
    async with (
        open_node(database_url, schema, RELIABLE) as node,
        httpx.AsyncClient(base_url=node.url, timeout=30) as client,
    ):
        account = await create_account(client, 100)
        (m,) = await sent_messages(client, account["api_key"], 1)
        good = {"operator_message_id": m["operator_message_id"], "status": "delivered"}
        url = "/v1/dlr/sim"
        cases: list[tuple[int, dict[str, Any]]] = [
            (400, {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
            (415, {"content": b"reports", "headers": {"Content-Type": "text/plain"}}),
            (422, {"json": {"reports": []}}),
            (422, {"json": {}}),
            (422, {"json": {"reports": [good, {"operator_message_id": "y", "status": "read"}]}}),
            (422, {"json": {"reports": [good, {"status": "delivered"}]}}),
            (422, {"json": {"reports": [{**good, "extra": 1}]}}),
            (422, {"json": {"reports": [{**good, "operator_message_id": ""}]}}),
            (422, {"json": {"reports": [good, {**good, "operator_message_id": "a\u0000b"}]}}),
            (422, {"json": {"reports": [good] * 10_001}}),
            (422, {"json": [good]}),
        ]
        for status, request in cases:
            headers = {**dlr_headers(), **request.pop("headers", {})}
            r = await client.post(url, headers=headers, **request)
            assert_problem(r, status)
        assert await statuses(client, account["api_key"], [m["id"]]) == ["sent"]
        assert await db_fetch(database_url, schema, "SELECT * FROM dlr_unmatched") == []
        assert node.engine.writer.deliveries == {}


class GatedOperator:
    """Answers `sent` (with operator ids gate-1, gate-2, ...) only once `open` is set: a DLR
    can then arrive before the gateway has recorded the message as sent."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.calls = 0

    @property
    def name(self) -> str:
        return "sim"

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        await self.open.wait()
        results = []
        for _ in batch:
            self.calls += 1
            results.append(SendResult("sent", operator_message_id=f"gate-{self.calls}"))
        return results


@asynccontextmanager
async def gated_node(database_url: str, schema: str) -> AsyncIterator[tuple[Node, GatedOperator]]:
    gate = GatedOperator()
    options = node_options(database_url, schema)
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(partial(run_node, options, [(gate, 1)]))
        try:
            yield node, gate
        finally:
            node.stop.set()
            gate.open.set()


async def test_a_report_that_overtakes_its_sent_is_kept_and_applied_later(
    database_url: str, schema: str
) -> None:
    async with (
        gated_node(database_url, schema) as (node, gate),
        httpx.AsyncClient(base_url=node.url, timeout=30) as client,
    ):
        account = await create_account(client, 100)
        key = account["api_key"]
        r = await send(client, key)
        message_id = r.json()["id"]
        r = await post_dlr(client, [{"operator_message_id": "gate-1", "status": "delivered"}])
        assert r.json()["results"] == [{"operator_message_id": "gate-1", "result": "unknown"}]
        assert await statuses(client, key, [message_id]) in (["queued"], ["sending"])

        gate.open.set()

        async def delivered() -> bool:
            return await statuses(client, key, [message_id]) == ["delivered"]

        with trio.fail_after(30):
            await until(delivered)
        kept = await db_fetch(
            database_url, schema, "SELECT message_id::text, resolved_at FROM dlr_unmatched"
        )
        assert kept[0]["message_id"] == message_id and kept[0]["resolved_at"] is not None
        assert node.engine.reconciler is not None and node.engine.reconciler.applied == 1
        assert_ledger_consistent(await ledger(database_url, schema))
        assert msgspec.json.decode(r.content)["counts"]["unknown"] == 1


async def test_old_kept_reports_and_given_up_callbacks_are_purged(
    database_url: str, schema: str
) -> None:
    from smsgw.storage.pg import PgStore

    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        await db.run(
            lambda c: c.execute(
                "INSERT INTO dlr_unmatched (operator, operator_message_id, status, received_at)"
                " VALUES ('sim', 'old', 'delivered', now() - interval '40 days'),"
                " ('sim', 'new', 'delivered', now());"
                " INSERT INTO callback_outbox (message_id, account_id, url, status, at,"
                " failed_at) VALUES"
                " (gen_random_uuid(), 1, 'http://127.0.0.1/', 'sent', now(),"
                "  now() - interval '40 days'),"
                " (gen_random_uuid(), 1, 'http://127.0.0.1/', 'sent', now(), now()),"
                " (gen_random_uuid(), 1, 'http://127.0.0.1/', 'sent', now(), NULL)"
            )
        )
        assert await store.purge_delivery_records(30 * 86_400.0, 100) == 2
        assert await store.purge_delivery_records(30 * 86_400.0, 100) == 0
    left = await db_fetch(database_url, schema, "SELECT operator_message_id FROM dlr_unmatched")
    assert left == [{"operator_message_id": "new"}]
    outbox = await db_fetch(database_url, schema, "SELECT count(*) AS n FROM callback_outbox")
    assert outbox[0]["n"] == 2


# --- where a report's message is looked for ---------------------------------------------------

_OLD_SENT = """
INSERT INTO messages (id, account_id, recipient, sender, body, segments, price, express, status,
                      created_at, updated_at, operator, operator_message_id)
VALUES ($1::uuid, $2, '+4915123456789', 'smsgw', 'hi', 1, 5, false, 'sent',
        to_timestamp($3), to_timestamp($3), 'op', $4)
"""


async def test_a_report_of_a_message_older_than_the_recent_days_is_applied(
    database_url: str, schema: str
) -> None:
    """A report is looked for among the last days' messages first (each day partition's
    index probed, not all of them), then everywhere: a message made ten days ago still moves
    on, and a report that finds no message anywhere is kept once."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        account = await store_account(store)
        made = time.time() - 10 * 86_400
        day = datetime.fromtimestamp(made, UTC).date()
        old_id = str(id_floor_s(made))  # an id of that day (its first millisecond's)

        async def setup(conn: Any) -> None:
            for table in ("messages", "message_events"):
                await conn.execute("SELECT smsgw_add_day_partition($1, $2)", table, day)
            await conn.execute(_OLD_SENT, old_id, account.id, made, "old-1")

        await db.run(setup)
        group = WriteGroup()
        reports = (DeliveryReport("old-1", "delivered"), DeliveryReport("nobody", "delivered"))
        group.deliveries.append(("op", reports))
        [answers] = (await store.commit_group(group)).deliveries
        assert [(a.result, a.message_id) for a in answers] == [
            ("applied", old_id),
            ("unknown", None),
        ]
        rows = await db_fetch(database_url, schema, "SELECT status FROM messages")
        assert [r["status"] for r in rows] == ["delivered"]
        kept = await db_fetch(database_url, schema, "SELECT operator_message_id FROM dlr_unmatched")
        assert [r["operator_message_id"] for r in kept] == ["nobody"]
