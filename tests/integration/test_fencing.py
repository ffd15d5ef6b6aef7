"""The store's side of the shard leases, called directly: a status write lands only under the
shard's current token; an accept for a shard another node leases is handed to it, once."""

from __future__ import annotations

import msgspec

from smsgw.engine.messages import Account, OutboundSms, Outcome
from smsgw.engine.ports import WriteGroup, shard_of
from smsgw.storage.cluster import PgCluster
from smsgw.storage.commit import Handoff
from smsgw.storage.pg import PgStore
from tests.integration.helpers import (
    assert_ledger_consistent,
    db_fetch,
    ledger,
    open_database,
    outbound,
)


def sent(message: OutboundSms, fence: int | None) -> Outcome:
    return Outcome(
        sms=msgspec.structs.replace(message, fence=fence),
        status="sent",
        operator="op",
        operator_message_id="op-1",
        reason=None,
        attempts=1,
        at=1.7e9 + 1,
    )


async def test_a_status_write_lands_only_under_the_current_token(
    database_url: str, schema: str
) -> None:
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

        first = await a.acquire(256, 3.0)
        old_token = first[shard]
        message = outbound(account.id)
        group = WriteGroup()
        group.accepts.append(((message,), True))
        await store.commit_group(group)

        # B takes the shard over (A's lease ran out, here: released).
        await a.release([shard])
        taken = await b.acquire(1, 3.0)
        assert list(taken) == [shard] and taken[shard] > old_token

        # A, late, records a send under its old token: refused, nothing changes.
        group = WriteGroup()
        group.outcomes.append(sent(message, old_token))
        await store.commit_group(group)
        [row] = await db_fetch(
            database_url,
            schema,
            "SELECT status, operator FROM messages WHERE id = $1",
            message.id,
        )
        assert row == {"status": "queued", "operator": None}
        assert (await ledger(database_url, schema))[account.id]["held"] == 5

        # B's write, under the token it holds, lands and captures once.
        group = WriteGroup()
        group.outcomes.append(sent(message, taken[shard]))
        await store.commit_group(group)
        [row] = await db_fetch(
            database_url, schema, "SELECT status FROM messages WHERE id = $1", message.id
        )
        assert row["status"] == "sent"
        accounts = await ledger(database_url, schema)
        assert accounts[account.id]["captured"] == 5 and accounts[account.id]["held"] == 0
        assert_ledger_consistent(accounts)


async def test_an_accept_for_another_nodes_shard_is_handed_off_once(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:
        a = PgCluster(db, database_url, "a")
        b = PgCluster(db, database_url, "b")
        await a.join(3.0)
        await b.join(3.0)
        store_a = PgStore(db, handoff=Handoff("a", a.lock_class, a.channel))
        group = WriteGroup()
        for i in range(40):
            group.creates.append((f"acc{i}", 100, bytes([i]) * 32))
        accounts = (await store_a.commit_group(group)).creates
        b_tokens = await b.acquire(256, 3.0)  # B leases every shard
        messages = [outbound(acc.id) for acc in accounts]
        group = WriteGroup()
        group.accepts += [((m,), True) for m in messages]
        await store_a.commit_group(group)

        claimed = await b.claim(lambda _: False)
        assert sorted(m.id for m, _ in claimed) == sorted(m.id for m in messages)
        assert all(token == b_tokens[shard_of(m.account_id)] for m, token in claimed)
        assert await b.claim(lambda _: False) == []  # exactly once
        assert await a.claim(lambda _: False) == []  # and only by the shard's owner
        # Recovery of the shards sees the same messages (they are still queued): bulk, so
        # counted per account, to be paged in.
        express, counts = await b.load_backlog(sorted(b_tokens))
        assert express == []
        assert dict(counts) == {m.account_id: 1 for m in messages}


async def test_a_lease_is_renewed_only_under_the_token_it_was_taken_with(
    database_url: str, schema: str
) -> None:
    """A heartbeat renews the leases it names, each under its own token: one whose token is
    old (the shard was taken over and given back meanwhile) is not renewed, nor one held by
    another node."""
    async with open_database(database_url, schema) as db:
        a = PgCluster(db, database_url, "a")
        b = PgCluster(db, database_url, "b")
        await a.join(3.0)
        await b.join(3.0)
        held = await a.acquire(256, 3.0)
        assert len(held) == 256
        stale = dict(held)
        stale[7] -= 1  # a token from before
        await a.release([9])
        assert list(await b.acquire(1, 3.0)) == [9]
        beat = await a.heartbeat(stale, 3.0, 1.0, None)
        assert beat.renewed == {s: t for s, t in held.items() if s not in (7, 9)}
