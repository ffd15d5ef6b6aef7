"""Validity and cancel (issue 24), over real HTTP and PostgreSQL. A bulk message not sent
within its `validity` ends `expired`, refunded; POST /v1/messages/{id}/cancel cancels a
still-queued message (refunded, never sent) and answers 409 once it is sent or final, 404
for another account's."""

from __future__ import annotations

import trio

from smsgw.engine.ports import shard_of
from smsgw.engine.retry import RetryPolicy
from smsgw.sim.operator import OperatorProfile
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    RELIABLE,
    assert_ledger_consistent,
    assert_problem,
    create_account,
    get_account,
    http_client,
    ledger,
    open_node,
    send,
    wait_final,
)
from tests.integration.nodes import balanced_nodes, leases_of

# Every attempt fails for now: a message is retried until its time is up.
REFUSING = OperatorProfile(
    name="sim", latency_ms_median=1.0, latency_ms_p99=5.0, p_temporary=1.0, p_permanent=0.0
)


async def test_validity_bounds(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        key = account["api_key"]
        for validity in (59, 259_201, 0, "1h"):
            problem = assert_problem(await send(c, key, validity=validity), 422)
            assert "validity" in problem["detail"], problem
        problem = assert_problem(await send(c, key, validity=60, express=True), 422)
        assert problem["field"] == "validity", problem
        for validity in (60, 259_200):
            r = await send(c, key, validity=validity)
            assert r.status_code == 202, r.text
            assert (await wait_final(c, key, r.json()["id"]))["status"] == "sent"
        assert (await get_account(c, key))["balance"] == 1_000 - 2 * 5


async def test_message_past_its_validity_expires_refunded(database_url: str, schema: str) -> None:
    """The operator refuses every attempt for now; a message with a 60 s validity ends
    `expired` after about a minute, its hold released, while one with the default validity
    (24 h) is still queued, its hold kept."""
    retry = RetryPolicy(max_attempts=10_000, attempt_timeout=1.0, backoff_cap=2.0)
    async with (
        open_node(database_url, schema, REFUSING, retry=retry) as node,
        http_client(node.url) as c,
    ):
        account = await create_account(c, 1_000)
        key = account["api_key"]
        short = await send(c, key, validity=60)
        assert short.status_code == 202, short.text
        default = await send(c, key)
        assert default.status_code == 202, default.text
        with trio.fail_after(90):
            while True:
                r = await c.get(f"/v1/messages/{short.json()['id']}", headers=bearer(key))
                if r.json()["status"] not in ("queued", "sending"):
                    break
                await trio.sleep(0.2)
        ended = r.json()
        assert ended["status"] == "expired", ended
        assert ended["reason"], ended  # the last failure's reason
        r = await c.get(f"/v1/messages/{default.json()['id']}", headers=bearer(key))
        assert r.json()["status"] in ("queued", "sending"), r.text
        assert (await get_account(c, key))["balance"] == 1_000 - 5  # only the pending one held
        summary = await c.get("/v1/reports/summary?group_by=status", headers=bearer(key))
        assert summary.status_code == 200, summary.text
        assert summary.json()["totals"]["expired"] == 1, summary.text
        assert summary.json()["totals"]["failed"] == 1, summary.text
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_cancel_queued_message(database_url: str, schema: str) -> None:
    """A suspended account's queued message is cancelled: 200, refunded; after the account
    resumes, the rest are sent and the cancelled one never is."""
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        other = await create_account(c, 1_000, name="other")
        key = account["api_key"]
        # Slow dispatch, then a suspension: the messages wait queued, in the Scheduler's
        # memory with their bodies.
        r = await c.put(
            f"/v1/accounts/{account['id']}/settings", json={"send_rate": 0.01}, headers=admin()
        )
        assert r.status_code == 200, r.text
        ids = []
        for _ in range(3):
            r = await send(c, key)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        r = await c.post(f"/v1/accounts/{account['id']}/suspend", headers=admin())
        assert r.status_code == 200, r.text
        target = ids[-1]
        assert (await c.get(f"/v1/messages/{target}", headers=bearer(key))).json()[
            "status"
        ] == "queued"

        # Another account's key, an unknown id, a malformed one: 404, nothing changed.
        url = f"/v1/messages/{target}/cancel"
        assert_problem(await c.post(url, headers=bearer(other["api_key"])), 404)
        unknown = "01900000-0000-7000-8000-000000000000"
        assert_problem(await c.post(f"/v1/messages/{unknown}/cancel", headers=bearer(key)), 404)
        assert_problem(await c.post("/v1/messages/nope/cancel", headers=bearer(key)), 404)

        before = (await get_account(c, key))["balance"]
        r = await c.post(url, headers=bearer(key))
        assert r.status_code == 200, r.text
        assert r.json() == {"id": target, "status": "cancelled", "refunded": 5}
        assert (await get_account(c, key))["balance"] == before + 5
        problem = assert_problem(await c.post(url, headers=bearer(key)), 409)
        assert problem["code"] == "not_cancellable"
        assert problem["message_status"] == "cancelled"

        # Resumed and unpaced: the others go out; the cancelled one never does.
        r = await c.post(f"/v1/accounts/{account['id']}/resume", headers=admin())
        assert r.status_code == 200, r.text
        r = await c.put(f"/v1/accounts/{account['id']}/settings", json={}, headers=admin())
        assert r.status_code == 200, r.text
        for message_id in ids[:-1]:
            assert (await wait_final(c, key, message_id))["status"] == "sent"
        await trio.sleep(1.0)  # time for a wrong send of the cancelled one to be recorded
        shown = (await c.get(f"/v1/messages/{target}", headers=bearer(key))).json()
        assert shown["status"] == "cancelled" and shown["attempts"] == 0, shown
        assert node.engine.pool.counts["sent"] == 2
        assert node.engine.cancels.state(target) == "cancelled"

        # A sent message: 409 with its status.
        problem = assert_problem(
            await c.post(f"/v1/messages/{ids[0]}/cancel", headers=bearer(key)), 409
        )
        assert problem["message_status"] == "sent", problem
        assert (await get_account(c, key))["balance"] == 1_000 - 2 * 5
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_cancel_races_dispatch(database_url: str, schema: str) -> None:
    """Cancels sent while messages are dispatched: each message ends either cancelled
    (refunded, never attempted) or sent (charged), never both, and the ledger holds."""
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 10_000)
        key = account["api_key"]
        ids = []
        for _ in range(40):
            r = await send(c, key)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        answers = {}

        async def cancel(message_id: str) -> None:
            r = await c.post(f"/v1/messages/{message_id}/cancel", headers=bearer(key))
            assert r.status_code in (200, 409), r.text
            answers[message_id] = r.status_code

        async with trio.open_nursery() as nursery:
            for message_id in ids:
                nursery.start_soon(cancel, message_id)
        cancelled = 0
        for message_id in ids:
            row = await wait_final(c, key, message_id)
            if answers[message_id] == 200:
                assert row["status"] == "cancelled" and row["attempts"] == 0, row
                cancelled += 1
            else:
                assert row["status"] == "sent", row
        assert node.engine.pool.counts["sent"] == len(ids) - cancelled
        assert (await get_account(c, key))["balance"] == 10_000 - 5 * (len(ids) - cancelled)
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_only_the_dispatching_node_cancels(database_url: str, schema: str) -> None:
    """Two nodes: the one that does not dispatch the account's messages answers a cancel with
    503 `cancel_elsewhere` (and closes the connection, so a retry may land elsewhere), changing
    nothing; the dispatching node cancels. Only the dispatcher's pool can hold a message back,
    so a cancel decided elsewhere could race a send there."""
    async with balanced_nodes(database_url, schema, "c0", "c1") as members:
        first = members[0].client
        account = await create_account(first, 1_000)
        key, account_id = account["api_key"], account["id"]
        # A send rate of one message a hundred seconds: the second message waits queued.
        r = await first.put(
            f"/v1/accounts/{account_id}/settings", json={"send_rate": 0.01}, headers=admin()
        )
        assert r.status_code == 200, r.text
        for _ in range(2):
            r = await send(first, key)
            assert r.status_code == 202, r.text
        message_id = r.json()["id"]
        held = (await get_account(first, key))["balance"]
        shard = shard_of(account_id)
        owners = []
        for member in members:
            leases = (await leases_of(member.client))["leases"]
            owners.append(any(lease["shard"] == shard for lease in leases))
        assert sorted(owners) == [False, True], owners
        owner = members[owners.index(True)].client
        other = members[owners.index(False)].client
        path = f"/v1/messages/{message_id}/cancel"
        r = await other.post(path, headers=bearer(key))
        problem = assert_problem(r, 503)
        assert problem["code"] == "cancel_elsewhere", problem
        assert r.headers["retry-after"] == "1"
        assert r.headers.get("connection") == "close"
        assert (await get_account(first, key))["balance"] == held  # nothing changed
        r = await owner.post(path, headers=bearer(key))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
        assert (await get_account(first, key))["balance"] == held + r.json()["refunded"]
    assert_ledger_consistent(await ledger(database_url, schema))
