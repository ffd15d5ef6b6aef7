"""The store's group commit on PostgreSQL, called directly: the one-statement way
(commit_sql.one_statement) and the transaction it falls back to leave exactly the same state."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import pytest
import trio
import trio.testing

from smsgw.engine.messages import Account, OutboundSms, Outcome
from smsgw.engine.ports import GroupResult, Notices, WriteGroup
from smsgw.http.context import uuid7
from smsgw.storage import commit
from smsgw.storage.announce import HandoffAnnouncer
from smsgw.storage.cluster import PgCluster
from smsgw.storage.commit import Handoff
from smsgw.storage.database import Database, bridge
from smsgw.storage.payloads import owner_channel
from smsgw.storage.pg import PgStore
from tests.integration.helpers import (
    assert_ledger_consistent,
    assert_rollups_exact,
    db_fetch,
    ledger,
    open_database,
    outbound,
    store_account,
)


class ExactStore(PgStore):
    """Every group the transaction way."""

    def _one_statement(self, group: WriteGroup, copy: bool) -> bool:
        return False


def outcome(sms: OutboundSms, status: str) -> Outcome:
    return Outcome(
        sms=sms,
        status="sent" if status == "sent" else "failed",
        operator="op",
        operator_message_id=None,
        reason=None if status == "sent" else "rejected",
        attempts=1,
        at=1.7e9 + 1,
    )


def answers(result: GroupResult) -> list[list[tuple[bool, str | None]]]:
    """What the callers hear of their accepts (the balance of an accepted one is not told)."""
    return [[(r.accepted, r.reason) for r in results] for results in result.accepts]


class Twin:
    """One side of the comparison: a store, its accounts and its messages not final yet."""

    def __init__(self, store: PgStore, accounts: list[Account]) -> None:
        self.store = store
        self.accounts = accounts
        self.pending: list[OutboundSms] = []


def random_group(
    rng: random.Random, twins: tuple[Twin, Twin]
) -> tuple[WriteGroup, WriteGroup, list[list[OutboundSms]]]:
    """The same random work for both twins (each on its own accounts): single accepts and
    batches (some atomic), client_refs that repeat, outcomes for pending messages (a few
    twice), now and then a top-up. Returns the groups and each side's accepted candidates."""
    groups = (WriteGroup(), WriteGroup())
    items: list[list[OutboundSms]] = [[], []]
    for _ in range(rng.randint(0, 12)):
        size = 1 if rng.random() < 0.7 else rng.randint(2, 5)
        atomic = rng.random() < 0.5
        picks = [
            (rng.randrange(3), rng.choice((5, 5, 10, 35)), rng.choice((None, None, "r1", "r2")))
            for _ in range(size)
        ]
        picks = [(a, p, ref and f"{ref}-{rng.randrange(4)}") for a, p, ref in picks]
        for side, twin in enumerate(twins):
            batch = [outbound(twin.accounts[a].id, p, ref) for a, p, ref in picks]
            groups[side].accepts.append((batch, atomic))
            items[side].extend(batch)
    pending = len(twins[0].pending)
    for i in sorted(rng.sample(range(pending), min(pending, rng.randint(0, 6)))):
        status = rng.choice(("sent", "sent", "failed"))
        for side, twin in enumerate(twins):
            groups[side].outcomes.append(outcome(twin.pending[i], status))
            if rng.random() < 0.1:  # delivered twice (a retry after a lost answer)
                groups[side].outcomes.append(outcome(twin.pending[i], status))
    if rng.random() < 0.1:
        a, amount = rng.randrange(3), rng.choice((5, 50))
        for side, twin in enumerate(twins):
            groups[side].topups.append((twin.accounts[a].id, amount))
    return groups[0], groups[1], items


@pytest.mark.parametrize(("seed", "cluster"), [(1, False), (2, False), (3, True), (4, True)])
async def test_one_statement_and_the_transaction_leave_the_same_state(
    database_url: str, schema: str, seed: int, cluster: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random groups, the same on both sides; with `cluster`, on a node that leases no shard,
    so every message is handed off (to nobody yet)."""
    used = {"one": 0, "fallback": 0}
    commit_one = PgStore._commit_one

    async def counted(*args: Any) -> GroupResult | None:
        done = await commit_one(*args)
        used["one" if done is not None else "fallback"] += 1
        return done

    monkeypatch.setattr(PgStore, "_commit_one", counted)
    rng = random.Random(seed)
    candidates: tuple[list[str], list[str]] = ([], [])
    async with open_database(database_url, schema) as db:
        handoff = None
        if cluster:
            node = PgCluster(db, database_url, "a")
            await node.join(3.0)
            handoff = Handoff("a", node.lock_class, node.channel)
        twins: list[Twin] = []
        stores = (PgStore(db, handoff=handoff), ExactStore(db, handoff=handoff))
        for side, store in enumerate(stores):
            create = WriteGroup()
            create.creates += [(f"{side}-{i}", 60, bytes([side, i]) * 16) for i in range(3)]
            twins.append(Twin(store, (await store.commit_group(create)).creates))
        # Callbacks for the first account of each side, so outcomes write outbox rows.
        for twin in twins:
            await db.run(
                lambda conn, t=twin: conn.execute(
                    "UPDATE accounts SET callback_url = 'http://127.0.0.1:9/cb' WHERE id = $1",
                    t.accounts[0].id,
                )
            )
        fast, exact = twins
        for _ in range(80):
            group_fast, group_exact, items = random_group(rng, (fast, exact))
            got_fast = await fast.store.commit_group(group_fast)
            got_exact = await exact.store.commit_group(group_exact)
            assert answers(got_fast) == answers(got_exact)
            assert got_fast.topups == got_exact.topups
            for side, (twin, result, group) in enumerate(
                ((fast, got_fast, group_fast), (exact, got_exact, group_exact))
            ):
                done = {o.sms.id for o in group.outcomes}
                twin.pending = [s for s in twin.pending if s.id not in done]
                accepted = [r.accepted for results in result.accepts for r in results]
                twin.pending += [s for s, ok in zip(items[side], accepted, strict=True) if ok]
                candidates[side].extend(s.id for s in items[side])

    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    for a, b in zip(fast.accounts, exact.accounts, strict=True):
        assert {**accounts[a.id], "id": 0} == {**accounts[b.id], "id": 0}
    # The same ledger rows, in the same order, with the same balances and prices (a row's
    # messages are in id order, and each side's ids are its own).
    rows = await db_fetch(
        database_url,
        schema,
        "SELECT account_id, kind, amount, messages, balance_after, prices, message_ids"
        " FROM credit_ledger ORDER BY id",
    )

    def statement_rows(account_id: int) -> list[tuple[Any, ...]]:
        return [
            (r["kind"], r["amount"], r["messages"], r["balance_after"], sorted(r["prices"] or ()))
            for r in rows
            if r["account_id"] == account_id
        ]

    for a, b in zip(fast.accounts, exact.accounts, strict=True):
        assert statement_rows(a.id) == statement_rows(b.id)
        assert any(kind == "hold" for kind, *_ in statement_rows(a.id))
    for r in rows:
        if r["message_ids"] is not None:
            assert r["message_ids"] == sorted(r["message_ids"]), r
    outbox = await db_fetch(
        database_url,
        schema,
        "SELECT account_id, status, count(*) AS n FROM callback_outbox GROUP BY account_id, status",
    )
    by_side = [
        {(r["status"], r["n"]) for r in outbox if r["account_id"] == twin.accounts[0].id}
        for twin in (fast, exact)
    ]
    assert by_side[0] == by_side[1] and by_side[0]
    handed = [
        (
            await db_fetch(
                database_url,
                schema,
                "SELECT count(*) AS n FROM shard_inbox WHERE message_id = ANY($1::uuid[])",
                ids,
            )
        )[0]["n"]
        for ids in candidates
    ]
    assert handed[0] == handed[1] and (handed[0] > 0) == cluster, handed
    # Both ways ran: the balances run out, and then the group falls back.
    assert used["one"] > 0 and used["fallback"] > 0, used
    # Both ways kept the rollups of what they stored and finished, outcomes given twice too.
    assert await assert_rollups_exact(database_url, schema) > 0


@pytest.mark.parametrize("near_midnight", [False, True], ids=["one_statement", "exact_way"])
async def test_a_taken_client_ref_holds_nothing(
    database_url: str, schema: str, near_midnight: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Within an hour of a UTC midnight a group with refs takes the exact way (commit.py,
    # _near_midnight): both ways answer the same, whatever the hour the test runs at.
    monkeypatch.setattr(commit, "_near_midnight", lambda created_at: near_midnight)
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        create = WriteGroup()
        create.creates.append(("acme", 100, b"k" * 32))
        [account] = (await store.commit_group(create)).creates
        first = outbound(account.id, 5, "order-1")
        group = WriteGroup()
        group.accepts.append(([first], True))
        assert answers(await store.commit_group(group)) == [[(True, None)]]

        again = msgspec.structs.replace(first, id=uuid7())
        other = outbound(account.id, 10, "order-2")
        group = WriteGroup()
        group.accepts += [([again], True), ([other], True)]
        result = await store.commit_group(group)
        assert answers(result) == [[(False, "duplicate_client_ref")], [(True, None)]]
        assert result.accepts[1][0].balance == 85
    figures = (await ledger(database_url, schema))[account.id]
    assert figures["balance"] == 85 and figures["held"] == 15
    assert_ledger_consistent({account.id: figures})


async def hand_all_to_b(
    db: Database, database_url: str, nursery: trio.Nursery, to_b: Callable[[str], None]
) -> PgCluster:
    """Node "a", which leases nothing, while "b" leases every shard and listens (its
    hand-offs' payloads to `to_b`)."""
    a = PgCluster(db, database_url, "a")
    await a.join(3.0)
    b = PgCluster(db, database_url, "b")
    await db.run(
        lambda c: c.execute(
            "UPDATE shard_leases SET owner = 'b', expires_at = now() + interval '1 hour'"
        )
    )
    nursery.start_soon(b.listen, Notices(to_b, lambda _: None, lambda _: None))
    return a


async def test_a_hand_off_wakes_its_owner_and_no_other_node(database_url: str, schema: str) -> None:
    """Node "a" leases nothing and "b" every shard: what "a" stores is told to "b" alone, on
    b's own channel; neither the schema's hand-off channel nor another node's hears it."""
    handed: list[str] = []
    others: list[tuple[str, str]] = []
    told_b = trio.Event()

    def to_b(body: str) -> None:
        handed.append(body)
        told_b.set()

    def overheard(conn: object, pid: int, channel: str, body: str) -> None:
        others.append((channel, body))

    async def overhear(channels: list[str]) -> None:
        async def hold() -> None:
            conn = await asyncpg.connect(database_url)
            try:
                for channel in channels:
                    await conn.add_listener(channel, overheard)
                await asyncio.sleep(3_600)
            finally:
                await conn.close()

        await bridge(hold)()

    async with open_database(database_url, schema) as db, trio.open_nursery() as nursery:
        a = await hand_all_to_b(db, database_url, nursery, to_b)
        nursery.start_soon(
            overhear, [a.channel, owner_channel(a.channel, "a"), owner_channel(a.channel, "c")]
        )
        store = PgStore(db, handoff=Handoff("a", a.lock_class, a.channel))
        account = await store_account(store)
        await trio.sleep(0.5)  # both listen
        sent = [outbound(account.id) for _ in range(5)]
        group = WriteGroup()
        group.accepts += [([s], True) for s in sent]
        await store.commit_group(group)
        with trio.fail_after(5):
            await told_b.wait()
        await trio.sleep(0.3)  # anything else told by now
        nursery.cancel_scope.cancel()
    told = [m.id for p in handed for m in msgspec.json.decode(p, type=list[OutboundSms])]
    assert sorted(told) == sorted(s.id for s in sent)
    assert others == []


async def test_bulk_hand_offs_linger_to_go_together_and_express_ones_do_not(
    database_url: str, schema: str
) -> None:
    """With an announcer (storage/announce.py), the first bulk hand-off after a quiet spell is
    told at once, those committed within the linger after it in one notification; an express
    hand-off is told at once, with the bulk ones waiting. Each message once."""
    told: list[list[OutboundSms]] = []
    heard = trio.Event()

    def to_b(body: str) -> None:
        told.append(msgspec.json.decode(body, type=list[OutboundSms]))
        heard.set()

    async def next_notification() -> list[str]:
        nonlocal heard
        with trio.fail_after(10):
            await heard.wait()
        heard = trio.Event()
        return [m.id for m in told[-1]]

    async with open_database(database_url, schema) as db, trio.open_nursery() as nursery:
        a = await hand_all_to_b(db, database_url, nursery, to_b)
        announcer = HandoffAnnouncer(db, a.channel, linger=30.0)
        await nursery.start(announcer.run)
        store = PgStore(db, handoff=Handoff("a", a.lock_class, a.channel, "", announcer))
        account = await store_account(store)
        await trio.sleep(0.5)  # b listens

        async def commit(*items: OutboundSms) -> list[str]:
            group = WriteGroup()
            group.accepts += [([s], True) for s in items]
            await store.commit_group(group)
            return [s.id for s in items]

        first = await commit(outbound(account.id))
        assert await next_notification() == first  # a quiet spell before it: at once
        second = await commit(outbound(account.id), outbound(account.id))
        third = await commit(outbound(account.id))
        assert announcer.stats()["waiting"] == 3  # within the linger: they wait
        express = msgspec.structs.replace(outbound(account.id), express=True)
        fourth = await commit(express)
        assert announcer.stats()["waiting"] == 0
        assert sorted(await next_notification()) == sorted(second + third + fourth)
        nursery.cancel_scope.cancel()
    assert len(told) == 2
    assert announcer.counts["notifies"] == 1 and announcer.counts["messages"] == 1


async def test_an_announcer_that_cannot_notify_drops_what_waits_and_goes_on(
    database_url: str, schema: str
) -> None:
    """A NOTIFY that fails (here: its database is closed) is counted and what it carried is
    left to the owners' polls (the shard_inbox rows); the announcer neither raises nor keeps
    the messages, and tells the next ones as before."""
    async with open_database(database_url, schema), trio.open_nursery() as nursery:
        closed = await Database.open(database_url, schema=schema)
        await closed.close()
        announcer = HandoffAnnouncer(closed, "smsgw_handoff_test", linger=0.0)
        await nursery.start(announcer.run)
        account_id = 1
        for expected in (1, 2):
            announcer.tell({"b": [outbound(account_id)]})
            with trio.fail_after(10):
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert announcer.counts["failures"] == expected
            assert announcer.stats()["waiting"] == 0
        assert announcer.counts["notifies"] == 0
        nursery.cancel_scope.cancel()
