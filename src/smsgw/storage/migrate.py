"""The schema: the numbered SQL files in storage/migrations, and applying those not yet applied."""

from __future__ import annotations

import re
from importlib import resources

import asyncpg

from smsgw.storage.database import Database
from smsgw.storage.partitions import ADD_AHEAD, DAYS_AHEAD


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every numbered file in storage/migrations, in order."""
    found = []
    for entry in resources.files("smsgw.storage.migrations").iterdir():
        m = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(db: Database) -> list[str]:
    """Apply the migrations not yet applied, and make the day partitions ahead; returns the
    migrations' names. Safe when nodes race: an advisory lock lets one node migrate while the
    others wait."""

    async def _migrate(conn: asyncpg.Connection) -> list[str]:
        applied: list[str] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(727274)")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version int PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, sql in migration_files():
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
                applied.append(name)
            if await conn.fetchval("SELECT to_regclass('day_partitioned') IS NOT NULL"):
                # Today's partitions and the days ahead, so that no node, however long since
                # one held the upkeep duty (engine/upkeep.py), writes to a day without one.
                await conn.fetch(ADD_AHEAD, DAYS_AHEAD)
        return applied

    return await db.run(_migrate)
