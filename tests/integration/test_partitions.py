"""Issue 27: messages in day partitions (migration 019). Retention drops exactly the days past
it, never one holding a message not final, while intake goes on; redaction empties old bodies
and nothing else; a client_ref is unique across today's and yesterday's partitions; the
migration moves an existing table's rows and indexes."""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import msgspec
import pytest
import trio

from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import MessageQuery, WriteGroup, shard_of, stream_key
from smsgw.engine.upkeep import StoreUpkeep, UpkeepConfig
from smsgw.storage.commit_sql import COPY_MIN_ROWS
from smsgw.storage.database import Database
from smsgw.storage.migrate import migrate
from smsgw.storage.partitions import PENDING, SCHEDULED, Partitions, oldest_day_holding
from smsgw.storage.pg import PgStore
from smsgw.storage.rows import day_number
from tests.integration.helpers import open_database, store_account
from tests.integration.test_statement import open_database_at

DAY_S = 86_400


def id_at(t: float) -> str:
    """A UUIDv7 of the Unix time `t`, as the node makes them (http/context.py)."""
    value = int(t * 1000) << 80 | 0x7 << 76 | random.getrandbits(12) << 64
    t_hex = (value | 0x2 << 62 | random.getrandbits(62)).to_bytes(16).hex()
    return f"{t_hex[:8]}-{t_hex[8:12]}-{t_hex[12:16]}-{t_hex[16:20]}-{t_hex[20:]}"


def message(account_id: int, at: float, client_ref: str | None = None) -> OutboundSms:
    """A message accepted at `at`, its id made then."""
    return OutboundSms(
        id=id_at(at),
        account_id=account_id,
        to="+4915123456789",
        sender="smsgw",
        text="hello there",
        segments=1,
        price=5,
        express=False,
        created_at=at,
        client_ref=client_ref,
    )


async def fetch(db: Database, sql: str, *args: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.run(lambda c: c.fetch(sql, *args))]


async def accept(store: PgStore, items: list[OutboundSms]) -> list[tuple[bool, str | None]]:
    group = WriteGroup()
    group.accepts.append((items, False))
    [results] = (await store.commit_group(group)).accepts
    return [(r.accepted, r.reason) for r in results]


def midnight() -> float:
    """Today's UTC midnight, Unix seconds."""
    return time.time() // DAY_S * DAY_S


async def add_day(db: Database, day: date) -> None:
    """The day's partitions of every table kept by day (messages, their history)."""
    await db.run(
        lambda c: c.fetch(
            "SELECT smsgw_add_day_partition(parent, $1) FROM day_partitioned ORDER BY parent", day
        )
    )


async def partitions(db: Database, parent: str = "messages") -> set[str]:
    rows = await fetch(
        db,
        "SELECT inhrelid::regclass::text AS part FROM pg_inherits"
        " WHERE inhparent = to_regclass($1)",
        parent,
    )
    return {r["part"] for r in rows}


def name(day: date, parent: str = "messages") -> str:
    return f"{parent}_{day:%Y%m%d}"


# --- client_ref across the day boundary -------------------------------------------------------


async def test_a_client_ref_used_yesterday_is_a_duplicate_today(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        account = await store_account(store)
        today = midnight()
        # Either side of midnight: the exact way (a group with refs near a midnight).
        assert await accept(store, [message(account.id, today - 0.5, "late")]) == [(True, None)]
        assert await accept(store, [message(account.id, today + 0.5, "late")]) == [
            (False, "duplicate_client_ref")
        ]
        # The other way round: the later one committed first.
        assert await accept(store, [message(account.id, today + 1.5, "first")]) == [(True, None)]
        assert await accept(store, [message(account.id, today - 1.5, "first")]) == [
            (False, "duplicate_client_ref")
        ]
        # 23 hours apart, late in each day: the one statement.
        assert await accept(store, [message(account.id, today - 12 * 3600, "noon")]) == [
            (True, None)
        ]
        assert await accept(store, [message(account.id, today + 11 * 3600, "noon")]) == [
            (False, "duplicate_client_ref")
        ]
        # A batch stored by COPY, one of whose refs was used yesterday: that one alone.
        batch = [message(account.id, today + 7200, f"b{i}") for i in range(COPY_MIN_ROWS)]
        batch[7] = msgspec.structs.replace(batch[7], client_ref="noon")
        answers = await accept(store, batch)
        assert answers[7] == (False, "duplicate_client_ref")
        assert answers[:7] + answers[8:] == [(True, None)] * (COPY_MIN_ROWS - 1)
        # Two days back is past the promise's window: the ref may be used again.
        two_days = datetime.fromtimestamp(today - 2 * DAY_S, UTC).date()
        await add_day(db, two_days)
        assert await accept(store, [message(account.id, today - 2 * DAY_S + 60, "old")]) == [
            (True, None)
        ]
        assert await accept(store, [message(account.id, today + 3 * 3600, "old")]) == [(True, None)]
        stored = await fetch(
            db,
            "SELECT client_ref, count(*) AS n, sum(price) AS held FROM messages"
            " GROUP BY 1 ORDER BY 1",
        )
        counts = {r["client_ref"]: r["n"] for r in stored}
        assert counts["late"] == counts["first"] == counts["noon"] == 1 and counts["old"] == 2
        [held] = await fetch(db, "SELECT held FROM accounts WHERE id = $1", account.id)
        assert held["held"] == 5 * sum(counts.values())  # the duplicates hold nothing


# --- retention --------------------------------------------------------------------------------


async def fill_day(db: Database, day: date, n: int, status: str = "sent") -> None:
    """`n` messages of account 1 in `day`'s partition, made at noon."""
    at = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    await db.run(
        lambda c: c.execute(
            "INSERT INTO messages (id, account_id, recipient, sender, body, segments, price,"
            " express, status, created_at, updated_at)"
            " SELECT uuid7_at($1), 1, '+4915123456789', 'smsgw', 'hello', 1, 5, false, $3,"
            " $1, $1 FROM generate_series(1, $2)",
            at,
            n,
            status,
        )
    )


async def test_retention_drops_exactly_the_days_past_it_but_a_day_with_pending_messages(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        await store_account(store)
        today = datetime.now(UTC).date()
        days = {age: today - timedelta(days=age) for age in (100, 95, 92, 91, 90, 89)}
        for day in days.values():
            await add_day(db, day)
            await fill_day(db, day, 10)
        await fill_day(db, days[95], 1, "queued")
        await fill_day(db, days[92], 1, "scheduled")
        ledger_before = await fetch(db, "SELECT * FROM credit_ledger ORDER BY id")
        before = await partitions(db)
        before_history = await partitions(db, "message_events")

        upkeep = StoreUpkeep(Partitions(db), UpkeepConfig(retention_days=90), lambda: True)
        await upkeep.round()

        after = await partitions(db)
        assert before - after == {name(days[100]), name(days[91])}
        # A day's history goes with its messages' day, and stays while that day is kept.
        history = "message_events"
        gone = {name(days[100], history), name(days[91], history)}
        assert before_history - await partitions(db, history) == gone
        kept = {days[95], days[92]}
        assert set(upkeep.kept) == {name(d) for d in kept} | {name(d, history) for d in kept}
        assert upkeep.last_error is None
        # The days ahead are made at every round; the ledger is money: kept whole.
        assert name(today + timedelta(days=7)) in after
        assert await fetch(db, "SELECT * FROM credit_ledger ORDER BY id") == ledger_before
        left = await fetch(db, "SELECT count(*) AS n FROM messages")
        assert left[0]["n"] == 10 * 4 + 2


async def test_a_day_is_dropped_within_a_second_while_intake_goes_on(
    database_url: str, schema: str
) -> None:
    """A test-sized day (100,000 messages) dropped while group commits of single accepts run
    back to back: the drop takes under a second and the accepts keep committing through it."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        account = await store_account(store, 10**9)
        old = datetime.now(UTC).date() - timedelta(days=120)
        await add_day(db, old)
        await fill_day(db, old, 100_000)
        commits: list[tuple[float, float]] = []  # (start, end) of each accept's group commit
        window: list[float] = []  # the drop's start and end

        async def intake() -> None:
            with trio.move_on_after(30):
                while not window or time.monotonic() < window[-1] + 0.3:
                    started = time.monotonic()
                    assert await accept(store, [message(account.id, time.time())]) == [(True, None)]
                    commits.append((started, time.monotonic()))

        async def drop() -> None:
            await trio.sleep(0.3)  # intake under way
            window.append(time.monotonic())
            result = await Partitions(db).drop_partitions(old + timedelta(days=1))
            window.append(time.monotonic())
            assert result.dropped == [name(old), name(old, "message_events")], result

        async with trio.open_nursery() as nursery:
            nursery.start_soon(intake)
            nursery.start_soon(drop)
        assert name(old) not in await partitions(db)
        start, end = window
        assert end - start < 1.0
        # Accepts committed before the drop and after it, none waiting a second on it.
        assert any(done < start for _, done in commits)
        assert any(began > end for began, _ in commits)
        assert max(done - began for began, done in commits) < 1.0


# --- redaction --------------------------------------------------------------------------------


async def test_redaction_empties_old_final_bodies_and_keeps_prices_statuses_and_the_ledger(
    database_url: str, schema: str
) -> None:
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        account = await store_account(store)
        now = time.time()
        old_day = datetime.fromtimestamp(now - 10 * DAY_S, UTC).date()
        await add_day(db, old_day)
        old = [message(account.id, now - 10 * DAY_S + i) for i in range(12)]
        recent = [message(account.id, now - 60 + i) for i in range(3)]
        assert await accept(store, old + recent) == [(True, None)] * 15
        await db.run(
            lambda c: c.execute(
                "UPDATE messages SET status = 'sent' WHERE id = ANY($1::uuid[])",
                [s.id for s in old[:10] + recent],
            )
        )
        columns = "id::text, status, price, segments, reason, operator, created_at, updated_at"
        rows_before = await fetch(db, f"SELECT {columns} FROM messages ORDER BY id")
        ledger_before = await fetch(db, "SELECT * FROM credit_ledger ORDER BY id")
        account_before = await fetch(db, "SELECT * FROM accounts")

        upkeep = StoreUpkeep(Partitions(db), UpkeepConfig(redact_after_days=7), lambda: True)
        await upkeep.round()

        bodies = {
            r["id"]: r["body"] for r in await fetch(db, "SELECT id::text, body FROM messages")
        }
        assert [bodies[s.id] for s in old[:10]] == [""] * 10  # old and final
        assert [bodies[s.id] for s in old[10:]] == ["hello there"] * 2  # old, still queued
        assert [bodies[s.id] for s in recent] == ["hello there"] * 3
        assert upkeep.redacted == 10
        assert await fetch(db, f"SELECT {columns} FROM messages ORDER BY id") == rows_before
        assert await fetch(db, "SELECT * FROM credit_ledger ORDER BY id") == ledger_before
        assert await fetch(db, "SELECT * FROM accounts") == account_before
        # The next round starts where this one stopped.
        await upkeep.round()
        assert upkeep.redacted == 10


# --- the conversion ---------------------------------------------------------------------------


async def test_the_migration_moves_every_message_into_its_day_and_keeps_every_index(
    database_url: str, schema: str
) -> None:
    """A database before migration 019, with messages of three days ago, yesterday and today,
    and two whose ids are not UUIDv7s (one naming a day past the year 9999): after it, every
    row is in the partition of its id's day, the parent has every index it had (the client_ref
    one on each partition), and the days ahead exist."""
    async with open_database_at(database_url, schema, 18) as db:
        now = time.time()
        ids = [id_at(now - age * DAY_S) for age in (3, 3, 1, 0)]
        legacy = str(uuid.UUID(int=random.getrandbits(128), version=4))
        # An id whose first 48 bits name a day of the year 10332: a partition name with a
        # five-digit year, which migration 020 reads for the history's partition of that day.
        far = str(uuid.UUID(int=0xF000_0000_0000 << 80 | random.getrandbits(80), version=4))
        await db.run(
            lambda c: c.execute(
                "INSERT INTO messages (id, account_id, recipient, sender, body, segments, price,"
                " express, client_ref, status, created_at, updated_at)"
                " SELECT id, 1, '+4915123456789', 'smsgw', 'hi', 1, 5, false, 'r' || n, 'sent',"
                " now(), now() FROM unnest($1::uuid[]) WITH ORDINALITY AS x(id, n)",
                [*ids, legacy, far],
            )
        )
        before = {
            r["indexname"]
            for r in await fetch(
                db,
                "SELECT indexname FROM pg_indexes"
                " WHERE schemaname = current_schema() AND tablename = 'messages'",
            )
        }
        await migrate(db)

        rows = await fetch(db, "SELECT id::text, tableoid::regclass::text AS part FROM messages")
        where = {r["id"]: r["part"] for r in rows}
        assert set(where) == {*ids, legacy, far}
        for message_id in ids:
            day = datetime.fromtimestamp(int(message_id[:13].replace("-", ""), 16) / 1000, UTC)
            assert where[message_id] == name(day.date())
        after = {
            r["indexname"]
            for r in await fetch(
                db,
                "SELECT indexname FROM pg_indexes"
                " WHERE schemaname = current_schema() AND tablename = 'messages'",
            )
        }
        assert after == before - {"messages_account_client_ref"}
        parts = await partitions(db)
        today = datetime.now(UTC).date()
        assert {name(today + timedelta(days=d)) for d in range(-3, 8)} <= parts
        for part in parts:
            [found] = await fetch(
                db,
                "SELECT count(*) AS n FROM pg_indexes"
                " WHERE schemaname = current_schema() AND indexname = $1",
                f"{part}_client_ref",
            )
            assert found["n"] == 1, part
        stats = await fetch(
            db,
            "SELECT stxname FROM pg_statistic_ext"
            " WHERE stxnamespace = current_schema()::regnamespace",
        )
        assert {"messages_created_day"} <= {r["stxname"] for r in stats}


# --- pages newest first ------------------------------------------------------------------------


async def test_pages_read_each_message_once_in_order_over_many_days(
    database_url: str, schema: str
) -> None:
    """A page reads the day where it starts first (reads.first_day: newest first, the day
    before its upper end; oldest first, as the export reads, the day after its lower end), and
    the whole range only when that day holds too few: paged through with every page size, in
    both orders, the account's messages come back each once, in order, whether a page is filled
    by its first day, by several, or ends in an empty day; the export's pages agree. So do
    pages by recipient and by client_ref, which read the whole range at once, and the newest
    message with a client_ref used on several days."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        await store_account(store)
        now = time.time()
        today = datetime.now(UTC).date()
        for age in range(6):
            await add_day(db, today - timedelta(days=age))
        # Hours before now: three in the last day, a gap of a day, then denser days.
        hours = [0.01, 0.5, 3, 23.9, 48.5, 49, 50.5, 51, 52, 53, 100, 101, 102, 103, 119]
        made = [(id_at(now - h * 3600), datetime.fromtimestamp(now - h * 3600, UTC)) for h in hours]
        await db.run(
            lambda c: c.executemany(
                "INSERT INTO messages (id, account_id, recipient, sender, body, segments, price,"
                " express, status, created_at, updated_at)"
                " VALUES ($1::uuid, 1, '+4915123456789', 'smsgw', 'hello', 1, 5, false, 'sent',"
                " $2, $2)",
                made,
            )
        )
        newest = [i for i, _ in sorted(made, key=lambda m: (m[1], uuid.UUID(m[0])), reverse=True)]
        oldest = newest[::-1]
        # Every other message to another number, with a client_ref of its own but one, which
        # three messages days apart share.
        other = newest[1::2]
        await db.run(
            lambda c: c.executemany(
                "UPDATE messages SET recipient = '+4915100000000', client_ref = $2"
                " WHERE id = $1::uuid",
                [(i, "again" if n % 3 == 0 else f"r{n}") for n, i in enumerate(other)],
            )
        )
        again = [i for n, i in enumerate(other) if n % 3 == 0]
        assert (await store.message_by_client_ref(1, "again") or {}).get("id") == again[0]
        assert (await store.message_by_client_ref(1, "r1") or {}).get("id") == other[1]
        assert await store.message_by_client_ref(1, "none") is None
        cases = (
            (MessageQuery(limit=1), newest),
            (MessageQuery(limit=1, to="+4915100000000"), other),
            (MessageQuery(limit=1, to="+4915123456789"), newest[0::2]),
            (MessageQuery(limit=1, client_ref="again"), again),
            (MessageQuery(limit=1, to="+4915100000000", ascending=True), other[::-1]),
            (MessageQuery(limit=1, created_to=made[3][1]), newest[4:]),
            (MessageQuery(limit=1, ascending=True), oldest),
            # From the oldest message's second: the export's range, read oldest first.
            (MessageQuery(limit=1, ascending=True, created_from=made[-1][1]), oldest),
            (MessageQuery(limit=1, ascending=True, created_from=made[10][1]), oldest[4:]),
            (
                MessageQuery(
                    limit=1, ascending=True, created_from=made[-1][1], created_to=made[3][1]
                ),
                oldest[:-4],
            ),
        )
        for query, expected in cases:
            for limit in (1, 2, 3, 4, 7, 50):
                listed: list[str] = []
                after = None
                for _ in range(len(made) + 1):
                    rows = await store.messages(
                        1, msgspec.structs.replace(query, limit=limit, after=after)
                    )
                    listed += [r["id"] for r in rows]
                    if len(rows) < limit:
                        break
                    after = (rows[-1]["created_at"], rows[-1]["id"])
                assert listed == expected, (query, limit)

                exported: list[str] = []
                through = None
                for _ in range(len(made) + 1):
                    body, through = await store.messages_csv(
                        1, msgspec.structs.replace(query, limit=limit, after=through)
                    )
                    exported += [line.split(",")[0] for line in body.decode().splitlines()]
                    if through is None:
                        break
                assert exported == expected, (query, limit)


# --- messages not final: from the oldest day that holds one ----------------------------------


async def test_messages_made_days_ago_not_final_are_found_from_the_oldest_day_holding_one(
    database_url: str, schema: str
) -> None:
    """The promotion and the Scheduler's pages read the day partitions from the oldest that
    holds a message of their status (partitions.oldest_day_holding), not all of the
    retention's: a message scheduled six days ago and due now is promoted, and one queued five
    days ago is paged, each found in its day; days without one are left out."""
    async with open_database(database_url, schema) as db:
        store = PgStore(db)
        account = await store_account(store)
        today = datetime.now(UTC).date()
        for back in range(2, 10):
            await add_day(db, today - timedelta(days=back))

        async def since(status: str) -> int:
            return await db.run(lambda c: oldest_day_holding(c, day_number(today), [status]))

        # None of either: from yesterday.
        assert await since(SCHEDULED) == await since(PENDING) == day_number(today) - 1
        made = midnight() - 6 * DAY_S + 3_600
        due = msgspec.structs.replace(message(account.id, made), send_at=time.time() - 1)
        later = msgspec.structs.replace(message(account.id, made + 60), send_at=time.time() + 600)
        queued = message(account.id, made + DAY_S)
        assert await accept(store, [due, later, queued]) == [(True, None)] * 3
        assert await since(SCHEDULED) == day_number(today) - 6
        assert await since(PENDING) == day_number(today) - 5

        [page] = await store.page_entries(
            [(stream_key(account.id, shard_of(account.id)), (-1, ""), 10)]
        )
        assert [message_id for _, message_id, _ in page] == [queued.id]
        promoted = await store.promote_due(None, time.time(), 100, 100)
        assert [m.id for m in promoted.messages] == [due.id]
        assert promoted.next_due == pytest.approx(later.send_at, abs=1e-3)
        assert await since(PENDING) == day_number(today) - 6  # the promoted one is queued
