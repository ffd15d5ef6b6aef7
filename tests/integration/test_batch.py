"""POST /v1/messages/batch: per-item results, partial credit, duplicates, atomic mode, limits."""

from __future__ import annotations

import random
from typing import Any

import httpx

from smsgw.engine.ports import micros
from smsgw.storage.commit_sql import COPY_MIN_ROWS
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
        body = r.json()
        results = body["results"]
        assert (body["accepted"], body["duplicates"], body["rejected"]) == (50, 0, 0)
        assert [x["index"] for x in results] == list(range(50))
        assert all(x["status"] == "queued" and x["price"] == 5 for x in results)
        assert all(x["segments"] == 1 and "error" not in x for x in results)
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
        body = r.json()
        results = body["results"]
        assert (body["accepted"], body["rejected"]) == (7, 3)
        assert [x["status"] for x in results[:7]] == ["queued"] * 7
        for index, refused in enumerate(results[7:], start=7):
            assert "id" not in refused
            assert (refused["index"], refused["status"]) == (index, "rejected")
            error = refused["error"]
            assert (error["code"], error["status"], error["field"]) == (
                "insufficient_credit",
                402,
                None,
            )
            assert error["price"] == 5
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
        body = r.json()
        results = body["results"]
        assert len(results) == 6 and (body["accepted"], body["rejected"]) == (3, 3)
        assert [x["index"] for x in results] == list(range(6))
        assert [("id" in x) for x in results] == [True, False, True, False, True, False]
        assert [x["status"] for x in results] == ["queued", "rejected"] * 3
        assert results[1]["error"] == {
            "code": "invalid_field",
            "field": "to",
            "detail": results[1]["error"]["detail"],
            "status": 422,
        }
        assert results[3]["error"]["status"] == 422 and "colour" in results[3]["error"]["detail"]
        assert results[5]["error"]["code"]
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
        assert (body["accepted"], body["rejected"]) == (0, 4)
        codes = [x["error"]["code"] for x in body["results"]]
        assert codes == ["batch_rejected", "batch_rejected", "invalid_field", "batch_rejected"]
        assert body["results"][2]["error"]["field"] == "text"
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
        first_ids = [x["id"] for x in r.json()["results"]]
        again = [{"to": TO, "text": f"n {i}", "client_ref": f"b-{i}"} for i in range(300)]
        again[123]["client_ref"] = "a-7"  # taken by the first batch
        r = await post_batch(client, key, again)
        assert r.status_code == 202, r.text[:300]
        body = r.json()
        results = body["results"]
        # Reported as a single send answers it: the message that has that client_ref.
        assert results[123] == {"index": 123, "status": "duplicate", "id": first_ids[7]}
        assert (body["accepted"], body["duplicates"], body["rejected"]) == (299, 1, 0)
        assert await message_count(database_url, schema) == 599
        await wait_all_final(client, key, [x["id"] for x in results if "id" in x])
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_a_retried_batch_names_its_messages_and_stores_nothing_twice(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        key = account["api_key"]
        messages = [{"to": TO, "text": f"m {i}", "client_ref": f"order-{i}"} for i in range(3)]
        first = await post_batch(client, key, messages)
        assert first.status_code == 202, first.text
        ids = [x["id"] for x in first.json()["results"]]
        # The same batch again (its answer was lost, say): 200, nothing new, the same ids,
        # as a single send with a used client_ref answers 200 with that message.
        again = await post_batch(client, key, messages)
        assert again.status_code == 200, again.text
        body = again.json()
        assert (body["accepted"], body["duplicates"], body["rejected"]) == (0, 3, 0)
        assert [(x["index"], x["status"], x["id"]) for x in body["results"]] == [
            (i, "duplicate", ids[i]) for i in range(3)
        ]
        single = await client.post("/v1/messages", json=messages[1], headers=bearer(key))
        assert single.status_code == 200 and single.json()["id"] == ids[1]
        # Atomic: every client_ref taken is the same retry, 200; some taken is a 409.
        r = await post_batch(client, key, messages, atomic=True)
        assert r.status_code == 200 and [x["id"] for x in r.json()["results"]] == ids
        mixed = [*messages, {"to": TO, "text": "new", "client_ref": "order-9"}]
        body = assert_problem(await post_batch(client, key, mixed, atomic=True), 409)
        assert body["code"] == "duplicate_client_ref"
        assert await message_count(database_url, schema) == 3
        assert (await get_account(client, key))["balance"] == 1_000 - 15  # held or captured


async def test_a_batch_none_of_whose_items_is_accepted_is_a_422_with_every_result(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as client:
        account = await create_account(client, 7)  # one message, then the credit is gone
        key = account["api_key"]
        r = await post_batch(client, key, [{"to": "123", "text": "x"}, {"to": TO, "text": ""}])
        body = assert_problem(r, 422)
        assert body["code"] == "nothing_accepted"
        assert (body["accepted"], body["duplicates"], body["rejected"]) == (0, 0, 2)
        assert [x["error"]["field"] for x in body["results"]] == ["to", "text"]
        assert (await post_batch(client, key, items(1))).status_code == 202
        body = assert_problem(await post_batch(client, key, items(2)), 422)
        assert [x["error"]["code"] for x in body["results"]] == ["insufficient_credit"] * 2
        assert await message_count(database_url, schema) == 1


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
