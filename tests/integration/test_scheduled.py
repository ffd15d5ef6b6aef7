"""Scheduled sends (issue 24), over real HTTP and PostgreSQL: a message with a `send_at` is
`scheduled`, its price held at accept, sent at (never before) its time, cancellable until
then on any node, kept across a SIGKILL, and counted by the reports and the ledger; a bad
`send_at` is a 422 naming the field, with nothing stored or held."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from smsgw.client import Accepted, AsyncClient, OutgoingMessage
from smsgw.engine.ports import shard_of
from smsgw.engine.scheduled import ScheduledConfig
from smsgw.storage.ledger import broken_identities
from tests.conftest import ADMIN_KEY, admin, bearer
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
    send,
    wait_all_final,
    wait_final,
)
from tests.integration.nodes import Member, balanced_nodes, leases_of, serve_node


def at(seconds: float) -> datetime:
    """`seconds` from now, UTC."""
    return datetime.now(UTC) + timedelta(seconds=seconds)


def rfc3339(when: datetime) -> str:
    return when.isoformat()


async def sent_at(database_url: str, schema: str, ids: list[str]) -> dict[str, datetime]:
    """When each message's outcome was recorded (`updated_at` of its final row)."""
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT id::text AS id, updated_at FROM messages WHERE id = ANY($1::uuid[])",
        ids,
    )
    return {r["id"]: r["updated_at"] for r in rows}


def pending_ledger(accounts: dict[int, dict[str, int]]) -> None:
    """The identities that hold while messages are still pending (scheduled ones held)."""
    for account_id, a in accounts.items():
        assert not broken_identities(a, final=False), (account_id, a)


async def test_a_scheduled_message_waits_then_is_sent(database_url: str, schema: str) -> None:
    """202 `scheduled`, the price held at once; GET, the list and the summary show it
    `scheduled` with its `send_at`; it is sent after its time, not before."""
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        key = account["api_key"]
        when = at(3)
        r = await send(c, key, send_at=rfc3339(when))
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "scheduled", r.text
        message_id = r.json()["id"]
        assert (await get_account(c, key))["balance"] == 1_000 - 5  # held at accept

        shown = (await c.get(f"/v1/messages/{message_id}", headers=bearer(key))).json()
        assert shown["status"] == "scheduled", shown
        assert abs(datetime.fromisoformat(shown["send_at"]) - when) < timedelta(milliseconds=1)
        listed = await c.get("/v1/messages", params={"status": "scheduled"}, headers=bearer(key))
        assert [m["id"] for m in listed.json()["items"]] == [message_id], listed.text
        summary = await c.get("/v1/reports/summary?group_by=status", headers=bearer(key))
        totals = summary.json()["totals"]
        assert (totals["scheduled"], totals["pending"], totals["held"]) == (1, 1, 5), totals
        pending_ledger(await ledger(database_url, schema))
        # Not in the node's memory: nothing of it waits in the Scheduler.
        assert node.engine.scheduler.figures.bulk_waiting == 0

        final = await wait_final(c, key, message_id)
        assert final["status"] == "sent", final
        assert datetime.fromisoformat(final["updated_at"]) >= when
        assert datetime.fromisoformat(final["send_at"]) <= datetime.fromisoformat(
            final["updated_at"]
        )
        assert node.engine.scheduled.promoted == 1
        assert (await get_account(c, key))["balance"] == 1_000 - 5
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_express_deadline_counts_from_send_at(database_url: str, schema: str) -> None:
    """An express message scheduled 3 s ahead with the default 2 s deadline is sent after its
    send_at: counted from the accept, its deadline would have failed it."""
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        key = account["api_key"]
        when = at(3)
        r = await send(c, key, express=True, send_at=rfc3339(when))
        assert r.status_code == 202 and r.json()["status"] == "scheduled", r.text
        final = await wait_final(c, key, r.json()["id"])
        assert final["status"] == "sent", final
        assert datetime.fromisoformat(final["updated_at"]) >= when
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_bad_send_at_is_422_naming_the_field(database_url: str, schema: str) -> None:
    """Past by more than a minute, more than 30 days ahead, without an offset, not a time, or
    with `wait`/`otp`: 422 naming `send_at`, nothing stored or held. Up to a minute past is
    sent now (`queued`)."""
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        key = account["api_key"]
        naive = at(60).replace(tzinfo=None).isoformat()
        bad: list[dict[str, Any]] = [
            {"send_at": rfc3339(at(-120))},
            {"send_at": rfc3339(at(31 * 86_400))},
            {"send_at": naive},
            {"send_at": "tomorrow at nine"},
            {"send_at": "2030-01-01"},
            {"send_at": 1_900_000_000},
            {"send_at": rfc3339(at(60)), "express": True, "wait": True},
        ]
        for fields in bad:
            problem = assert_problem(await send(c, key, **fields), 422)
            assert problem["field"] == "send_at", (fields, problem)
            assert "send_at" in problem["detail"], problem
        r = await c.post(
            "/v1/messages",
            json={"to": TO, "otp": True, "send_at": rfc3339(at(60))},
            headers=bearer(key),
        )
        assert assert_problem(r, 422)["field"] == "send_at"
        # A batch's own send_at, bad: the whole batch is refused.
        r = await c.post(
            "/v1/messages/batch",
            json={"messages": [{"to": TO, "text": "a"}], "send_at": rfc3339(at(-3600))},
            headers=bearer(key),
        )
        assert assert_problem(r, 422)["field"] == "send_at"
        r = await c.post(
            "/v1/messages/batch",
            json={"messages": [{"to": TO, "text": "a"}], "send_at": "nope"},
            headers=bearer(key),
        )
        assert assert_problem(r, 422)["field"] == "send_at"
        assert await message_count(database_url, schema) == 0
        assert (await get_account(c, key))["balance"] == 1_000

        # Clocks differ: up to a minute in the past is now.
        r = await send(c, key, send_at=rfc3339(at(-30)))
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        assert (await wait_final(c, key, r.json()["id"]))["status"] == "sent"
        # Exactly 30 days ahead is taken.
        r = await send(c, key, send_at=rfc3339(at(30 * 86_400 - 5)))
        assert r.status_code == 202 and r.json()["status"] == "scheduled", r.text
        assert node.engine.scheduled.promoted == 0
    pending_ledger(await ledger(database_url, schema))


async def test_cancel_a_scheduled_message(database_url: str, schema: str) -> None:
    """A scheduled message cancelled: 200 with the price refunded, `cancelled` for good,
    never sent at its time; a second cancel is a 409."""
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        key = account["api_key"]
        when = at(2)
        kept = await send(c, key, send_at=rfc3339(when))
        dropped = await send(c, key, text="never", send_at=rfc3339(when))
        assert kept.status_code == dropped.status_code == 202
        assert (await get_account(c, key))["balance"] == 1_000 - 10
        url = f"/v1/messages/{dropped.json()['id']}/cancel"
        r = await c.post(url, headers=bearer(key))
        assert r.status_code == 200, r.text
        assert r.json() == {"id": dropped.json()["id"], "status": "cancelled", "refunded": 5}
        assert (await get_account(c, key))["balance"] == 1_000 - 5
        problem = assert_problem(await c.post(url, headers=bearer(key)), 409)
        assert problem["message_status"] == "cancelled"

        assert (await wait_final(c, key, kept.json()["id"]))["status"] == "sent"
        await trio.sleep(1.0)  # time for a wrong promotion of the cancelled one to show
        shown = (await c.get(f"/v1/messages/{dropped.json()['id']}", headers=bearer(key))).json()
        assert shown["status"] == "cancelled" and shown["attempts"] == 0, shown
        assert node.engine.pool.counts["sent"] == 1
        assert node.engine.scheduled.promoted == 1
        assert (await get_account(c, key))["balance"] == 1_000 - 5
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_batch_send_at_for_the_batch_and_per_item(database_url: str, schema: str) -> None:
    """The batch's `send_at` applies to its items without one; an item's own wins; a bad item
    `send_at` rejects that item alone. Each accepted item is `scheduled` and sent after its
    own time."""
    async with open_node(database_url, schema, RELIABLE) as node, http_client(node.url) as c:
        account = await create_account(c, 1_000)
        key = account["api_key"]
        batch_at, item_at = at(2), at(4)
        body = {
            "send_at": rfc3339(batch_at),
            "messages": [
                {"to": TO, "text": "batch time"},
                {"to": TO, "text": "own time", "send_at": rfc3339(item_at)},
                {"to": TO, "text": "bad time", "send_at": rfc3339(at(-3600))},
                {"to": TO, "text": "batch time, express", "express": True},
            ],
        }
        r = await c.post("/v1/messages/batch", json=body, headers=bearer(key))
        assert r.status_code == 202, r.text
        answer = r.json()
        assert [x["status"] for x in answer["results"]] == [
            "scheduled",
            "scheduled",
            "rejected",
            "scheduled",
        ], answer
        assert (answer["accepted"], answer["rejected"]) == (3, 1), answer
        assert answer["results"][2]["error"]["field"] == "send_at", answer
        ids = [x["id"] for x in answer["results"] if x["status"] == "scheduled"]
        finals = await wait_all_final(c, key, ids)
        assert [f["status"] for f in finals] == ["sent"] * 3, finals
        times = await sent_at(database_url, schema, ids)
        assert times[ids[0]] >= batch_at and times[ids[2]] >= batch_at
        assert times[ids[1]] >= item_at
        assert node.engine.scheduled.promoted == 3
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_scheduled_messages_survive_a_sigkill(database_url: str, schema: str) -> None:
    """Messages scheduled on a node that is then killed (SIGKILL) are sent by the node
    started again after it, at their time; the credit adds up."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "node.log"
        # An operator that takes every message: each one is sent.
        reliable = ("--operator-errors", "0,0")
        async with serve_node(database_url, schema, "s1", log, *reliable) as first:
            async with http_client(first.url) as c:
                account = await create_account(c, 10_000)
                key = account["api_key"]
                when = at(6)
                body = {
                    "send_at": rfc3339(when),
                    # One number each: the hourly limit per number (20) holds here.
                    "messages": [{"to": f"+4915123456{i:03d}", "text": "hi"} for i in range(50)],
                }
                r = await c.post("/v1/messages/batch", json=body, headers=bearer(key))
                assert r.status_code == 202 and r.json()["accepted"] == 50, r.text
                ids = [x["id"] for x in r.json()["results"]]
            first.process.kill()
            await first.process.wait()
        async with (
            serve_node(database_url, schema, "s1", log, *reliable) as second,
            http_client(second.url) as c,
        ):
            finals = await wait_all_final(c, key, ids)
            assert {f["status"] for f in finals} == {"sent"}, finals
            times = await sent_at(database_url, schema, ids)
            assert min(times.values()) >= when
            assert (await get_account(c, key))["balance"] == 10_000 - 50 * 5
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_two_nodes_the_owner_promotes_any_node_cancels(
    database_url: str, schema: str
) -> None:
    """Two nodes: messages scheduled through the node that does not lease the account's
    shard are promoted and sent by the one that does; a scheduled message is cancelled by
    either node (no node holds it in memory), where a queued one is the dispatcher's."""
    async with balanced_nodes(database_url, schema, "p0", "p1") as members:
        first = members[0].client
        account = await create_account(first, 1_000)
        key, account_id = account["api_key"], account["id"]
        shard = shard_of(account_id)
        owns = []
        for member in members:
            leases = (await leases_of(member.client))["leases"]
            owns.append(any(lease["shard"] == shard for lease in leases))
        assert sorted(owns) == [False, True], owns
        owner = members[owns.index(True)].client
        other = members[owns.index(False)].client
        when = at(3)
        ids = []
        for text in ("one", "two", "three"):
            r = await send(other, key, text=text, send_at=rfc3339(when))
            assert r.status_code == 202 and r.json()["status"] == "scheduled", r.text
            ids.append(r.json()["id"])
        r = await other.post(f"/v1/messages/{ids[0]}/cancel", headers=bearer(key))
        assert r.status_code == 200, r.text
        r = await owner.post(f"/v1/messages/{ids[1]}/cancel", headers=bearer(key))
        assert r.status_code == 200, r.text
        finals = await wait_all_final(owner, key, ids)
        assert [f["status"] for f in finals] == ["cancelled", "cancelled", "sent"], finals
        times = await sent_at(database_url, schema, ids[2:])
        assert times[ids[2]] >= when
        promoted = await promoted_by(members)
        assert promoted == {members[owns.index(True)].node.node_id: 1}, promoted
        assert (await get_account(owner, key))["balance"] == 1_000 - 5
    assert_ledger_consistent(await ledger(database_url, schema))


async def promoted_by(members: list[Member]) -> dict[str, int]:
    """Scheduled messages each node promoted (its `scheduled_sends` figures), where any."""
    found = {}
    for member in members:
        r = await member.client.get("/v1/ops/supervisor", headers=admin())
        [child] = [c for c in r.json()["children"] if c["name"] == "scheduled_sends"]
        if child["stats"]["promoted"]:
            found[member.node.node_id] = child["stats"]["promoted"]
    return found


async def test_scheduled_sends_are_paged_not_held(database_url: str, schema: str) -> None:
    """2,000 messages of one account scheduled for one moment, sent at 400 a second, with the
    Scheduler's memory bounded at 300 entries and promotions of 100: the Scheduler never
    holds more in memory than its bound and one promotion (the rest wait in PostgreSQL,
    `scheduled`, until it has room), and every one is sent after its time. The account sends
    one message at once after scheduling them, so its paging cursor is past their accept
    time and a promoted one enters memory directly (no page would read it back): only the
    promotions' pace bounds memory here."""
    async with (
        open_node(
            database_url,
            schema,
            RELIABLE,
            scheduler_memory_bound=300,
            mailbox_bound=100,
            scheduled=ScheduledConfig(page=100, per_shard=100),
        ) as node,
        http_client(node.url) as c,
    ):
        account = await create_account(c, 100_000)
        key = account["api_key"]
        r = await c.put(
            f"/v1/accounts/{account['id']}/settings", json={"send_rate": 400}, headers=admin()
        )
        assert r.status_code == 200, r.text
        when = at(4)
        ids = []
        for start in range(0, 2_000, 1_000):
            body = {
                "send_at": rfc3339(when),
                "messages": [{"to": TO, "text": f"m{start + i}"} for i in range(1_000)],
            }
            r = await c.post("/v1/messages/batch", json=body, headers=bearer(key))
            assert r.status_code == 202 and r.json()["accepted"] == 1_000, r.text
            ids += [x["id"] for x in r.json()["results"]]
        r = await send(c, key, text="now")
        assert (await wait_final(c, key, r.json()["id"]))["status"] == "sent"
        scheduler = node.engine.scheduler
        most = 0
        with trio.fail_after(60):
            while node.engine.pool.counts["sent"] < 2_001:
                most = max(most, scheduler.state.in_memory)
                await trio.sleep(0.001)
        assert node.engine.scheduled.promoted == 2_000
        assert node.engine.scheduled.waits_for_room > 0  # it did wait for room
        assert most <= 300 + 100, most
        times = await sent_at(database_url, schema, ids)
        assert min(times.values()) >= when
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_the_client_schedules_and_cancels(database_url: str, schema: str) -> None:
    """smsgw.client: `send(send_at=...)` answers `scheduled`, the message shows its `send_at`
    (an aware datetime), a batch item takes one, and `cancel` refunds a scheduled one."""
    async with open_node(database_url, schema, RELIABLE) as node:
        async with AsyncClient(node.url, ADMIN_KEY) as admin_client:
            created = await admin_client.create_account("client", credit=1_000)
        async with AsyncClient(node.url, created.api_key) as sms:
            when = at(3_600)
            accepted = await sms.send(TO, "later", send_at=when)
            assert isinstance(accepted, Accepted) and accepted.status == "scheduled"
            got = await sms.get_message(accepted.id)
            assert got.status == "scheduled" and got.send_at is not None
            assert abs(got.send_at - when) < timedelta(milliseconds=1)
            batch = await sms.batch([OutgoingMessage(TO, "later too", send_at=when)])
            assert [r.status for r in batch.results] == ["scheduled"]
            summary = await sms.summary()
            assert (summary.totals.scheduled, summary.totals.held) == (2, 10)
            cancelled = await sms.cancel(accepted.id)
            assert (cancelled.status, cancelled.refunded) == ("cancelled", 5)
            assert (await sms.account()).balance == 1_000 - 5
    pending_ledger(await ledger(database_url, schema))
