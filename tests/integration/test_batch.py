"""POST /v1/messages/batch: per-item results, partial credit, atomic mode, limits."""

from __future__ import annotations

import random
from typing import Any

import httpx

from smsgw.engine.scheduler import micros
from smsgw.storage.pg import COPY_MIN_ROWS
from tests.conftest import bearer
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
    message_count,
    open_node,
    wait_all_final,
)


def items(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"to": TO, "text": f"message {i}", **extra} for i in range(n)]


async def post_batch(
    client: httpx.AsyncClient, key: str, messages: list[Any], **extra: Any
) -> httpx.Response:
    return await client.post(
        "/v1/messages/batch", json={"messages": messages, **extra}, headers=bearer(key)
    )


async def test_a_batch_is_accepted_item_by_item_in_order(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        r = await post_batch(client, account["api_key"], items(50))
        assert r.status_code == 202, r.text
        results = r.json()["results"]
        assert len(results) == 50
        assert all(x["status"] == "queued" and x["price"] == 5 for x in results)
        assert len({x["id"] for x in results}) == 50
        await wait_all_final(client, account["api_key"], [x["id"] for x in results])
        assert (await get_account(client, account["api_key"]))["balance"] == 1_000 - 250
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_credit_running_out_mid_batch_refuses_the_rest(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 5 * 7 + 3)  # 7 messages, 3 credit left over
        messages = items(10)
        messages[8]["text"] = "x"  # cheap enough to fit the rest, but the balance ran out first
        r = await post_batch(client, account["api_key"], messages)
        assert r.status_code == 202, r.text
        results = r.json()["results"]
        assert [x.get("status") for x in results[:7]] == ["queued"] * 7
        for index, refused in enumerate(results[7:], start=7):
            assert "id" not in refused
            assert refused["code"] == "insufficient_credit" and refused["index"] == index
            assert refused["status"] == 402
        assert await message_count(database_url, schema) == 7
        me = await get_account(client, account["api_key"])
        assert me["balance"] == 3  # held or captured: the 7 took exactly 35


async def test_invalid_items_get_their_own_problem_and_the_rest_go_through(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        messages: list[Any] = items(5)
        messages[1] = {"to": "12345", "text": "no plus"}
        messages[3] = {"to": TO, "text": "hi", "colour": "red"}
        messages.append("not an object")
        r = await post_batch(client, account["api_key"], messages)
        assert r.status_code == 202, r.text
        results = r.json()["results"]
        assert len(results) == 6
        assert [("id" in x) for x in results] == [True, False, True, False, True, False]
        assert results[1]["status"] == 422 and results[1]["field"] == "to"
        assert results[3]["status"] == 422 and "colour" in results[3]["detail"]
        assert results[5]["index"] == 5
        assert await message_count(database_url, schema) == 3
        me = await get_account(client, account["api_key"])
        assert me["balance"] == 1_000 - 15  # the three valid items, held or captured


async def test_atomic_batch_with_an_invalid_item_stores_and_holds_nothing(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        messages: list[Any] = items(4)
        messages[2] = {"to": TO, "text": ""}
        r = await post_batch(client, account["api_key"], messages, atomic=True)
        body = assert_problem(r, 422)
        assert body["code"] == "invalid_batch" and body["errors"][0]["index"] == 2
        assert await message_count(database_url, schema) == 0
        me = await get_account(client, account["api_key"])
        assert (me["balance"], me["held"]) == (1_000, 0)


async def test_atomic_batch_the_balance_cannot_cover_is_402_and_changes_nothing(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 49)  # 10 messages cost 50
        r = await post_batch(client, account["api_key"], items(10), atomic=True)
        body = assert_problem(r, 402)
        assert body["code"] == "insufficient_credit" and body["price"] == 50
        assert await message_count(database_url, schema) == 0
        me = await get_account(client, account["api_key"])
        assert (me["balance"], me["held"]) == (49, 0)
        r = await post_batch(client, account["api_key"], items(9), atomic=True)
        assert r.status_code == 202 and len(r.json()["results"]) == 9
        assert await message_count(database_url, schema) == 9


async def test_batch_limits(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000_000)
        body = assert_problem(await post_batch(client, account["api_key"], items(1_001)), 413)
        assert body["code"] == "batch_too_large" and "1001" in body["detail"]
        body = assert_problem(await post_batch(client, account["api_key"], []), 422)
        assert body["code"] == "empty_batch"
        r = await client.post(
            "/v1/messages/batch", json={"msgs": items(1)}, headers=bearer(account["api_key"])
        )
        assert_problem(r, 422)
        assert await message_count(database_url, schema) == 0
        # The largest allowed batch, with 10-segment texts (over 1 MiB), goes through whole.
        long_text = "a" * (153 * 10)
        r = await post_batch(client, account["api_key"], items(1_000, text=long_text))
        assert r.status_code == 202, r.text[:300]
        assert len(r.json()["results"]) == 1_000
        assert await message_count(database_url, schema) == 1_000


async def test_a_large_batch_goes_in_by_copy_and_a_taken_client_ref_still_gets_its_answer(
    database_url: str, schema: str
) -> None:
    # Batches of COPY_MIN_ROWS messages or more are written by COPY, which cannot skip a taken
    # client_ref: such a group is done again the INSERT way, with the same answers.
    assert COPY_MIN_ROWS <= 300
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000_000)
        key = account["api_key"]
        first = [{"to": TO, "text": f"m {i}", "client_ref": f"a-{i}"} for i in range(300)]
        r = await post_batch(client, key, first)
        assert r.status_code == 202, r.text[:300]
        assert all(x["status"] == "queued" for x in r.json()["results"])
        again = [{"to": TO, "text": f"n {i}", "client_ref": f"b-{i}"} for i in range(300)]
        again[123]["client_ref"] = "a-7"  # taken by the first batch
        r = await post_batch(client, key, again)
        assert r.status_code == 202, r.text[:300]
        results = r.json()["results"]
        assert results[123]["code"] == "duplicate_client_ref" and "id" not in results[123]
        assert sum(1 for x in results if x.get("status") == "queued") == 299
        assert await message_count(database_url, schema) == 599
        await wait_all_final(client, key, [x["id"] for x in results if "id" in x])
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_micros_is_the_microsecond_to_timestamp_stores(
    database_url: str, schema: str
) -> None:
    # The Scheduler's paging cursors compare stored times with micros(created_at), and COPY
    # rows carry it: it must be exactly what to_timestamp(created_at) stores.
    rng = random.Random(3)
    times = [1_790_000_000 + rng.random() * 1e6 for _ in range(2_000)] + [1.5e-6, 2.5e-6]
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT count(*) AS n FROM unnest($1::float8[], $2::bigint[]) AS x(t, us)"
        " WHERE to_timestamp(x.t) <> 'epoch'::timestamptz + x.us * interval '1 microsecond'",
        times,
        [micros(t) for t in times],
    )
    assert rows[0]["n"] == 0
