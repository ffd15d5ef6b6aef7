"""Several nodes on one PostgreSQL: shard leases, hand-offs, takeover after SIGKILL, fencing
after SIGSTOP. Nodes are `smsgw serve` processes on 127.0.0.1, so they can be killed."""

from __future__ import annotations

import signal
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio

from smsgw.engine.ports import SHARDS, shard_of
from smsgw.storage.cluster import listen_name
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    FINAL,
    TO,
    assert_ledger_consistent,
    db_fetch,
    http_client,
    ledger,
    until,
)
from tests.integration.nodes import (
    SLOW,
    TTL,
    all_final,
    balanced,
    balanced_nodes,
    cluster,
    create_accounts,
    leases_of,
    pending_count,
    pool_of,
    serve_node,
)

pytestmark = pytest.mark.slow


async def test_shard_of_is_the_same_in_python_and_postgres(database_url: str, schema: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with serve_node(database_url, schema, "solo", Path(tmp) / "log"):
            ids = [*range(1, 2_000), 2**31 - 1, 2**31, 2**40 + 7, 2**63 - 1]
            rows = await db_fetch(
                database_url,
                schema,
                "SELECT i AS id, shard_of(i) AS shard FROM unnest($1::bigint[]) AS i",
                ids,
            )
    assert {r["id"]: r["shard"] for r in rows} == {i: shard_of(i) for i in ids}
    # Consecutive ids (a sequence) spread evenly.
    counts = [0] * SHARDS
    for i in range(1, 25_601):
        counts[shard_of(i)] += 1
    assert min(counts) >= 90 and max(counts) <= 110, (min(counts), max(counts))


async def test_two_nodes_share_the_shards_and_hand_off(database_url: str, schema: str) -> None:
    """Accept on either node: every message ends once. Bulk is dispatched by the node that
    accepted it (under its home shard, no hand-off), except a paced account's, which goes to
    the owner of the account's shard, where its send rate is kept."""
    async with balanced_nodes(database_url, schema, "a", "b") as (a, b):
        ca, cb = a.client, b.client
        owner = {
            lease["shard"]: name
            for name, client in (("a", ca), ("b", cb))
            for lease in (await leases_of(client))["leases"]
        }
        assert len(owner) == SHARDS
        accounts = await create_accounts(ca, 12, 10_000)
        paced = {acc["id"] for acc in accounts[:3]}
        for account_id in paced:
            r = await ca.put(
                f"/v1/accounts/{account_id}/settings", json={"send_rate": 1000}, headers=admin()
            )
            assert r.status_code == 200, r.text
        await trio.sleep(1.5)  # settings reach every node within 1 s
        accepted_by: dict[str, str] = {}
        for i in range(120):
            account = accounts[i % len(accounts)]
            # Each account through both nodes, every other round.
            name, client = ("a", ca) if i // len(accounts) % 2 else ("b", cb)
            r = await client.post(
                "/v1/messages",
                json={"to": TO, "text": f"m{i}"},
                headers=bearer(account["api_key"]),
            )
            assert r.status_code == 202, r.text
            accepted_by[r.json()["id"]] = name

        await all_final(database_url, schema)
        rows = await db_fetch(
            database_url,
            schema,
            "SELECT id::text AS id, account_id, status, operator, dispatch_shard FROM messages",
        )
        assert len(rows) == len(accepted_by)
        for row in rows:
            assert row["status"] in FINAL
            account_owner = owner[shard_of(row["account_id"])]
            by = accepted_by[row["id"]]
            if row["account_id"] in paced:
                assert row["operator"] == f"op-{account_owner}", row
                assert row["dispatch_shard"] is None, row
            else:
                assert row["operator"] == f"op-{by}", row
                if by != account_owner:
                    assert owner[row["dispatch_shard"]] == by, row
        handed = 0
        for client in (ca, cb):
            stats = await leases_of(client)
            handed += stats["delivered"] + stats["claimed"]
        # The paced accounts' messages accepted by the node that does not own their shard.
        assert handed == sum(
            1
            for row in rows
            if row["account_id"] in paced
            and accepted_by[row["id"]] != owner[shard_of(row["account_id"])]
        )
        assert handed > 0
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_a_dead_nodes_bulk_for_another_nodes_accounts_is_taken_over_as_its_own_stream(
    database_url: str, schema: str
) -> None:
    """B accepts bulk for accounts whose shard A leases and queues it under its home shard
    (operators slow, a window of 2: most waits). A accepts newer messages of the same
    accounts itself. B is SIGKILLed: A takes B's shards over and pages B's queue of those
    accounts as streams of their own, although A's own queue of them is ahead of it in time
    (one queue per account would have put B's older messages behind A's cursor, where no page
    reads them). Every message ends once and the ledger holds."""
    slow = ("--operator-latency-ms", "400,500", "--window", "2")
    async with balanced_nodes(database_url, schema, "a", "b", extra=slow) as (a, b):
        ca, cb = a.client, b.client
        a_shards = {lease["shard"] for lease in (await leases_of(ca))["leases"]}
        b_shards = {lease["shard"] for lease in (await leases_of(cb))["leases"]}
        accounts = await create_accounts(ca, 16, 10_000)
        on_a = [acc for acc in accounts if shard_of(acc["id"]) in a_shards][:4]
        assert on_a

        by_b = await send_round_robin(cb, on_a, 24, "b")
        # Newer: A's own streams of these accounts move on.
        by_a = await send_round_robin(ca, on_a, 8, "a")
        stamped = await db_fetch(
            database_url,
            schema,
            "SELECT dispatch_shard FROM messages WHERE id = ANY($1::uuid[])",
            by_b,
        )
        assert {r["dispatch_shard"] for r in stamped} <= b_shards
        b.node.process.kill()
        with trio.fail_after(30):
            await until(lambda: balanced(ca, ["a"]), interval=0.1)

        await all_final(database_url, schema)
        rows = await db_fetch(
            database_url,
            schema,
            "SELECT id::text AS id, status, operator FROM messages WHERE id = ANY($1::uuid[])",
            by_b + by_a,
        )
        assert len(rows) == len(by_b) + len(by_a)
        assert {r["status"] for r in rows} <= FINAL
        taken_over = [r for r in rows if r["id"] in set(by_b) and r["operator"] == "op-a"]
        assert taken_over  # B had most of its queue still waiting when it died
        assert all(r["operator"] == "op-a" for r in rows if r["id"] in set(by_a))
        stats = await leases_of(ca)
        assert stats["swept"] == 0  # paged at the takeover, not found later by the sweep
        assert_ledger_consistent(await ledger(database_url, schema))


async def test_a_paused_nodes_listen_session_is_ended_at_takeover_and_comes_back_with_it(
    database_url: str, schema: str
) -> None:
    """A SIGSTOPped node keeps its LISTEN session open and reads nothing: PostgreSQL would keep
    every notification for it until its queue filled and every node's NOTIFY failed. The node
    that takes its shards over ends that session; resumed, the node listens again."""

    async def listeners() -> dict[str, int]:
        rows = await db_fetch(
            database_url,
            schema,
            "SELECT application_name AS name, pid FROM pg_stat_activity"
            " WHERE application_name LIKE 'smsgw-listen %' AND datname = current_database()",
        )
        return {r["name"]: r["pid"] for r in rows}

    async with balanced_nodes(database_url, schema, "a", "b") as (a, b):
        view = await cluster(a.client)
        assert 0 <= view["notify_queue_usage"] < 0.01
        before = await listeners()
        a_name, b_name = listen_name(schema, "a"), listen_name(schema, "b")
        assert a_name in before and b_name in before
        b.node.process.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(30):
                await until(lambda: balanced(a.client, ["a"]), interval=0.1)

            async def b_not_listening() -> bool:
                return b_name not in await listeners()

            with trio.fail_after(5):
                await until(b_not_listening, interval=0.1)
            assert (await listeners())[a_name] == before[a_name]  # A's own kept
        finally:
            b.node.process.send_signal(signal.SIGCONT)

        async def b_listening_again() -> bool:
            return b_name in await listeners()

        with trio.fail_after(15):
            await until(b_listening_again, interval=0.2)
        with trio.fail_after(30):
            await until(lambda: balanced(a.client, ["a", "b"]), interval=0.2)


async def send_round_robin(
    client: httpx.AsyncClient, accounts: list[dict], n: int, tag: str
) -> list[str]:
    """`n` single messages through `client`, from `accounts` in turn; their ids."""
    ids = []
    for i in range(n):
        account = accounts[i % len(accounts)]
        r = await client.post(
            "/v1/messages",
            json={"to": TO, "text": f"{tag}{i}"},
            headers=bearer(account["api_key"]),
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


def _recipient(sender: int, i: int) -> str:
    """A number of its own for each message: the hourly limit per recipient (20) would
    otherwise refuse the flood long before the kill."""
    return f"+49151{sender:02d}{i:06d}"


async def _flood(
    url: str,
    keys: list[str],
    accepted: list[tuple[str, str, float]],
    stop: trio.Event,
    sender: int,
) -> None:
    """Send until `stop` or until the node goes away; record (node url, id, time) of 202s."""
    async with http_client(url, connections=1) as client:
        for i in range(100_000):
            if stop.is_set():
                return
            try:
                r = await client.post(
                    "/v1/messages",
                    json={"to": _recipient(sender, i), "text": f"s{sender} m{i}"},
                    headers=bearer(keys[(sender + i) % len(keys)]),
                )
            except httpx.TransportError:
                return
            if r.status_code == 202:
                accepted.append((url, r.json()["id"], time.time()))
            else:
                assert r.status_code in (429, 503), r.text
            await trio.sleep(0.01)  # steady, not flat out: three nodes share two cores


async def test_sigkill_a_node_under_load_its_shards_are_taken_over(
    database_url: str, schema: str
) -> None:
    """Three nodes under steady load; one is SIGKILLed. Its leases expire and the other two
    take its shards over and recover their queued messages: every accepted message ends once,
    is charged at most once, and the ledger holds."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        async with AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(serve_node(database_url, schema, f"n{i}", log))
                for i in range(3)
            ]
            c0 = await stack.enter_async_context(http_client(nodes[0].url))
            with trio.fail_after(30):
                await until(lambda: balanced(c0, ["n0", "n1", "n2"]), interval=0.2)
            victim = nodes[2]
            victim_shards = {
                lease["shard"]
                for lease in (
                    await leases_of(await stack.enter_async_context(http_client(victim.url)))
                )["leases"]
            }
            accounts = await create_accounts(c0, 32, 10**6)
            keys = [a["api_key"] for a in accounts]
            accepted: list[tuple[str, str, float]] = []
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for sender in range(12):
                    nursery.start_soon(_flood, nodes[sender % 3].url, keys, accepted, stop, sender)
                await trio.sleep(2.0)
                killed_at = time.monotonic()
                victim.process.kill()
                # Taken over: every shard leased again, by the two survivors only.
                with trio.fail_after(30):
                    await until(lambda: balanced(c0, ["n0", "n1"]), interval=0.05)
                takeover_s = time.monotonic() - killed_at
                await trio.sleep(1.0)  # load goes on after the takeover
                stop.set()
            assert await victim.process.wait() == -signal.SIGKILL

            await all_final(database_url, schema, within=60)

        ids = [message_id for _, message_id, _ in accepted]
        rows = await db_fetch(
            database_url,
            schema,
            "SELECT id::text AS id, account_id, status, operator,"
            " extract(epoch FROM updated_at - created_at)::float8 AS took_s"
            " FROM messages WHERE id = ANY($1::uuid[])",
            ids,
        )
        assert len(rows) == len(set(ids)) == len(ids), "an accepted message is missing"
        assert {r["status"] for r in rows} <= FINAL
        accounts_after = await ledger(database_url, schema)
        assert_ledger_consistent(accounts_after)
        assert all(a["held"] == 0 for a in accounts_after.values())
        # The victim's shards were finished by the survivors once it was gone.
        orphans = [r for r in rows if shard_of(r["account_id"]) in victim_shards]
        assert orphans and any(r["operator"] != "op-n2" for r in orphans)
        delayed = [r for r in orphans if r["took_s"] > 1.0]
        print(
            f"takeover after {takeover_s:.2f} s (lease ttl {TTL:g} s); {len(accepted)} accepted,"
            f" {len(orphans)} on the victim's shards, {len(delayed)} of them delayed > 1 s"
            f" (longest {max((r['took_s'] for r in orphans), default=0):.2f} s)"
        )


async def test_a_paused_node_cannot_write_status_for_shards_it_lost(
    database_url: str, schema: str
) -> None:
    """B holds messages in flight (operators take 2.5 s) when it is SIGSTOPped past its
    lease. A takes B's shards over and sends those messages again. B, resumed while A's sends
    are still in flight, gets its operator's answers first and tries to record them: the
    messages are not final yet, so only the fencing token stands between B and a status
    write, and it refuses every one. A's answers are the ones recorded."""
    async with balanced_nodes(database_url, schema, "a", "b", extra=SLOW) as (a, b):
        ca, cb = a.client, b.client
        b_shards = {lease["shard"] for lease in (await leases_of(cb))["leases"]}
        accounts = await create_accounts(ca, 24, 10_000)
        on_b = [acc for acc in accounts if shard_of(acc["id"]) in b_shards]
        assert on_b
        ids = await send_round_robin(cb, on_b, 30, "m")  # accepted and dispatched by B

        async def b_has_them_in_flight() -> bool:
            return (await pool_of(cb))["inflight"] == len(ids)

        with trio.fail_after(10):
            await until(b_has_them_in_flight)
        sent_before = (await pool_of(cb))["sent"]
        b.node.process.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(30):
                await until(lambda: balanced(ca, ["a"]), interval=0.1)

            async def a_sends_them() -> bool:
                return (await pool_of(ca))["inflight"] == len(ids)

            with trio.fail_after(10):
                await until(a_sends_them, interval=0.05)
        finally:
            b.node.process.send_signal(signal.SIGCONT)

        # B's operator answers the batch it had in flight; B tries to record it.
        async def b_got_answers() -> bool:
            return (await pool_of(cb))["sent"] >= sent_before + len(ids)

        with trio.fail_after(30):
            await until(b_got_answers, interval=0.1)

        # And B learns, at its first tick since it resumed, that its leases are gone.
        async def b_saw_the_loss() -> bool:
            return (await leases_of(cb))["lost"] >= len(b_shards)

        with trio.fail_after(30):
            await until(b_saw_the_loss, interval=0.1)
        assert await pending_count(database_url, schema) == len(ids)  # A's are in flight

        await all_final(database_url, schema)

        rows = await db_fetch(
            database_url,
            schema,
            "SELECT id::text AS id, status, operator FROM messages WHERE id = ANY($1::uuid[])",
            ids,
        )
        assert len(rows) == len(ids)
        # Each ended once, by A: none of B's late writes landed.
        assert {r["status"] for r in rows} == {"sent"}
        assert {r["operator"] for r in rows} == {"op-a"}, rows
        assert_ledger_consistent(await ledger(database_url, schema))
