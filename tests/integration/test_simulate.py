"""`simulate production-test` on the wall clock: a real node on 127.0.0.1, real PostgreSQL, the
load generator in its own process; at 2% (200 messages from 10 accounts) to stay quick."""

from __future__ import annotations

import asyncio

import asyncpg
import trio

from smsgw.simulate.run import simulate_wall
from smsgw.simulate.scenarios import scenario


async def test_production_test_over_http(database_url: str) -> None:
    s = scenario("production-test", scale=0.02)
    report = await simulate_wall(s, live=False, database=database_url)

    assert [c.name for c in report.checks] == ["health", "ready", "single", "express", "otp"]
    assert all(c.passed for c in report.checks), report.checks
    totals = report.totals
    assert totals["offered"] == 200 + 3  # the load and the three opening sends
    assert totals["accepted"] == totals["offered"]
    assert totals["lost"] == 0 and totals["not_final"] == 0
    assert totals["sent"] + totals["failed"] == totals["accepted"]
    assert report.credit.ok and report.credit.accounts == 10
    assert report.figures["success_rate"] >= 0.999
    assert report.passed, [t for t in report.targets if not t.passed]
    assert report.latency["accept"].count > 0 and report.timeline
    assert await trio.to_thread.run_sync(run_schemas, database_url) == 0


def run_schemas(database_url: str) -> int:
    """How many simulation schemas are left: each run drops its own."""

    async def count() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'sim_production_test_%'"
                )
            )
        finally:
            await conn.close()

    return asyncio.run(count())
