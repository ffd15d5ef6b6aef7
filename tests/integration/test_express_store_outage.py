"""Issue 29: a `"wait": true` express send is answered by its deadline even while the store
cannot commit (PostgreSQL down, restarting, or a commit stuck on a lock): from what the
operator told this node, or as a 504 that never turns into a late send."""

from __future__ import annotations

import threading

import httpx
import trio

from smsgw.sim.operator import OperatorProfile
from tests.conftest import bearer
from tests.integration.helpers import (
    TO,
    assert_ledger_consistent,
    create_account,
    db_fetch,
    http_client,
    ledger,
    open_node,
    until,
)
from tests.integration.test_commit_doubt import hold_account_lock

# Slow enough that the test can lock the account between the accept's commit and the
# outcome's; well inside the 2 s express deadline.
SLOW = OperatorProfile(
    name="sim", latency_ms_median=300.0, latency_ms_p99=350.0, p_temporary=0.0, p_permanent=0.0
)
# Longer than the deadline and the grace after it, shorter than the writer's commit timeout.
HOLD_S = 5.0


async def status_of(database_url: str, schema: str, message_id: str) -> str | None:
    rows = await db_fetch(
        database_url, schema, "SELECT status FROM messages WHERE id = $1::uuid", message_id
    )
    return str(rows[0]["status"]) if rows else None


async def test_the_operators_answer_is_given_on_time_while_its_commit_waits(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, SLOW) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        key, account_id = account["api_key"], account["id"]
        answers: list[httpx.Response] = []
        locked, release = threading.Event(), threading.Event()
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                body = {"to": TO, "text": "otp 1234", "express": True, "wait": True}
                answers.append(
                    await client.post("/v1/messages", json=body, headers=bearer(key), timeout=30)
                )

            nursery.start_soon(send)

            async def stored() -> bool:
                rows = await db_fetch(database_url, schema, "SELECT count(*) AS n FROM messages")
                return int(rows[0]["n"]) == 1

            await until(stored)  # committed and at the operator (300 ms)
            nursery.start_soon(hold_account_lock, database_url, schema, account_id, locked, release)
            try:
                await trio.to_thread.run_sync(locked.wait)
                # The outcome's commit needs the account's row: it waits past the deadline
                # and the grace. The answer does not.
                with trio.fail_after(HOLD_S):
                    await until(lambda: answered(answers))
            finally:
                release.set()
        [answer] = answers
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "sent"
        message_id = answer.json()["id"]

        async def committed() -> bool:
            return await status_of(database_url, schema, message_id) == "sent"

        with trio.fail_after(30):
            await until(committed)
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    assert accounts[account_id]["captured"] == answer.json()["price"]


async def test_an_accept_that_cannot_commit_by_the_deadline_is_a_504_never_a_late_send(
    database_url: str, schema: str
) -> None:
    async with open_node(database_url, schema, SLOW) as node, http_client(node.url) as client:
        account = await create_account(client, 1_000)
        key, account_id = account["api_key"], account["id"]
        locked, release = threading.Event(), threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_account_lock, database_url, schema, account_id, locked, release)
            try:
                await trio.to_thread.run_sync(locked.wait)
                body = {"to": TO, "text": "otp 5678", "express": True, "wait": True}
                with trio.fail_after(HOLD_S):
                    answer = await client.post(
                        "/v1/messages", json=body, headers=bearer(key), timeout=30
                    )
            finally:
                release.set()
        assert answer.status_code == 504, answer.text
        problem = answer.json()
        assert problem["code"] == "deadline_exceeded"
        message_id = problem["message_id"]

        # The group commit went through once the lock was gone: the message is stored, past
        # its deadline, so it is failed and refunded, not sent.
        async def final() -> bool:
            return await status_of(database_url, schema, message_id) in ("failed", "sent")

        with trio.fail_after(30):
            await until(final)
        assert await status_of(database_url, schema, message_id) == "failed"
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    assert accounts[account_id]["captured"] == 0
    assert accounts[account_id]["balance"] == 1_000


async def answered(answers: list[httpx.Response]) -> bool:
    await trio.lowlevel.checkpoint()
    return bool(answers)
