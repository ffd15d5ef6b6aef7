"""The account statement (issue 24), over real HTTP and PostgreSQL: every top-up, hold, capture
and release, message by message, newest first, each with the balance after it; it adds up to
the balance across pages, pages stay put while the account keeps moving, another account's
entries never show, a bad cursor or limit is a 422. Below: the rows written before migration
015, and the plan for an account with a million entries."""

from __future__ import annotations

import base64
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import WriteGroup
from smsgw.sim.operator import OperatorProfile
from smsgw.storage.database import Database, asyncio_loop
from smsgw.storage.migrate import migrate, migration_files
from smsgw.storage.pg import PgStore
from smsgw.storage.statement import NEWEST, STATEMENT_PAGE
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    RELIABLE,
    TO,
    assert_ledger_consistent,
    assert_problem,
    create_account,
    db_fetch,
    get_account,
    http_client,
    ledger,
    open_database,
    open_node,
    outbound,
    send,
    wait_final,
)
from tests.integration.test_plans import (
    execute,
    explain,
    nodes,
    one_line,
    one_session,
    rows_read,
)

# Every attempt fails for now: a bulk message is retried until its validity is up (`expired`),
# an express one until its deadline (`failed`), each refunded.
REFUSING = OperatorProfile(
    name="sim", latency_ms_median=1.0, latency_ms_p99=5.0, p_temporary=1.0, p_permanent=0.0
)
EFFECT = {"topup": 1, "hold": -1, "capture": 0, "release": 1}


async def statement(client: httpx.AsyncClient, key: str, limit: int = 100) -> list[list[dict]]:
    """The whole statement, page by page."""
    pages: list[list[dict]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        r = await client.get("/v1/account/statement", params=params, headers=bearer(key))
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def assert_adds_up(entries: list[dict], balance: int) -> None:
    """Newest first: the newest entry's balance is the account's; each entry's balance less
    its effect is the next (older) entry's; the oldest's less its effect is 0."""
    assert entries, "an empty statement"
    assert entries[0]["balance_after"] == balance, entries[0]
    for newer, older in itertools.pairwise(entries):
        before = newer["balance_after"] - EFFECT[newer["kind"]] * newer["amount"]
        assert before == older["balance_after"], (newer, older)
    oldest = entries[-1]
    assert oldest["balance_after"] - EFFECT[oldest["kind"]] * oldest["amount"] == 0, oldest
    assert all(e["balance_after"] >= 0 and e["amount"] > 0 for e in entries), entries
    assert [e["at"] for e in entries] == sorted((e["at"] for e in entries), reverse=True)


def moves(entries: list[dict]) -> dict[str, list[tuple[str, int]]]:
    """message id -> its (kind, amount) entries, oldest first."""
    found: dict[str, list[tuple[str, int]]] = {}
    for e in reversed(entries):
        if e["message_id"] is not None:
            found.setdefault(e["message_id"], []).append((e["kind"], e["amount"]))
    return found


async def test_a_statement_lists_every_move_and_adds_up_to_the_balance(
    database_url: str, schema: str
) -> None:
    """Top-ups; messages sent (normal, two segments, express, at the account's own price, a
    batch), failed, cancelled and expired; one still queued. Each has its hold at the price
    its 202 said, then its capture or release; walked 2 entries a page it is the same as in
    one page, and adds up to the balance."""
    prices: dict[str, int] = {}
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        other = await create_account(c, 1_000, name="other")
        key = account["api_key"]
        sent: list[str] = []
        for fields in ({}, {"text": "x" * 200}, {"express": True}):
            r = await send(c, key, **fields)
            assert r.status_code == 202, r.text
            prices[r.json()["id"]] = r.json()["price"]
            sent.append(r.json()["id"])
        r = await c.put(
            f"/v1/accounts/{account['id']}/settings",
            json={"price_per_segment": 3},
            headers=admin(),
        )
        assert r.status_code == 200, r.text
        items = [{"to": TO, "text": "y" * n} for n in (10, 200, 400)]
        r = await c.post("/v1/messages/batch", json={"messages": items}, headers=bearer(key))
        assert r.status_code == 202, r.text
        for result in r.json()["results"]:
            prices[result["id"]] = result["price"]
            sent.append(result["id"])
        assert sorted(prices[i] for i in sent[3:]) == [3, 6, 9]  # the account's own price
        r = await client_topup(c, account["id"], 500)
        for message_id in sent:
            assert (await wait_final(c, key, message_id))["status"] == "sent"
        assert (await send(c, other["api_key"])).status_code == 202

        # Two messages held back (a send rate of one message now and then, and a suspension):
        # one cancelled; the other left queued, to expire below.
        r = await c.put(
            f"/v1/accounts/{account['id']}/settings",
            json={"price_per_segment": 3, "send_rate": 0.01},
            headers=admin(),
        )
        assert r.status_code == 200, r.text
        waiting = []
        for _ in range(3):
            r = await send(c, key, validity=60)
            assert r.status_code == 202, r.text
            prices[r.json()["id"]] = r.json()["price"]
            waiting.append(r.json()["id"])
        r = await c.post(f"/v1/accounts/{account['id']}/suspend", headers=admin())
        assert r.status_code == 200, r.text
        queued = []
        for message_id in waiting:
            got = await c.get(f"/v1/messages/{message_id}", headers=bearer(key))
            if got.json()["status"] == "queued":
                queued.append(message_id)
        assert len(queued) >= 2, waiting  # a burst of one message goes at once
        cancelled, expiring = queued[-1], queued[-2]
        r = await c.post(f"/v1/messages/{cancelled}/cancel", headers=bearer(key))
        assert r.status_code == 200, r.text

    # Past its validity while the node was down: the next node expires it at dispatch.
    await db_fetch(
        database_url,
        schema,
        "UPDATE messages SET created_at = created_at - interval '10 minutes' WHERE id = $1",
        expiring,
    )
    async with open_node(database_url, schema, REFUSING) as node, http_client(node.url) as c:
        r = await c.put(f"/v1/accounts/{account['id']}/settings", json={}, headers=admin())
        assert r.status_code == 200, r.text
        r = await c.post(f"/v1/accounts/{account['id']}/resume", headers=admin())
        assert r.status_code == 200, r.text
        assert (await wait_final(c, key, expiring))["status"] == "expired"
        r = await send(c, key, express=True)
        assert r.status_code == 202, r.text
        failed = r.json()["id"]
        prices[failed] = r.json()["price"]
        assert (await wait_final(c, key, failed))["status"] == "failed"
        statuses = {m: (await wait_final(c, key, m))["status"] for m in prices}

        balance = (await get_account(c, key))["balance"]
        pages = await statement(c, key, limit=2)
        entries = [e for page in pages for e in page]
        assert all(len(page) == 2 for page in pages[:-1]) and 1 <= len(pages[-1]) <= 2
        assert entries == (await statement(c, key, limit=1_000))[0]
        assert_adds_up(entries, balance)

        topups = [e for e in entries if e["kind"] == "topup"]
        assert [(e["amount"], e["message_id"]) for e in topups] == [(500, None), (1_000, None)]
        found = moves(entries)
        assert set(found) == set(prices)  # its own messages, every one
        for message_id, price in prices.items():
            status = statuses[message_id]
            then = {
                "sent": [("capture", price)],
                "failed": [("release", price)],
                "expired": [("release", price)],
                "cancelled": [("release", price)],
            }.get(status, [])
            assert found[message_id] == [("hold", price), *then], (message_id, status)
        assert statuses[cancelled] == "cancelled" and statuses[expiring] == "expired"

        # The other account's statement is its own.
        theirs = (await statement(c, other["api_key"]))[0]
        assert len(moves(theirs)) == 1 and not set(moves(theirs)) & set(prices)
        assert_adds_up(theirs, (await get_account(c, other["api_key"]))["balance"])
    assert_ledger_consistent(await ledger(database_url, schema))


async def client_topup(c: httpx.AsyncClient, account_id: int, amount: int) -> httpx.Response:
    r = await c.post(f"/v1/accounts/{account_id}/topups", json={"amount": amount}, headers=admin())
    assert r.status_code == 200, r.text
    return r


async def test_pages_stay_put_while_the_account_moves(database_url: str, schema: str) -> None:
    """A walk begun before more sends and a top-up goes on exactly where it stopped: what was
    committed meanwhile comes before its first page, never between its pages."""
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 10_000)
        key = account["api_key"]
        for _ in range(4):
            r = await send(c, key)
            assert r.status_code == 202, r.text
            await wait_final(c, key, r.json()["id"])
        before = (await statement(c, key, limit=1_000))[0]
        r = await c.get("/v1/account/statement", params={"limit": 3}, headers=bearer(key))
        first = r.json()
        assert first["items"] == before[:3]
        for _ in range(3):
            r = await send(c, key)
            assert r.status_code == 202, r.text
            await wait_final(c, key, r.json()["id"])
        await client_topup(c, account["id"], 7)
        rest: list[dict] = []
        cursor = first["next_cursor"]
        while cursor is not None:
            r = await c.get(
                "/v1/account/statement", params={"limit": 3, "cursor": cursor}, headers=bearer(key)
            )
            rest += r.json()["items"]
            cursor = r.json()["next_cursor"]
        assert rest == before[3:]
        now = (await statement(c, key, limit=1_000))[0]
        assert now[len(now) - len(before) :] == before
        assert now[0]["kind"] == "topup" and now[0]["amount"] == 7
        assert_adds_up(now, (await get_account(c, key))["balance"])


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_bad_cursors_and_limits_are_422_and_a_cursor_shows_only_ones_own(
    client: httpx.AsyncClient,
) -> None:
    mine = await create_account(client, 1_000)
    theirs = await create_account(client, 2_000, name="other")
    key = mine["api_key"]
    for _ in range(3):
        assert (await send(client, theirs["api_key"])).status_code == 202
    url = "/v1/account/statement"
    bad = ["nope", "", cursor_of("0.1"), cursor_of("1.0"), cursor_of("1"), cursor_of("-1.1")]
    bad += [cursor_of(f"{2**63}.1"), cursor_of(f"1.{2**31}"), cursor_of("01.1"), "%%%"]
    for cursor in bad:
        problem = assert_problem(
            await client.get(url, params={"cursor": cursor}, headers=bearer(key)), 422
        )
        assert problem["code"] == "invalid_cursor" and problem["field"] == "cursor", cursor
    for limit in ("0", "1001", "x", "-1"):
        assert_problem(await client.get(url, params={"limit": limit}, headers=bearer(key)), 422)
    assert_problem(await client.get(url), 401)
    assert_problem(await client.get(url, headers=admin()), 403)

    # The other account's cursor, and a cursor past everything, show this account's entries
    # only (its top-up is older than any of the other's rows).
    r = await client.get(url, params={"limit": 1}, headers=bearer(theirs["api_key"]))
    their_cursor = r.json()["next_cursor"]
    assert their_cursor is not None
    for cursor in (their_cursor, cursor_of(f"{2**63 - 1}.1")):
        r = await client.get(url, params={"cursor": cursor}, headers=bearer(key))
        assert r.status_code == 200, r.text
        assert [(e["kind"], e["amount"]) for e in r.json()["items"]] == [("topup", 1_000)]
    r = await client.get(url, headers=bearer(key))
    assert r.json() == {
        "items": [
            {
                "kind": "topup",
                "amount": 1_000,
                "balance_after": 1_000,
                "message_id": None,
                "at": r.json()["items"][0]["at"],
            }
        ],
        "next_cursor": None,
    }


# --- the store, called directly ---------------------------------------------------------------


def _batch(account_id: int, prices: list[int]) -> list[OutboundSms]:
    return [outbound(account_id, p) for p in prices]


async def test_one_group_of_many_messages_splits_across_pages(
    database_url: str, schema: str
) -> None:
    """A batch's hold is one ledger row; its entries page one by one, each with its own
    balance, in the order the row applied them."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        create = WriteGroup()
        create.creates.append(("acme", 1_000, b"k" * 32))
        [account] = (await store.commit_group(create)).creates
        batch = _batch(account.id, [5, 10, 15, 20, 25, 30, 35])
        group = WriteGroup()
        group.accepts.append((batch, False))
        await store.commit_group(group)
        entries = []
        before = None
        while True:
            page = await store.statement(account.id, before, 3)
            entries += page
            if len(page) < 3:
                break
            before = page[-1].position
    ordered = sorted(batch, key=lambda s: s.id)  # a row applies its messages in id order
    assert [(e.kind, e.message_id, e.amount) for e in entries] == [
        *[("hold", s.id, s.price) for s in reversed(ordered)],
        ("topup", None, 1_000),
    ]
    balances = [e.balance_after for e in entries]
    expected = [1_000 - 140]
    for s in reversed(ordered):
        expected.append(expected[-1] + s.price)
    assert balances == expected
    assert len({e.position for e in entries}) == len(entries)


async def test_rows_written_before_the_statement_get_their_balances(
    database_url: str, schema: str
) -> None:
    """Migration 015 on a ledger of the old form: each row's balance is summed in id order,
    a group's row is one entry without a message id, and new rows carry on from it."""
    async with open_database_at(database_url, schema, 14) as db:
        await execute(
            db,
            "INSERT INTO accounts (name, key_hash, balance, held, captured, topped_up)"
            " VALUES ('old', '\\x01', 80, 5, 15, 100)",
        )
        for kind, amount, n in (("topup", 100, 0), ("hold", 25, 3), ("capture", 15, 2)):
            await execute(
                db,
                "INSERT INTO credit_ledger (account_id, kind, amount, messages)"
                " SELECT id, $1, $2, $3 FROM accounts",
                kind,
                amount,
                n,
            )
        await execute(
            db,
            "INSERT INTO credit_ledger (account_id, kind, amount, messages)"
            " SELECT id, 'release', 5, 1 FROM accounts",
        )
        await migrate(db)
        store = PgStore(db)
        [account_id] = [r["id"] for r in await db.run(lambda c: c.fetch("SELECT id FROM accounts"))]
        group = WriteGroup()
        group.accepts.append(([outbound(account_id, 10)], False))
        await store.commit_group(group)
        entries = await store.statement(account_id, None, 100)
    assert [(e.kind, e.amount, e.balance_after, e.message_id is None) for e in entries] == [
        ("hold", 10, 70, False),
        ("release", 5, 80, True),
        ("capture", 15, 75, True),
        ("hold", 25, 75, True),
        ("topup", 100, 100, True),
    ]


@asynccontextmanager
async def open_database_at(database_url: str, schema: str, version: int) -> AsyncIterator[Database]:
    """A Database in `schema` with the migrations up to `version` only, applied as migrate()
    applies them."""
    async with asyncio_loop():
        db = await Database.open(database_url, schema=schema)
        try:

            async def build(conn: Any) -> None:
                await conn.execute(
                    "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                for number, name, sql in migration_files():
                    if number <= version:
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            number,
                            name,
                        )

            await db.run(build)
            yield db
        finally:
            await db.close()


# --- the plan for an account with a million entries ------------------------------------------

ROWS = 22_000  # ledger rows: half the account's (every 11th of them a batch of 1,000), half others'
BATCH = 1_000
LIMIT = 1_000  # the largest page

_LEDGER = f"""
INSERT INTO credit_ledger (account_id, kind, amount, messages, balance_after, message_ids, prices)
SELECT k.account_id, 'hold', 5 * k.n, k.n, 0,
       ARRAY(SELECT gen_random_uuid() FROM generate_series(1, k.n)), array_fill(5, ARRAY[k.n])
FROM generate_series(1, {ROWS}) i
CROSS JOIN LATERAL (SELECT CASE WHEN i % 2 = 0 THEN 1 ELSE 2 + i % 19 END AS account_id,
                           CASE WHEN i % 22 = 0 THEN {BATCH} ELSE 1 END AS n) k
"""


def unrolled(plan: dict[str, Any]) -> int:
    """Entries the run plan unrolled from ledger rows' arrays, over all loops."""
    return sum(
        node["Actual Rows"] * node["Actual Loops"]
        for node in nodes(plan)
        if node["Node Type"] == "Function Scan" and node.get("Function Name") == "unnest"
    )


async def test_a_page_reads_only_its_own_rows_of_a_million_entries(
    database_url: str, schema: str
) -> None:
    """An account with 1,010,000 entries among others' rows: the first page and pages deep in
    it (inside a batch's row, among single messages) walk credit_ledger_statement from their
    position and unroll only the rows that hold their entries."""
    async with one_session(database_url, schema) as db:
        await execute(
            db,
            "INSERT INTO accounts (name, key_hash, balance, topped_up)"
            " SELECT 'a' || i, sha256(('k' || i)::bytea), 0, 0 FROM generate_series(1, 20) i",
        )
        await execute(db, _LEDGER)
        await execute(db, "ANALYZE credit_ledger")
        batches = await db.run(
            lambda c: c.fetch(
                "SELECT id FROM credit_ledger WHERE account_id = 1 AND messages = $1 ORDER BY id",
                BATCH,
            )
        )
        assert len(batches) == ROWS // 22
        middle = batches[len(batches) // 2]["id"]
        positions = {
            "first page": NEWEST,
            "inside a batch": (middle, BATCH // 2),
            "among single messages": (middle - 2, 1),
            "at a batch's first entry": (middle, 1),
        }
        for name, (row, place) in positions.items():
            args = [1, row, place, LIMIT + 1]
            plan = await explain(db, STATEMENT_PAGE, args, run=True)
            scans = {
                node.get("Index Name", node["Node Type"])
                for node in nodes(plan)
                if node.get("Relation Name") == "credit_ledger"
            }
            assert scans <= {"credit_ledger_statement", "credit_ledger_pkey"}, (
                name,
                one_line(plan),
            )
            assert plan["Actual Rows"] == LIMIT + 1, (name, one_line(plan))
            # The rows walked (at most one more than the page's entries), then each fetched
            # again by its id for its arrays: none of the other accounts' rows between them.
            assert rows_read(plan, "credit_ledger") <= 2 * (LIMIT + 2), (name, one_line(plan))
            # The page's entries, and at most the rest of a batch at either end.
            assert unrolled(plan) <= LIMIT + 1 + 2 * BATCH, (name, unrolled(plan))
            page = await db.run(lambda c, a=args: c.fetch(STATEMENT_PAGE, *a))
            assert all(r["id"] < row or r["place"] < place for r in page), name
            keys = [(r["id"], r["place"]) for r in page]
            assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys), name
