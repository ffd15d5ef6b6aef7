"""A message's history (GET /v1/messages/{id}/events) over real HTTP and PostgreSQL: each
attempt, the send, the receipt and each callback delivery in order; `sent_at` and
`delivered_at`; nothing written twice for an outcome delivered twice; the order kept across a
node restart and a takeover of the message's shard."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import msgspec
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from smsgw.engine.messages import (
    Account,
    Attempt,
    DeliveryReport,
    OutboundSms,
    Outcome,
    SendResult,
)
from smsgw.engine.ports import Provider, WriteGroup, shard_of
from smsgw.engine.retry import RetryPolicy
from smsgw.runtime.server import Node, run_node
from smsgw.sim.operator import OperatorProfile, SimulatedOperator
from smsgw.storage.cluster import PgCluster
from smsgw.storage.commit import Handoff
from smsgw.storage.pg import PgStore
from tests.conftest import DLR_KEY, bearer, node_options
from tests.integration.helpers import (
    assert_problem,
    create_account,
    db_fetch,
    open_database,
    outbound,
    send,
    until,
    wait_final,
)
from tests.integration.test_callbacks import FAST, Receiver


@asynccontextmanager
async def node_with(
    database_url: str, schema: str, operator: Provider, **engine: object
) -> AsyncIterator[tuple[Receiver, httpx.AsyncClient]]:
    """A node sending through `operator` (its outage can be switched at run time) with quick
    callback retries, and a callback receiver that refuses each status's first POST."""
    receiver = Receiver(fail_first=1)
    config = HyperConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    options = node_options(database_url, schema, callbacks=FAST, **engine)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, receiver, config))  # type: ignore[arg-type]
        receiver.url = binds[0]
        node: Node = await nursery.start(partial(run_node, options, [(operator, 1)]))
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as client:
            yield receiver, client
        node.stop.set()
        await node.http_done.wait()
        nursery.cancel_scope.cancel()


def simulated(name: str = "sim") -> SimulatedOperator:
    return SimulatedOperator(
        OperatorProfile(
            name=name, latency_ms_median=2.0, latency_ms_p99=10.0, p_temporary=0.0, p_permanent=0.0
        )
    )


class FailsFirstAttempt:
    """An operator that fails each message's first attempt for now, then sends as `inner`."""

    def __init__(self, inner: SimulatedOperator) -> None:
        self.inner = inner
        self.tried: set[str] = set()

    @property
    def name(self) -> str:
        return self.inner.name

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        first = [s for s in batch if s.id not in self.tried]
        self.tried.update(s.id for s in first)
        again = [s for s in batch if s not in first]
        sent = iter(await self.inner.send_batch(again) if again else [])
        unavailable = SendResult("temporary", reason="operator_unavailable")
        return [unavailable if s in first else next(sent) for s in batch]


async def events(client: httpx.AsyncClient, key: str, message_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/messages/{message_id}/events", headers=bearer(key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message_id"] == message_id
    history: list[dict[str, Any]] = body["events"]
    times = [datetime.fromisoformat(e["at"]) for e in history]
    assert times == sorted(times), history
    return history


def without_times(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "at"} for e in history]


async def stored_attempts(database_url: str, schema: str, message_id: str) -> int:
    rows = await db_fetch(
        database_url, schema, "SELECT attempts FROM messages WHERE id = $1::uuid", message_id
    )
    return int(rows[0]["attempts"])


async def test_a_retry_a_send_a_receipt_and_callbacks_come_back_in_order(
    database_url: str, schema: str
) -> None:
    # The operator fails the first attempt for now; the retry is sent.
    async with node_with(database_url, schema, FailsFirstAttempt(simulated())) as (
        receiver,
        client,
    ):
        account = await create_account(client, 1_000)
        key = account["api_key"]
        r = await send(client, key, "history", callback_url=receiver.url + "/cb")
        assert r.status_code == 202, r.text
        message_id = r.json()["id"]
        sent = await wait_final(client, key, message_id)
        assert sent["status"] == "sent" and sent["attempts"] == 2
        assert sent["sent_at"] is not None and sent["delivered_at"] is None
        assert sent["sent_at"] == sent["updated_at"]

        # The `sent` callback is refused once, then taken (and that recorded); only then the
        # receipt.
        async def taken(status: str) -> bool:
            return any(
                e["type"] == "callback" and e["status"] == status and e.get("http_status") == 204
                for e in await events(client, key, message_id)
            )

        with trio.fail_after(30):
            await until(lambda: taken("sent"))
        r = await client.post(
            "/v1/dlr/sim",
            json={
                "reports": [
                    {"operator_message_id": sent["operator_message_id"], "status": "delivered"}
                ]
            },
            headers=bearer(DLR_KEY),
        )
        assert r.status_code == 200 and r.json()["results"][0]["result"] == "applied", r.text
        with trio.fail_after(30):
            await until(lambda: taken("delivered"))

        history = await events(client, key, message_id)
        delivery = {
            json.loads(r.body)["status"]: int(r.headers["webhook-id"]) for r in receiver.received
        }
        assert without_times(history) == [
            {"type": "accepted"},
            {
                "type": "attempt",
                "attempt": 1,
                "operator": "sim",
                "result": "temporary",
                "reason": "operator_unavailable",
            },
            {"type": "attempt", "attempt": 2, "operator": "sim", "result": "sent"},
            {"type": "sent", "operator": "sim", "operator_message_id": sent["operator_message_id"]},
            {
                "type": "callback",
                "delivery_id": delivery["sent"],
                "status": "sent",
                "attempt": 1,
                "http_status": 500,
                "error": "http_500",
            },
            {
                "type": "callback",
                "delivery_id": delivery["sent"],
                "status": "sent",
                "attempt": 2,
                "http_status": 204,
            },
            {"type": "receipt", "status": "delivered"},
            {
                "type": "callback",
                "delivery_id": delivery["delivered"],
                "status": "delivered",
                "attempt": 1,
                "http_status": 500,
                "error": "http_500",
            },
            {
                "type": "callback",
                "delivery_id": delivery["delivered"],
                "status": "delivered",
                "attempt": 2,
                "http_status": 204,
            },
        ]
        assert delivery["sent"] != delivery["delivered"]
        assert history[0]["at"] == sent["created_at"]
        assert history[2]["at"] == history[3]["at"] == sent["sent_at"]

        # sent_at and delivered_at: on the message, the list and the export's last columns.
        r = await client.get(f"/v1/messages/{message_id}", headers=bearer(key))
        message = r.json()
        assert message["status"] == "delivered"
        assert message["sent_at"] == sent["sent_at"]
        assert message["delivered_at"] == history[6]["at"]
        r = await client.get("/v1/messages", headers=bearer(key))
        [listed] = r.json()["items"]
        assert (listed["sent_at"], listed["delivered_at"]) == (
            message["sent_at"],
            message["delivered_at"],
        )
        r = await client.get("/v1/messages/export", headers=bearer(key))
        header, row = list(csv.reader(io.StringIO(r.text)))
        assert header[-3:] == ["send_at", "sent_at", "delivered_at"]
        assert row[-3] == ""
        exported = [datetime.fromisoformat(t) for t in row[-2:]]
        assert exported == [
            datetime.fromisoformat(message["sent_at"]),
            datetime.fromisoformat(message["delivered_at"]),
        ]

        # Another account's key, an unknown id and a malformed one: 404, as GET of the message.
        other = (await create_account(client, 100, name="other"))["api_key"]
        r = await client.get(f"/v1/messages/{message_id}/events", headers=bearer(other))
        assert assert_problem(r, 404)["code"] == "message_not_found"
        unknown = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
        r = await client.get(f"/v1/messages/{unknown}/events", headers=bearer(key))
        assert assert_problem(r, 404)["code"] == "message_not_found"
        r = await client.get("/v1/messages/nope/events", headers=bearer(key))
        assert assert_problem(r, 404)["code"] == "message_not_found"
        r = await client.get(f"/v1/messages/{message_id}/events")
        assert r.status_code == 401


async def _attempted(database_url: str, schema: str, message_id: str) -> bool:
    return await stored_attempts(database_url, schema, message_id) >= 1


async def test_a_scheduled_message_and_a_cancel_show_in_its_history(
    database_url: str, schema: str
) -> None:
    async with node_with(database_url, schema, simulated()) as (_, client):
        key = (await create_account(client, 1_000))["api_key"]
        later = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
        r = await send(client, key, "later", send_at=later.isoformat())
        assert r.status_code == 202, r.text
        message_id = r.json()["id"]
        r = await client.post(f"/v1/messages/{message_id}/cancel", headers=bearer(key))
        assert r.status_code == 200, r.text
        history = await events(client, key, message_id)
        assert [e["type"] for e in history] == ["accepted", "scheduled", "cancelled"]
        assert datetime.fromisoformat(history[1]["send_at"]) == later
        assert history[0]["at"] == history[1]["at"]
        # A second cancel changes nothing, and writes nothing.
        r = await client.post(f"/v1/messages/{message_id}/cancel", headers=bearer(key))
        assert r.status_code == 409
        assert len(await events(client, key, message_id)) == 3


def _sent(message: OutboundSms, fence: int | None, attempts: int, at: float) -> Outcome:
    return Outcome(
        sms=msgspec.structs.replace(message, fence=fence, attempts=attempts),
        status="sent",
        operator="op",
        operator_message_id=f"op-{attempts}",
        reason=None,
        attempts=attempts,
        at=at,
        attempt="sent",
    )


def _failed_for_now(message: OutboundSms, fence: int | None, attempts: int, at: float) -> Attempt:
    return Attempt(
        msgspec.structs.replace(message, fence=fence, attempts=attempts), "op", "busy", at
    )


async def _history(database_url: str, schema: str, message_id: str) -> list[tuple[Any, ...]]:
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT type, attempt, result, operator_message_id, extract(epoch FROM at) AS at"
        " FROM message_events WHERE message_id = $1::uuid ORDER BY at, seq",
        message_id,
    )
    return [(r["type"], r["attempt"], r["result"], r["operator_message_id"]) for r in rows]


async def test_an_outcome_or_attempt_delivered_twice_adds_no_event(
    database_url: str, schema: str
) -> None:
    """Both ways a group commits (one statement; the exact way, taken here by a group with a
    top-up): what finds its row already changed writes nothing."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        group = WriteGroup()
        group.creates.append(("acme", 100, b"k" * 32))
        [account] = (await store.commit_group(group)).creates
        assert isinstance(account, Account)
        one, two = outbound(account.id), outbound(account.id)
        group = WriteGroup()
        group.accepts.append(((one, two), False))
        await store.commit_group(group)

        for exact in (False, True, False, True):
            group = WriteGroup()
            group.attempts += [_failed_for_now(m, None, 1, 1.7e9 + 1) for m in (one, two)]
            group.outcomes.append(_sent(one, None, 2, 1.7e9 + 2))
            if exact:
                group.topups.append((account.id, 1))
            await store.commit_group(group)
        # Two attempts of one message in one group, then its outcome: each recorded once.
        group = WriteGroup()
        group.attempts += [_failed_for_now(two, None, n, 1.7e9 + 1 + n) for n in (2, 3, 2)]
        group.outcomes.append(_sent(two, None, 4, 1.7e9 + 5))
        await store.commit_group(group)
        group = WriteGroup()
        group.outcomes.append(_sent(two, None, 4, 1.7e9 + 5))
        await store.commit_group(group)

    assert await _history(database_url, schema, one.id) == [
        ("attempt", 1, "temporary", None),
        ("attempt", 2, "sent", None),
        ("sent", None, None, "op-2"),
    ]
    assert await _history(database_url, schema, two.id) == [
        ("attempt", 1, "temporary", None),
        ("attempt", 2, "temporary", None),
        ("attempt", 3, "temporary", None),
        ("attempt", 4, "sent", None),
        ("sent", None, None, "op-4"),
    ]
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT attempts, extract(epoch FROM sent_at) AS sent_at FROM messages WHERE id = $1::uuid",
        two.id,
    )
    assert rows == [{"attempts": 4, "sent_at": 1.7e9 + 5}]


async def test_a_callback_attempt_settled_twice_adds_one_event(
    database_url: str, schema: str
) -> None:
    """A settle done again (its first commit's answer lost) writes no second row."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        group = WriteGroup()
        group.creates.append(("acme", 100, b"k" * 32))
        [account] = (await store.commit_group(group)).creates
        assert isinstance(account, Account)
        message = msgspec.structs.replace(
            outbound(account.id), callback_url="https://example.com/cb"
        )
        group = WriteGroup()
        group.accepts.append(((message,), False))
        await store.commit_group(group)
        group = WriteGroup()
        group.outcomes.append(_sent(message, None, 1, 1.7e9 + 1))
        await store.commit_group(group)

        [job] = await store.claim_callbacks(10, 30.0)
        for _ in range(2):
            await store.settle_callbacks([], [(job.id, 0.0, "timeout")], [])
        [again] = await store.claim_callbacks(10, 30.0)  # due at once: its delay was 0
        assert again.attempts == 2
        for _ in range(2):
            await store.settle_callbacks([(job.id, 204)], [], [])

    rows = await db_fetch(
        database_url,
        schema,
        "SELECT type, delivery_id, status, attempt, http_status, error FROM message_events"
        " WHERE message_id = $1::uuid AND type = 'callback' ORDER BY at, seq",
        message.id,
    )
    assert rows == [
        {
            "type": "callback",
            "delivery_id": job.id,
            "status": "sent",
            "attempt": 1,
            "http_status": None,
            "error": "timeout",
        },
        {
            "type": "callback",
            "delivery_id": job.id,
            "status": "sent",
            "attempt": 2,
            "http_status": 204,
            "error": None,
        },
    ]


async def test_a_receipt_before_its_send_shows_after_the_send(
    database_url: str, schema: str
) -> None:
    """A DLR that overtakes its message's `sent` is kept, then applied by the reconciler: its
    receipt event comes after the send, with delivered_at, once."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        group = WriteGroup()
        group.creates.append(("acme", 100, b"k" * 32))
        [account] = (await store.commit_group(group)).creates
        assert isinstance(account, Account)
        message = outbound(account.id)
        group = WriteGroup()
        group.accepts.append(((message,), False))
        await store.commit_group(group)
        early = WriteGroup()
        early.deliveries.append(("op", (DeliveryReport("op-1", "delivered"),)))
        [[answer]] = (await store.commit_group(early)).deliveries
        assert answer.result == "unknown"
        group = WriteGroup()
        group.outcomes.append(_sent(message, None, 1, 1.7e9 + 1))
        await store.commit_group(group)
        assert await store.reconcile_deliveries(3_600.0, 100) == 1
        assert await store.reconcile_deliveries(3_600.0, 100) == 0

    assert await _history(database_url, schema, message.id) == [
        ("attempt", 1, "sent", None),
        ("sent", None, None, "op-1"),
        ("receipt", None, None, None),
    ]
    [row] = await db_fetch(
        database_url,
        schema,
        "SELECT status, delivered_at IS NOT NULL AS delivered FROM messages WHERE id = $1::uuid",
        message.id,
    )
    assert row == {"status": "delivered", "delivered": True}


async def test_the_history_keeps_its_order_across_a_takeover(
    database_url: str, schema: str
) -> None:
    """Node A tries a message under its lease, B takes the shard over and sends it; A's late
    writes under its old token land nowhere. The history is A's attempt, then B's."""
    async with open_database(database_url, schema) as db:
        a = PgCluster(db, database_url, "a")
        b = PgCluster(db, database_url, "b")
        await a.join(3.0)
        await b.join(3.0)
        store = PgStore(db, handoff=Handoff("a", a.lock_class, a.channel))
        group = WriteGroup()
        group.creates.append(("acme", 100, b"k" * 32))
        [account] = (await store.commit_group(group)).creates
        assert isinstance(account, Account)
        shard = shard_of(account.id)
        old = (await a.acquire(256, 3.0))[shard]
        message = outbound(account.id)
        group = WriteGroup()
        group.accepts.append(((message,), True))
        await store.commit_group(group)

        group = WriteGroup()
        group.attempts.append(_failed_for_now(message, old, 1, 1.7e9 + 1))
        await store.commit_group(group)

        await a.release([shard])
        new = (await b.acquire(1, 3.0))[shard]
        # A, late: a second attempt and a send under its old token change nothing.
        group = WriteGroup()
        group.attempts.append(_failed_for_now(message, old, 2, 1.7e9 + 2))
        group.outcomes.append(_sent(message, old, 3, 1.7e9 + 3))
        await store.commit_group(group)
        # B goes on from the stored count: its attempt is the second.
        stored = await stored_attempts(database_url, schema, message.id)
        assert stored == 1
        group = WriteGroup()
        group.outcomes.append(_sent(message, new, stored + 1, 1.7e9 + 4))
        await store.commit_group(group)

    assert await _history(database_url, schema, message.id) == [
        ("attempt", 1, "temporary", None),
        ("attempt", 2, "sent", None),
        ("sent", None, None, "op-2"),
    ]


async def test_the_history_keeps_its_order_across_a_node_restart(
    database_url: str, schema: str
) -> None:
    """A node tries a message while its operator is down and stops; the next node on the
    database recovers it, goes on counting its attempts and sends it."""
    down = simulated()
    down.outage = "errors"
    # Tries enough that the message cannot fail on this node before it stops.
    patient = RetryPolicy(max_attempts=100)
    async with node_with(database_url, schema, down, retry=patient) as (_, client):
        key = (await create_account(client, 1_000))["api_key"]
        message_id = (await send(client, key, "restart")).json()["id"]
        with trio.fail_after(30):
            await until(lambda: _attempted(database_url, schema, message_id))
    before = await stored_attempts(database_url, schema, message_id)
    async with node_with(database_url, schema, simulated()) as (_, client):
        sent = await wait_final(client, key, message_id)
        assert sent["status"] == "sent"
        history = await events(client, key, message_id)
    tried = [e for e in history if e["type"] == "attempt"]
    assert [e["attempt"] for e in tried] == list(range(1, before + 2))
    assert [e["result"] for e in tried] == ["temporary"] * before + ["sent"]
    assert [e["type"] for e in history] == ["accepted", *["attempt"] * (before + 1), "sent"]
    assert sent["attempts"] == before + 1


async def test_the_history_keeps_its_order_when_another_node_takes_the_shard_over(
    database_url: str, schema: str
) -> None:
    """Node A's operator is down: A tries the message and keeps it. Node B joins and A
    stops; B takes A's shards over, recovers the message and sends it through its own
    operator. The history has A's attempts, then B's, numbered on."""
    down = simulated("down")
    down.outage = "errors"
    options = node_options(database_url, schema)
    async with trio.open_nursery() as nursery:
        # Tries enough that the message cannot fail on A before A stops.
        patient = node_options(database_url, schema, retry=RetryPolicy(max_attempts=100))
        a: Node = await nursery.start(
            partial(run_node, msgspec.structs.replace(patient, node_id="a"), [(down, 1)])
        )
        async with httpx.AsyncClient(base_url=a.url, timeout=30) as client:
            key = (await create_account(client, 1_000))["api_key"]
            message_id = (await send(client, key, "takeover")).json()["id"]
            with trio.fail_after(30):
                await until(lambda: _attempted(database_url, schema, message_id))
        b: Node = await nursery.start(
            partial(run_node, msgspec.structs.replace(options, node_id="b"), [(simulated("up"), 1)])
        )
        a.stop.set()
        await a.http_done.wait()
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as client:
            sent = await wait_final(client, key, message_id)
            history = await events(client, key, message_id)
        b.stop.set()
    assert sent["status"] == "sent" and sent["operator"] == "up"
    tried = [e for e in history if e["type"] == "attempt"]
    n = len(tried)
    assert n >= 2 and sent["attempts"] == n
    assert [e["attempt"] for e in tried] == list(range(1, n + 1))
    assert [(e["operator"], e["result"]) for e in tried] == [("down", "temporary")] * (n - 1) + [
        ("up", "sent")
    ]
    assert [e["type"] for e in history] == ["accepted", *["attempt"] * n, "sent"]
