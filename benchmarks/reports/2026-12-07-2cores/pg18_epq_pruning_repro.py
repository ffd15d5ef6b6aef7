"""PostgreSQL 18.6: a statement's run-time partition pruning goes wrong after an EvalPlanQual
re-check of its own FOR UPDATE, with a generic plan.

    REPRO_URL=postgresql://... python pg18_epq_pruning_repro.py

Makes schema `repro` (a table `acc`, a table `msg` range-partitioned in three), then runs two
statements ten times each on a session with plan_cache_mode = force_generic_plan, while another
session changes the locked account row and commits during the statement's wait for the lock:

- "lock in the statement": a MATERIALIZED CTE with FOR UPDATE, then a CTE that joins `msg` per
  row (run-time pruning by the join, initial pruning by a parameter). PostgreSQL 18.6 returns
  n = 0 (286 is right); PostgreSQL 15 returns 286. With custom plans, or no concurrent change:
  286.
- "lock by function, UPDATE after": the lock in a PL/pgSQL function (a query of its own), the
  same probe, then an UPDATE of the account (its re-check comes after the pruning): 286.

The gateway's ONE_STATEMENT (storage/commit_sql.py) took the second shape (migration 021).
"""

from __future__ import annotations

import asyncio
import os

SETUP = """
DROP SCHEMA IF EXISTS repro CASCADE; CREATE SCHEMA repro;
CREATE TABLE repro.acc (id int PRIMARY KEY, balance int);
INSERT INTO repro.acc SELECT g, 0 FROM generate_series(1, 10) g;
CREATE TABLE repro.msg (id int, v int) PARTITION BY RANGE (id);
CREATE TABLE repro.msg_1 PARTITION OF repro.msg FOR VALUES FROM (0) TO (1000);
CREATE TABLE repro.msg_2 PARTITION OF repro.msg FOR VALUES FROM (1000) TO (2000);
CREATE TABLE repro.msg_3 PARTITION OF repro.msg FOR VALUES FROM (2000) TO (3000);
CREATE INDEX ON repro.msg (id);
INSERT INTO repro.msg SELECT g, 0 FROM generate_series(0, 2999) g;
ANALYZE repro.acc, repro.msg;
CREATE FUNCTION repro.lock_acc(ids int[]) RETURNS TABLE (id int, balance int)
LANGUAGE plpgsql VOLATILE ROWS 10 AS $$
BEGIN
    RETURN QUERY SELECT a.id, a.balance FROM repro.acc a WHERE a.id = ANY ($1)
                 ORDER BY a.id FOR UPDATE;
END $$;
"""

# The probe: each id's row in `msg`, the partitions chosen per id (run-time pruning) within
# those of `id >= $3` (initial pruning): 286 of the ids are 1000 or more.
_PROBE = """
    SELECT count(*) AS n FROM unnest($2::int[]) AS x(id)
    CROSS JOIN LATERAL (SELECT m.v FROM repro.msg m
                        WHERE m.id = x.id AND m.id >= $3::int LIMIT 1) m
    WHERE (SELECT ok FROM ok)"""

STATEMENTS = {
    "lock in the statement": f"""
WITH locked AS MATERIALIZED (
    SELECT a.id, a.balance FROM repro.acc a WHERE a.id = ANY($1::int[]) ORDER BY a.id FOR UPDATE
), ok AS (SELECT count(*) > 0 AS ok FROM locked
), probe AS ({_PROBE}
)
SELECT (SELECT n FROM probe)
""",
    "lock by function, UPDATE after": f"""
WITH locked AS MATERIALIZED (SELECT * FROM repro.lock_acc($1::int[])
), ok AS (SELECT count(*) > 0 AS ok FROM locked
), probe AS MATERIALIZED ({_PROBE}
), updated AS (
    UPDATE repro.acc a SET balance = a.balance + (SELECT n FROM probe)
    WHERE a.id = ANY($1::int[]) RETURNING a.id
)
SELECT (SELECT n FROM probe), (SELECT count(*) FROM updated)
""",
}


async def main() -> None:
    import asyncpg

    url = os.environ["REPRO_URL"]
    setup = await asyncpg.connect(url)
    await setup.execute(SETUP)
    await setup.close()
    for name, statement in STATEMENTS.items():
        other = await asyncpg.connect(url)
        node = await asyncpg.connect(url)
        await node.execute(
            "SET enable_hashjoin = off; SET enable_mergejoin = off;"
            " SET plan_cache_mode = force_generic_plan"
        )
        found = []
        for _ in range(10):
            change = other.transaction()
            await change.start()
            await other.execute("UPDATE repro.acc SET balance = balance + 1 WHERE id = 1")
            waiting = asyncio.ensure_future(
                node.fetchval(statement, [1], [*range(0, 3000, 7)], 1000)
            )
            await asyncio.sleep(0.05)  # the statement has its snapshot and waits for the lock
            await change.commit()
            found.append(await waiting)
        print(f"{name}: n = {found} (286 is right)")
        await other.close()
        await node.close()


if __name__ == "__main__":
    asyncio.run(main())
