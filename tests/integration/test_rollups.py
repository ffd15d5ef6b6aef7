"""Rollups (migration 018) stay equal to a scan of the messages through every write that stores
messages or moves their status, and GET /v1/reports/summary, which reads them, equals a scan:
real PostgreSQL, real HTTP."""

from __future__ import annotations

import random
import tempfile
import time
import zoneinfo
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import phonenumbers
import trio
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from smsgw.engine.messages import DeliveryReport, OutboundSms, Outcome
from smsgw.engine.ports import WriteGroup
from smsgw.engine.retry import RetryPolicy
from smsgw.http.context import uuid7
from smsgw.runtime.server import Node, run_node
from smsgw.sim.dlr import DlrProfile
from smsgw.storage.cluster import PgCluster
from smsgw.storage.commit import Handoff
from smsgw.storage.pg import PgStore
from tests.conftest import bearer, node_options
from tests.integration.helpers import (
    FLAKY,
    RELIABLE,
    assert_ledger_consistent,
    assert_problem,
    assert_rollups_exact,
    create_account,
    db_fetch,
    http_client,
    ledger,
    open_database,
    open_node,
    until,
)
from tests.integration.nodes import SLOW, serve_node

# One-, two- and three-digit calling codes: North America, Iran, Germany, the Emirates, Russia.
NUMBERS = ("+14155550100", "+989121234567", "+4915123456789", "+971501234567", "+79161234567")
SENDERS = ("Shop", "Bank")


def outcome(sms: OutboundSms, status: str, operator: str, omid: str | None = None) -> Outcome:
    return Outcome(
        sms=sms,
        status=status,  # type: ignore[arg-type]
        operator=operator,
        operator_message_id=omid,
        reason=None if status == "sent" else "rejected",
        attempts=1,
        at=time.time(),
    )


async def test_every_write_keeps_the_rollups_exact(database_url: str, schema: str) -> None:
    """Accepts (one statement, the exact way, COPY, with and without hand-off), duplicates
    taken back, outcomes of every kind (one given twice, one group committed twice as after a
    crash), DLRs (applied, repeated, kept and reconciled later), cancels of a queued and a
    scheduled message, and promotions: after each, the rollups equal a rebuild."""
    now = time.time()
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        create = WriteGroup()
        create.creates += [("a", 10**7, b"a" * 32), ("b", 10**7, b"b" * 32)]
        a, b = (await store.commit_group(create)).creates
        made = 0

        def sms(account_id: int, **extra: Any) -> OutboundSms:
            nonlocal made
            made += 1
            i = made
            return OutboundSms(
                id=uuid7(),
                account_id=account_id,
                to=NUMBERS[i % len(NUMBERS)],
                sender=SENDERS[i % 2],
                text="hi",
                segments=1 + i % 3,
                price=5 * (1 + i % 3),
                express=i % 5 == 0,
                created_at=now - (i % 17) * 311.0,  # over many 15-minute buckets
                **extra,
            )

        async def commit(group: WriteGroup) -> None:
            result = await store.commit_group(group)
            assert result is not None
            await assert_rollups_exact(database_url, schema)

        # One statement: single accepts.
        group = WriteGroup()
        singles = [sms(a.id) for _ in range(12)]
        group.accepts += [([s], False) for s in singles]
        await commit(group)
        # The exact way (a top-up in the group), a scheduled one among them.
        group = WriteGroup()
        group.topups.append((a.id, 100))
        later = sms(a.id, send_at=now + 3600)
        exact = [sms(a.id) for _ in range(5)] + [later]
        group.accepts.append((exact, False))
        await commit(group)
        # COPY: a batch of 250, some scheduled.
        batch = [sms(b.id, send_at=now + 3600 if i % 7 == 0 else None) for i in range(250)]
        group = WriteGroup()
        group.accepts.append((batch, False))
        await commit(group)
        # COPY with hand-off, on a node that leases no shard.
        cluster = PgCluster(db, database_url, "n1")
        await cluster.join(3.0)
        handing = PgStore(db, handoff=Handoff("n1", cluster.lock_class, cluster.channel))
        group = WriteGroup()
        handed = [sms(b.id) for _ in range(220)]
        group.accepts.append((handed, False))
        await handing.commit_group(group)
        await assert_rollups_exact(database_url, schema)
        # A taken client_ref in an atomic batch: its stored siblings are taken back.
        first = sms(a.id, client_ref="order-1")
        group = WriteGroup()
        group.accepts.append(([first], False))
        await commit(group)
        group = WriteGroup()
        siblings = [sms(a.id), msgspec.structs.replace(sms(a.id), client_ref="order-1")]
        group.accepts.append((siblings, True))
        await commit(group)
        assert await messages_in(database_url, schema, siblings) == 0

        # Outcomes of every kind; one given twice in its group.
        pending = singles + exact[:5] + batch[1:7] + handed[:20]
        kinds = ("sent", "sent", "failed", "expired", "cancelled")
        outcomes = [
            outcome(s, kinds[i % 5], f"op{i % 2}", f"omid-{i}") for i, s in enumerate(pending)
        ]
        group = WriteGroup()
        group.outcomes += [*outcomes[:20], outcomes[0]]
        await commit(group)
        # The exact way (with a top-up), and then the same group again, as a node recovering
        # after a crash gives outcomes it is not sure were stored: nothing counts twice.
        for _ in range(2):
            group = WriteGroup()
            group.topups.append((b.id, 10))
            group.outcomes += outcomes[20:]
            await commit(group)

        # DLRs: applied, repeated, for a failed message (a conflict), and one for a message
        # not sent yet (kept), reconciled once it is sent.
        sent = [o for o in outcomes if o.status == "sent"]
        group = WriteGroup()
        reports = [
            DeliveryReport(o.operator_message_id or "", "delivered" if i % 2 else "undelivered")
            for i, o in enumerate(sent[:8])
            if o.operator == "op0"
        ]
        failed = next(o for o in outcomes if o.status == "failed" and o.operator == "op0")
        group.deliveries.append(
            (
                "op0",
                [
                    *reports,
                    reports[0],
                    DeliveryReport(failed.operator_message_id or "", "delivered"),
                ],
            )
        )
        group.deliveries.append(("op1", [DeliveryReport("omid-early", "delivered")]))
        await commit(group)
        early = batch[8]
        group = WriteGroup()
        group.outcomes.append(outcome(early, "sent", "op1", "omid-early"))
        await commit(group)
        assert await store.reconcile_deliveries(3600.0, 100) == 1
        await assert_rollups_exact(database_url, schema)

        # Cancels: a queued message and a scheduled one.
        assert batch[9].send_at is None and batch[14].send_at is not None
        for message in (batch[9], batch[14]):
            done = await store.cancel(b.id, message.id, None)
            assert done is not None and done.cancelled, done
            await assert_rollups_exact(database_url, schema)
        # Promotions of the scheduled ones that are due.
        promoted = await store.promote_due(None, now + 7200, 1000, 1000)
        # `later` and the batch's scheduled ones, but the one cancelled.
        assert len(promoted.messages) == len([s for s in batch if s.send_at])
        await assert_rollups_exact(database_url, schema)

    statuses = await db_fetch(
        database_url, schema, "SELECT DISTINCT status FROM message_rollups WHERE messages > 0"
    )
    assert {r["status"] for r in statuses} == {
        "queued",
        "sent",
        "failed",
        "expired",
        "cancelled",
        "delivered",
        "undelivered",
    }
    assert_ledger_consistent(await ledger(database_url, schema))


async def messages_in(database_url: str, schema: str, items: list[OutboundSms]) -> int:
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT count(*) AS n FROM messages WHERE id = ANY($1::uuid[])",
        [s.id for s in items],
    )
    return int(rows[0]["n"])


async def test_the_calling_code_of_every_country(database_url: str, schema: str) -> None:
    """smsgw_calling_code (migration 018) gives each calling code of the numbering plans the
    gateway validates against, from a whole number and from its first four characters (what
    a COPY's rollups send)."""
    codes = sorted(str(code) for code in COUNTRY_CODE_TO_REGION_CODE)
    numbers = [f"+{code}{'4' * (11 - len(code))}" for code in codes]
    async with open_database(database_url, schema):
        rows = await db_fetch(
            database_url,
            schema,
            "SELECT smsgw_calling_code(n) AS whole, smsgw_calling_code(left(n, 4)) AS prefix"
            " FROM unnest($1::text[]) WITH ORDINALITY AS x(n, i) ORDER BY i",
            numbers,
        )
    assert [r["whole"] for r in rows] == codes
    assert [r["prefix"] for r in rows] == codes


# --- the summary against a scan ---------------------------------------------------------------

FIGURES = (
    "messages",
    "sent",
    "failed",
    "pending",
    "segments",
    "cost",
    "held",
    "delivered",
    "undelivered",
    "expired",
    "cancelled",
    "scheduled",
)
SENT = ("sent", "delivered", "undelivered")
FAILED = ("failed", "expired", "cancelled")
PENDING = ("scheduled", "queued", "sending")


def scanned(
    rows: list[dict[str, Any]], group_by: str, tz: str = "UTC"
) -> dict[str | None, dict[str, int]]:
    """The summary computed here from the messages' rows, as the scan-based summary did."""
    zone = zoneinfo.ZoneInfo(tz)
    groups: dict[str | None, dict[str, int]] = {}
    for m in rows:
        key = {
            "day": m["created_at"].astimezone(zone).date().isoformat(),
            "status": m["status"],
            "operator": m["operator"],
            "sender": m["sender"],
            "country": str(phonenumbers.parse(m["recipient"]).country_code),
        }[group_by]
        g = groups.setdefault(key, dict.fromkeys(FIGURES, 0))
        status = m["status"]
        g["messages"] += 1
        g["segments"] += m["segments"]
        g["sent"] += status in SENT
        g["failed"] += status in FAILED
        g["pending"] += status in PENDING
        g["cost"] += m["price"] if status in SENT else 0
        g["held"] += m["price"] if status in PENDING else 0
        if status in ("delivered", "undelivered", "expired", "cancelled", "scheduled"):
            g[status] += 1
    return groups


async def messages_of(
    database_url: str,
    schema: str,
    account_id: int,
    low: datetime | None = None,
    high: datetime | None = None,
) -> list[dict[str, Any]]:
    return await db_fetch(
        database_url,
        schema,
        "SELECT created_at, status, operator, sender, recipient, segments, price FROM messages"
        " WHERE account_id = $1 AND ($2::timestamptz IS NULL OR created_at >= $2)"
        " AND ($3::timestamptz IS NULL OR created_at < $3)",
        account_id,
        low,
        high,
    )


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def assert_summary_is_a_scan(
    client: httpx.AsyncClient,
    key: str,
    rows: list[dict[str, Any]],
    params: dict[str, str],
    group_by: str,
    tz: str | None = None,
) -> None:
    query = {**params, "group_by": group_by, **({"tz": tz} if tz else {})}
    r = await client.get("/v1/reports/summary", params=query, headers=bearer(key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["group_by"] == group_by and body["tz"] == (tz or "UTC"), body
    got = {g[group_by]: {f: g[f] for f in FIGURES} for g in body["groups"]}
    want = scanned(rows, group_by, tz or "UTC")
    assert got == want, (query, got, want)
    keys = [g[group_by] for g in body["groups"]]
    assert keys == sorted(keys, key=lambda k: (k is None, k or "")), keys
    assert body["totals"] == {f: sum(g[f] for g in want.values()) for f in FIGURES}


QUICK_DLR = DlrProfile(delivered_ratio=0.5, delay_ms_median=30.0, delay_ms_p99=200.0, seed=3)


async def test_a_mixed_run_keeps_the_rollups_exact(database_url: str, schema: str) -> None:
    """Singles and a batch (COPY) to an operator that fails a third of them, some after
    retries, and reports delivery of the rest (delivered and undelivered); scheduled messages
    promoted and sent, one cancelled, one still waiting: the rollups equal a scan, and so does
    the summary in every grouping."""
    options = msgspec.structs.replace(
        node_options(database_url, schema, retry=RetryPolicy(backoff_base=0.02)),
        operators=(FLAKY,),
        operator_dlr=QUICK_DLR,
        dlr_keys=(),
    )
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(partial(run_node, options))
        async with http_client(node.url) as c:
            account = await create_account(c, 1_000_000)
            key = account["api_key"]
            for i in range(30):
                body = {
                    "to": NUMBERS[i % len(NUMBERS)],
                    "sender": SENDERS[i % 2],
                    "text": "x" * (70 * (i % 3)) + "hi",
                    "express": i % 6 == 0,
                }
                r = await c.post("/v1/messages", json=body, headers=bearer(key))
                assert r.status_code == 202, r.text
            items = [
                {"to": NUMBERS[i % len(NUMBERS)], "text": "batch", "sender": SENDERS[i % 2]}
                for i in range(250)
            ]
            r = await c.post("/v1/messages/batch", json={"messages": items}, headers=bearer(key))
            assert r.status_code == 202 and r.json()["accepted"] == 250, r.text[:500]
            soon = iso(datetime.now(UTC) + timedelta(seconds=2))
            later = iso(datetime.now(UTC) + timedelta(hours=1))
            r = await c.post(
                "/v1/messages/batch",
                json={"send_at": soon, "messages": items[:3]},
                headers=bearer(key),
            )
            assert r.status_code == 202, r.text
            waiting = []
            for _ in range(2):
                r = await c.post(
                    "/v1/messages",
                    json={"to": NUMBERS[0], "text": "later", "send_at": later},
                    headers=bearer(key),
                )
                assert r.status_code == 202, r.text
                waiting.append(r.json()["id"])
            r = await c.post(f"/v1/messages/{waiting[0]}/cancel", headers=bearer(key))
            assert r.status_code == 200, r.text

            async def settled() -> bool:
                rows = await db_fetch(
                    database_url,
                    schema,
                    "SELECT count(*) FILTER (WHERE status IN ('queued', 'sent')) AS moving,"
                    " count(*) FILTER (WHERE status = 'scheduled') AS scheduled FROM messages",
                )
                return bool(rows[0]["moving"] == 0 and rows[0]["scheduled"] == 1)

            with trio.fail_after(60):
                await until(settled, interval=0.1)
            assert await assert_rollups_exact(database_url, schema) == 30 + 250 + 3 + 2
            rows = await messages_of(database_url, schema, account["id"])
            statuses = {m["status"] for m in rows}
            assert {"delivered", "undelivered", "failed", "cancelled", "scheduled"} <= statuses
            for group_by in ("day", "status", "operator", "sender", "country"):
                await assert_summary_is_a_scan(c, key, rows, {}, group_by)
            await assert_summary_is_a_scan(c, key, rows, {}, "day", "Asia/Tehran")
        node.stop.set()
    assert_ledger_consistent(await ledger(database_url, schema))


# A spread of statuses whose rows no part of a running node moves (nothing queued or sent).
STILL = ("delivered", "undelivered", "failed", "expired", "cancelled", "scheduled")


async def test_summary_equals_a_scan_in_any_zone_and_any_range(
    database_url: str, schema: str
) -> None:
    """Messages over four days, some a microsecond either side of midnight in UTC and in
    Tehran (UTC+03:30), loaded directly and their rollups rebuilt (as a bulk load does): the
    summary equals a scan for ranges that start and end inside a 15-minute bucket, for one
    inside a single bucket, and for open ones, in every grouping, by day in UTC, Tehran and
    Kathmandu (UTC+05:45)."""
    rng = random.Random(27)
    base = datetime(2026, 3, 20, tzinfo=UTC)
    one = timedelta(microseconds=1)
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        other = await create_account(c, 1_000, name="other")
        key = account["api_key"]
        times = [base + timedelta(seconds=rng.uniform(0, 4 * 86_400)) for _ in range(600)]
        for day in range(4):
            for edge in (timedelta(days=day), timedelta(days=day, hours=20, minutes=30)):
                times += [base + edge - one, base + edge]
        rows = []
        for i, at in enumerate(times):
            status = STILL[i % len(STILL)]
            sent = status in SENT
            rows.append(
                {
                    "a": account["id"] if i % 9 else other["id"],
                    "r": NUMBERS[i % len(NUMBERS)],
                    "s": SENDERS[i % 2],
                    "g": 1 + i % 3,
                    "p": 5 * (1 + i % 3),
                    "e": i % 7 == 0,
                    "st": status,
                    "o": f"op{i % 3}" if sent or (status == "failed" and i % 2) else None,
                    "t": at.isoformat(),
                }
            )
        # Ids of their own time, in their days' partitions (migration 019), as the node's are.
        await db_fetch(
            database_url,
            schema,
            "SELECT smsgw_add_day_partition('messages', d::date)"
            " FROM generate_series($1::date - 1, $1::date + 5, interval '1 day') AS d",
            base.date(),
        )
        await db_fetch(
            database_url,
            schema,
            "INSERT INTO messages (id, account_id, recipient, sender, body, segments, price,"
            " express, status, operator, created_at, updated_at, send_at)"
            " SELECT uuid7_at(x.t), x.a, x.r, x.s, 'hi', x.g, x.p, x.e, x.st, x.o, x.t, x.t,"
            " CASE WHEN x.st = 'scheduled' THEN now() + interval '1 day' END"
            " FROM json_to_recordset($1::json) AS x(a bigint, r text, s text, g int,"
            " p int, e bool, st text, o text, t timestamptz)",
            msgspec.json.encode(rows).decode(),
        )
        await db_fetch(database_url, schema, "SELECT smsgw_rollup_rebuild($1)", account["id"])
        await db_fetch(database_url, schema, "SELECT smsgw_rollup_rebuild($1)", other["id"])
        await assert_rollups_exact(database_url, schema)

        low = base + timedelta(days=1, minutes=7, seconds=13.123456)
        high = base + timedelta(days=3, hours=20, minutes=31, microseconds=1)
        inside = (base + timedelta(hours=5, minutes=1), base + timedelta(hours=5, minutes=14))
        ranges: list[tuple[datetime | None, datetime | None]] = [
            (None, None),
            (low, high),
            (low, None),
            (None, high),
            inside,
            (base + timedelta(days=1), base + timedelta(days=2)),  # whole buckets
            # The ends of time a query may name: no bucket past the year 9999's last.
            (datetime(1, 1, 1, 0, 5, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, tzinfo=UTC)),
            (datetime(9999, 12, 31, 23, 50, tzinfo=UTC), None),
        ]
        for lo, hi in ranges:
            params = {}
            if lo is not None:
                params["created_from"] = iso(lo)
            if hi is not None:
                params["created_to"] = iso(hi)
            scan = await messages_of(database_url, schema, account["id"], lo, hi)
            empty = (lo, hi) == inside or (lo is not None and lo.year == 9999)
            assert bool(scan) != empty, (lo, hi)
            for group_by in ("status", "operator", "sender", "country"):
                await assert_summary_is_a_scan(c, key, scan, params, group_by)
            for tz in (None, "Asia/Tehran", "Asia/Kathmandu"):
                await assert_summary_is_a_scan(c, key, scan, params, "day", tz)


async def test_an_unknown_time_zone_is_422_naming_it(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        key = (await create_account(c, 1_000))["api_key"]
        for tz in ("Mars/Olympus", "+03:30", "", "../etc/passwd", "x" * 65):
            r = await c.get("/v1/reports/summary", params={"tz": tz}, headers=bearer(key))
            problem = assert_problem(r, 422)
            assert problem["field"] == "tz" or "tz" in problem["detail"], problem
        r = await c.get("/v1/reports/summary", params={"group_by": "region"}, headers=bearer(key))
        assert_problem(r, 422)


async def test_rollups_stay_exact_across_a_sigkill(database_url: str, schema: str) -> None:
    """A node killed (SIGKILL) with messages committed, some final and many at a slow
    operator; the node started again recovers them and sends them again, its operator failing
    some and reporting delivery of others: every message is counted once, in its final
    status."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "node.log"
        # Five numbers: the hourly limit per number is lifted.
        unlimited = ("--recipient-limit-per-hour", "1000000")
        async with serve_node(database_url, schema, "k1", log, *SLOW, *unlimited) as first:
            async with http_client(first.url) as c:
                account = await create_account(c, 1_000_000)
                key = account["api_key"]
                for i in range(20):
                    r = await c.post(
                        "/v1/messages",
                        json={"to": NUMBERS[i % len(NUMBERS)], "text": "hi"},
                        headers=bearer(key),
                    )
                    assert r.status_code == 202, r.text
                items = [{"to": NUMBERS[i % len(NUMBERS)], "text": "batch"} for i in range(250)]
                r = await c.post(
                    "/v1/messages/batch", json={"messages": items}, headers=bearer(key)
                )
                assert r.status_code == 202 and r.json()["accepted"] == 250, r.text[:500]

                async def some_final() -> bool:
                    rows = await db_fetch(
                        database_url,
                        schema,
                        "SELECT count(*) AS n FROM messages WHERE status <> 'queued'",
                    )
                    return bool(rows[0]["n"] > 0)

                with trio.fail_after(30):
                    await until(some_final, interval=0.1)
            before = await assert_rollups_exact(database_url, schema)
            first.process.kill()
            await first.process.wait()
        queued = await db_fetch(
            database_url, schema, "SELECT count(*) AS n FROM messages WHERE status = 'queued'"
        )
        assert before == 270 and queued[0]["n"] > 0, queued
        again = ("--operator-errors", "0.2,0.2", "--sim-dlr", "0.5,50,300", *unlimited)
        async with serve_node(database_url, schema, "k1", log, *again):

            async def all_final() -> bool:
                rows = await db_fetch(
                    database_url,
                    schema,
                    "SELECT count(*) AS n FROM messages WHERE status = 'queued'",
                )
                return bool(rows[0]["n"] == 0)

            with trio.fail_after(60):
                await until(all_final, interval=0.1)
            assert await assert_rollups_exact(database_url, schema) == 270
            statuses = await db_fetch(
                database_url, schema, "SELECT DISTINCT status FROM message_rollups"
            )
            assert {"sent", "failed"} <= {r["status"] for r in statuses}, statuses
    assert_ledger_consistent(await ledger(database_url, schema))
