"""The exact way's refusals (commit_sql.REFUSALS), prepared on a day partition holding SMALL
rows (0: empty, as the migration's ANALYZE leaves it), then run for a group of 1,000 messages
once the day has 190,000 more. With a generic plan made on the empty day: a scan of the whole
partition for each of the 1,000 recipients.

    SMALL=0 python plan_made_on_an_empty_day.py URL force_generic_plan    # 16.5 s (PG 18.6)
    SMALL=400 python plan_made_on_an_empty_day.py URL force_generic_plan  # 6 ms
    SMALL=0 python plan_made_on_an_empty_day.py URL force_custom_plan     # 6 ms

Makes and drops a schema of its own in the database at URL.
"""

import asyncio
import os
import random
import sys
import time

import asyncpg

from smsgw.engine.messages import OutboundSms
from smsgw.http.context import uuid7
from smsgw.storage import commit_sql
from smsgw.storage.commit_sql import GroupBounds
from smsgw.storage.migrate import migration_files

ACCOUNTS = """
INSERT INTO accounts (id, name, key_hash, balance, topped_up)
SELECT g, 'a' || g, decode(md5(g::text), 'hex'), 1000000000, 1000000000
FROM generate_series(1, 100) g
"""


def messages(n: int) -> list[OutboundSms]:
    now = time.time()
    return [
        OutboundSms(
            id=uuid7(),
            account_id=random.randint(1, 100),
            to=f"+4479{random.randrange(10**8):08d}",
            sender="S",
            text="x",
            segments=1,
            price=1,
            express=False,
            created_at=now,
        )
        for _ in range(n)
    ]


def literal(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


async def main(url: str, mode: str) -> None:
    conn = await asyncpg.connect(url)
    schema = f"empty_day_{random.randrange(10**9)}"
    await conn.execute(f"CREATE SCHEMA {schema}; SET search_path TO {schema}")
    try:
        for _, _, sql in migration_files():
            await conn.execute(sql)
        await conn.execute(ACCOUNTS)

        async def fill(n: int) -> None:
            records = commit_sql.copy_records(messages(n))
            await conn.copy_records_to_table(
                "messages", records=records, columns=commit_sql.COPY_COLUMNS, schema_name=schema
            )

        small = int(os.environ.get("SMALL", "0"))
        if small:
            await fill(small)
            part = await conn.fetchval("SELECT tableoid::regclass::text FROM messages LIMIT 1")
            await conn.execute(f"ANALYZE {part}")
        await conn.execute("SET statement_timeout = '30s'; SET jit = off")
        await conn.execute(f"SET plan_cache_mode = {mode}")
        await conn.execute(f"PREPARE r AS {commit_sql.REFUSALS}")
        group = messages(1000)
        low, high = GroupBounds.of(group).hour
        args = f"{literal(commit_sql.refusal_keys(group))}, 20, {literal(low)}, {literal(high)}"
        await conn.fetch(f"EXPLAIN EXECUTE r({args})")  # the plan, made now
        await fill(190_000)
        try:
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, SUMMARY ON) EXECUTE r({args})")
            print("\n".join(r[0] for r in plan))
        except asyncpg.QueryCanceledError:
            print("over 30 s")
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
