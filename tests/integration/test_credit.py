"""Prepaid credit over real HTTP and PostgreSQL: exact balances, 402, no overspend under a burst."""

from __future__ import annotations

import httpx
import trio

from smsgw.engine.retry import RetryPolicy
from smsgw.runtime.server import Node
from tests.conftest import admin
from tests.integration.helpers import (
    FLAKY,
    RELIABLE,
    assert_ledger_consistent,
    assert_problem,
    create_account,
    get_account,
    http_client,
    ledger,
    message_count,
    open_node,
    send,
    wait_all_final,
)

FAST_RETRY = RetryPolicy(backoff_base=0.02)
GSM_161 = "x" * 161  # one past a single GSM-7 SMS: two parts of at most 153
PERSIAN_71 = "س" * 71  # one past a single UCS-2 SMS: two parts of at most 67


async def burst(client: httpx.AsyncClient, key: str, count: int) -> list[httpx.Response]:
    """`count` sends at once, one task each."""
    responses: list[httpx.Response] = []

    async def one(i: int) -> None:
        responses.append(await send(client, key, f"burst {i}"))

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return responses


async def test_balance_is_exact_after_sent_and_failed(database_url: str, schema: str) -> None:
    async with (
        open_node(database_url, schema, FLAKY, retry=FAST_RETRY) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 1_000)
        key = account["api_key"]
        ids = []
        for i in range(40):
            r = await send(client, key, f"message {i}")
            assert r.status_code == 202, r.text
            assert r.json()["price"] == 5
            ids.append(r.json()["id"])
        finals = await wait_all_final(client, key, ids)
        sent = sum(1 for m in finals if m["status"] == "sent")
        failed = sum(1 for m in finals if m["status"] == "failed")
        # The seeded operator refuses about a third: both branches of the ledger are exercised.
        assert sent > 0 and failed > 0, (sent, failed)
        assert sent + failed == 40

        me = await get_account(client, key)
        assert me["held"] == 0
        assert me["balance"] == 1_000 - 5 * sent

        accounts = await ledger(database_url, schema)
        assert_ledger_consistent(accounts)
        row = accounts[account["id"]]
        assert (row["captured"], row["held"], row["topped_up"]) == (5 * sent, 0, 1_000)
        assert (row["n_sent"], row["n_failed"], row["n_pending"]) == (sent, failed, 0)
        assert row["l_release"] == 5 * failed


async def test_prices_by_segments_and_lane(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        key = account["api_key"]
        cases = [
            ({"text": "hi"}, 1, 5),
            ({"text": "hi", "express": True}, 1, 7),
            ({"text": "x" * 160}, 1, 5),
            ({"text": GSM_161}, 2, 10),
            ({"text": GSM_161, "express": True}, 2, 14),
            ({"text": "س" * 70}, 1, 5),
            ({"text": PERSIAN_71}, 2, 10),
            ({"text": "€" * 80}, 1, 5),  # 160 septets: each extension character takes two
            ({"text": "€" * 81}, 2, 10),
        ]
        ids = []
        for fields, segments, price in cases:
            r = await send(client, key, **fields)
            assert r.status_code == 202, r.text
            assert (r.json()["segments"], r.json()["price"]) == (segments, price), fields
            ids.append(r.json()["id"])
        finals = await wait_all_final(client, key, ids)
        spent = sum(m["price"] for m in finals if m["status"] == "sent")
        assert [m["price"] for m in finals] == [price for _, _, price in cases]
        me = await get_account(client, key)
        assert (me["balance"], me["held"]) == (1_000 - spent, 0)
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_402_once_the_balance_is_spent(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 10)
        key = account["api_key"]
        for _ in range(2):
            r = await send(client, key)
            assert r.status_code == 202, r.text
        problem = assert_problem(await send(client, key), 402)
        assert problem["code"] == "insufficient_credit" and problem["price"] == 5
        assert await message_count(database_url, schema) == 2
        # An express message costs more than a normal one: 7 is refused on a balance of 5.
        topped = await client.post(
            f"/v1/accounts/{account['id']}/topups",
            json={"amount": 5},
            headers=admin(),
        )
        assert topped.status_code == 200, topped.text
        assert_problem(await send(client, key, express=True), 402)
        assert (await send(client, key)).status_code == 202
        assert await message_count(database_url, schema) == 3


async def test_402_reports_the_balance(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        key = (await create_account(client, 12))["api_key"]
        assert (await send(client, key)).status_code == 202
        assert (await send(client, key)).status_code == 202
        problem = assert_problem(await send(client, key), 402)
        assert (problem["price"], problem["balance"]) == (5, 2)


async def test_concurrent_burst_never_overspends(database_url: str, schema: str) -> None:
    # Credit for exactly 20 messages; the operator takes all, so no refund frees credit.
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 100)
        key = account["api_key"]
        responses = await burst(client, key, 60)
        codes = sorted(r.status_code for r in responses)
        assert codes.count(202) == 20 and codes.count(402) == 40, codes
        for r in responses:
            if r.status_code == 402:
                assert_problem(r, 402)

        # Straight after the burst: all 100 is held or captured, none is left or lost.
        row = (await ledger(database_url, schema))[account["id"]]
        assert row["balance"] == 0
        assert row["balance"] + row["held"] + row["captured"] == 100
        assert row["n_all"] == 20

        ids = [r.json()["id"] for r in responses if r.status_code == 202]
        finals = await wait_all_final(client, key, ids)
        failed = sum(1 for m in finals if m["status"] == "failed")
        me = await get_account(client, key)
        assert me["held"] == 0
        assert me["balance"] == 5 * failed
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_concurrent_burst_with_refunds(database_url: str, schema: str) -> None:
    # With refunds, a failed message's credit may pay for a later one in the same burst; what
    # must hold is that no more is ever spent than the account had.
    async with (
        open_node(database_url, schema, FLAKY, retry=FAST_RETRY) as node,
        http_client(node.url) as client,
    ):
        account = await create_account(client, 100)
        key = account["api_key"]
        responses = await burst(client, key, 60)
        accepted = [r.json()["id"] for r in responses if r.status_code == 202]
        assert all(r.status_code in (202, 402) for r in responses)
        # A 402 means the balance was below 5, so 100 was held or captured: 20 accepted by then.
        assert len(accepted) >= 20
        finals = await wait_all_final(client, key, accepted)
        sent = sum(1 for m in finals if m["status"] == "sent")
        assert sent <= 20
        me = await get_account(client, key)
        assert (me["balance"], me["held"]) == (100 - 5 * sent, 0)
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_accounts_do_not_share_credit(node: Node, database_url: str, schema: str) -> None:
    async with http_client(node.url) as client:
        rich = await create_account(client, 1_000, "rich")
        poor = await create_account(client, 5, "poor")
        assert (await send(client, poor["api_key"])).status_code == 202
        assert_problem(await send(client, poor["api_key"]), 402)
        assert (await send(client, rich["api_key"])).status_code == 202
        assert_ledger_consistent(await ledger(database_url, schema))
