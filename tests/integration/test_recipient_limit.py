"""The hourly limit per recipient number, kept by the store: it counts the account's messages
to the number stored in the last hour, whichever node stored them and across restarts, both
the one-statement way and the transaction way, and when another node's group commits while
this one waits for the account's lock."""

from __future__ import annotations

import asyncio

import asyncpg
import msgspec
import pytest
import trio

from smsgw.engine.messages import Account, OutboundSms
from smsgw.engine.ports import WriteGroup
from smsgw.storage.commit_sql import GroupBounds, _insert_sql
from smsgw.storage.pg import PgStore
from tests.integration.helpers import assert_ledger_consistent, ledger, open_database, outbound
from tests.integration.test_group_commit import ExactStore, answers

LIMIT = 3
LIMITED = (False, "recipient_rate_limited")


def to(number: str, sms: OutboundSms) -> OutboundSms:
    return msgspec.structs.replace(sms, to=number)


async def create(store: PgStore, name: str, credit: int = 1_000) -> Account:
    group = WriteGroup()
    group.creates.append((name, credit, name.encode().ljust(32, b"k")))
    return (await store.commit_group(group)).creates[0]


@pytest.mark.parametrize("exact", [False, True])
async def test_a_number_takes_its_limit_an_hour_and_no_more(
    database_url: str, schema: str, exact: bool
) -> None:
    async with open_database(database_url, schema) as db:
        kind = ExactStore if exact else PgStore
        store, other = kind(db, recipient_limit=LIMIT), kind(db, recipient_limit=LIMIT)
        account = await create(store, "a")
        # Two of one number in one group, then three more by another store (another node,
        # or this one after a restart: nothing in memory): one fits, two are refused.
        first = WriteGroup()
        first.accepts.append(([outbound(account.id), outbound(account.id)], False))
        assert answers(await store.commit_group(first)) == [[(True, None), (True, None)]]
        second = WriteGroup()
        second.accepts += [([outbound(account.id)], True) for _ in range(3)]
        got = await other.commit_group(second)
        assert answers(got) == [[(True, None)], [LIMITED], [LIMITED]]
        assert all(0 < r[0].retry_after <= 3600 for r in got.accepts[1:])  # type: ignore[operator]
        # Another number, and another account's messages to the same one, are not affected.
        third = WriteGroup()
        stranger = await create(store, "b")
        third.accepts.append(([to("+4915100000001", outbound(account.id))], True))
        third.accepts.append(([outbound(stranger.id)], True))
        assert answers(await store.commit_group(third)) == [[(True, None)], [(True, None)]]
        # An account's own limit wins over the store's default.
        await db.run(
            lambda conn: conn.execute(
                "UPDATE accounts SET recipient_limit_per_hour = 5 WHERE id = $1", account.id
            )
        )
        fourth = WriteGroup()
        fourth.accepts.append(([outbound(account.id) for _ in range(3)], False))
        assert answers(await store.commit_group(fourth)) == [[(True, None)] * 2 + [LIMITED]]
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    assert accounts[account.id]["held"] == 5 * (3 + 1 + 2)  # nothing held for the refused


async def test_an_atomic_batch_past_the_limit_stores_nothing(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:
        store = PgStore(db, recipient_limit=LIMIT)
        account = await create(store, "a")
        items = [to(f"+49151000000{i:02d}", outbound(account.id)) for i in range(3)]
        items += [outbound(account.id) for _ in range(4)]  # one more than the limit
        group = WriteGroup()
        group.accepts.append((items, True))
        got = answers(await store.commit_group(group))
        assert got == [[(False, "batch_rejected")] * 6 + [LIMITED]]
        # Not atomic: all but the fourth to the one number.
        group = WriteGroup()
        group.accepts.append((items, False))
        got = answers(await store.commit_group(group))
        assert got == [[(True, None)] * 6 + [LIMITED]]
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    assert accounts[account.id]["held"] == 5 * 6


@pytest.mark.parametrize("exact", [False, True])
async def test_a_group_committed_while_this_one_waits_is_counted(
    database_url: str, schema: str, exact: bool
) -> None:
    """Another node stores two messages to the number while holding the account's lock; this
    store's group of two, waiting for that lock, started with a snapshot that cannot see them:
    it must still count them (limit 3: one of its two fits)."""
    async with open_database(database_url, schema) as db:
        store = (ExactStore if exact else PgStore)(db, recipient_limit=LIMIT)
        account = await create(store, "a")
        theirs = [outbound(account.id), outbound(account.id)]
        locked, release = trio.Event(), trio.Event()

        async def other_node() -> None:
            async def hold(conn: asyncpg.Connection) -> None:
                async with conn.transaction():
                    await conn.execute(
                        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account.id
                    )
                    await conn.execute(
                        _insert_sql("$1", "p.id >= $2::uuid AND p.id < $3::uuid"),
                        msgspec.json.encode(theirs).decode(),
                        *GroupBounds.of(theirs).refs,
                    )
                    await conn.execute(
                        "UPDATE accounts SET balance = balance - 10, held = held + 10"
                        " WHERE id = $1",
                        account.id,
                    )
                    await conn.execute(
                        "INSERT INTO credit_ledger (account_id, kind, amount, messages,"
                        " balance_after, message_ids, prices)"
                        " SELECT $1, 'hold', 10, 2, balance, $2::uuid[], '{5, 5}'"
                        " FROM accounts WHERE id = $1",
                        account.id,
                        [s.id for s in theirs],
                    )
                    trio_token.run_sync_soon(locked.set)
                    # `release` is a trio Event, so polled from asyncio.
                    while not release.is_set():  # noqa: ASYNC110
                        await asyncio.sleep(0.01)

            await db.run(hold)

        trio_token = trio.lowlevel.current_trio_token()
        group = WriteGroup()
        group.accepts.append(([outbound(account.id), outbound(account.id)], False))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_node)
            await locked.wait()
            got: list[object] = []

            async def ours() -> None:
                got.append(await store.commit_group(group))

            nursery.start_soon(ours)
            await trio.sleep(0.3)  # ours has taken its snapshot and waits for the lock
            release.set()
        assert answers(got[0]) == [[(True, None), LIMITED]]  # type: ignore[arg-type]
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
