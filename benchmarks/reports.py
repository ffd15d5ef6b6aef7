"""Reports at scale: list pages, summaries and CSV exports of one heavy account, over HTTP.

    python benchmarks/reports.py [--rows 10000000] [--reps 20] [--out benchmarks/reports/latest]

Loads `--rows` messages for one heavy account, plus `--background-rows` (default a fifth of
that) spread over `--background-accounts` other accounts, interleaved in time over `--days`
days, into a fresh schema: migration 001, then COPY (asyncpg, text format, rows generated
here), then the later migrations (so their indexes are built over the loaded table, as an
upgrade would), then the rollups the summary reads rebuilt from the rows (the COPY bypassed the
group commit that keeps them; timed: it is also the repair), then VACUUM ANALYZE. Then it
starts `smsgw serve` on 127.0.0.1 as a subprocess and measures, through the HTTP API with the
heavy account's key, one request at a time (`--reps` repetitions after two warmups; p50
and p99 latency):

  list      first page, a deep page (cursor half way down), status=failed (first and deep),
            to=<one recipient>, express=true, client_ref=<one ref>, one day's range
  summary   one day and the last 30 days, grouped by day and by status; 30 days by day in
            Asia/Tehran, by operator, and with ends inside a 15-minute bucket (the partial
            buckets are scanned)
  export    one day's CSV (a few repetitions: rows/s), then the last 30 days once, sampling
            the gateway's resident memory every 50 ms (peak RSS against the idle baseline)
  drop      the oldest day's partition detached and dropped as retention does, while
            single-message accepts come at 100/s for 8 s (bounded): the drop's seconds and
            the accepts' answers and latency, those overlapping the drop apart

and records EXPLAIN (ANALYZE, BUFFERS) of the main queries, built by the same functions the
gateway uses. The caches are warm (the load just wrote the data), as they are for an account
that is active. PostgreSQL is DATABASE_URL when set, else an embedded server in a temporary
folder. Prints one JSON object on stdout and writes reports.json and reports.md to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from common import (
    LOOPBACK,
    database,
    drop_schema,
    exit_on_sigterm,
    fresh_schema,
    git_commit,
    git_dirty,
    log,
    markdown_table,
    new_admin_key,
    run_gateway,
    utc_timestamp,
    write_report,
)
from smsgw.engine.ports import MessageQuery
from smsgw.http.context import hash_key, new_api_key
from smsgw.http.routes.reports import EXPORT_PAGE, encode_cursor
from smsgw.storage.migrate import migration_files
from smsgw.storage.partitions import drop_partition
from smsgw.storage.reads import EXPORT_SETTINGS, export_page, messages_sql, summary_sql

COLUMNS = (
    "id",
    "account_id",
    "recipient",
    "sender",
    "body",
    "segments",
    "price",
    "express",
    "client_ref",
    "status",
    "reason",
    "attempts",
    "operator",
    "operator_message_id",
    "deadline",
    "created_at",
    "updated_at",
)
RECIPIENTS = 100_000  # distinct numbers: about rows / 100_000 messages each
P_EXPRESS = 0.05
P_FAILED = 0.05
P_CLIENT_REF = 0.10
CHUNK_ROWS = 20_000
SEED = 8
NULL = "\\N"  # COPY text format


# --- the data --------------------------------------------------------------------------------


class Plan:
    """What gets loaded: who sends, how much, over which time span."""

    def __init__(self, args: argparse.Namespace, heavy: int, background: list[int]) -> None:
        self.heavy = heavy
        self.background = background
        self.heavy_rows = args.rows
        self.background_rows = args.background_rows
        self.total = self.heavy_rows + self.background_rows
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.end = now - timedelta(hours=1)
        self.start = self.end - timedelta(days=args.days)
        rnd = random.Random(SEED)
        self.recipients = [f"+4915{n:09d}" for n in rnd.sample(range(10**9), RECIPIENTS)]


def copy_chunks(plan: Plan) -> Iterator[bytes]:
    """The rows in COPY text format, in time order, heavy and background rows interleaved
    evenly (so the heavy account's rows are spread over the heap, as in real life)."""
    rnd = random.Random(SEED + 1)
    start = plan.start.timestamp()
    step = (plan.end.timestamp() - start) / plan.total
    share = plan.heavy_rows / plan.total
    recipients = plan.recipients
    background = plan.background
    bodies = [f"Your order {n} has shipped and will arrive tomorrow." for n in range(997)]
    codes = [f"Your code is {n:06d}" for n in range(1009)]
    last_second = -1
    second_text = ""
    lines: list[str] = []
    for k in range(plan.total):
        at = start + k * step
        heavy = int((k + 1) * share) > int(k * share)
        account = plan.heavy if heavy else background[rnd.randrange(len(background))]
        second = int(at)
        if second != last_second:
            second_text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            last_second = second
        micros = min(999_999, int((at - second) * 1_000_000))
        stamp = f"{second_text}.{micros:06d}+00"
        bits = rnd.getrandbits(64)
        ms = second * 1000 + micros // 1000
        message_id = f"{ms:012x}7{bits & 0xFFF:03x}{8 | (bits >> 12) & 3:x}{bits >> 14:015x}"
        roll = rnd.random()
        express = roll < P_EXPRESS
        failed = rnd.random() < P_FAILED
        segments = 2 if roll > 0.85 else 1
        price = segments * (7 if express else 5)
        body = codes[k % 1009] if express else bodies[k % 997]
        client_ref = f"ref-{k}" if rnd.random() < P_CLIENT_REF else NULL
        if failed:
            outcome = f"failed\tunknown_subscriber\t1\tsim\t{NULL}"
        else:
            outcome = f"sent\t{NULL}\t1\tsim\tsim-{k}"
        lines.append(
            f"{message_id}\t{account}\t{recipients[rnd.randrange(RECIPIENTS)]}\tShop\t{body}\t"
            f"{segments}\t{price}\t{'t' if express else 'f'}\t{client_ref}\t{outcome}\t"
            f"{NULL}\t{stamp}\t{stamp}\n"
        )
        if len(lines) == CHUNK_ROWS:
            yield "".join(lines).encode()
            lines.clear()
    if lines:
        yield "".join(lines).encode()


async def _source(plan: Plan, progress_every: int) -> AsyncIterator[bytes]:
    done = 0
    started = time.monotonic()
    for chunk in copy_chunks(plan):
        yield chunk
        done += CHUNK_ROWS
        if done % progress_every < CHUNK_ROWS:
            rate = done / (time.monotonic() - started)
            log(f"  {min(done, plan.total):,} / {plan.total:,} rows ({rate:,.0f} rows/s)")
        await asyncio.sleep(0)


async def connect(url: str, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, server_settings={"search_path": schema})


async def apply_migrations(conn: asyncpg.Connection, versions: Sequence[int]) -> list[str]:
    """The gateway's migrations, applied as `smsgw.storage.migrate.migrate` does, but only these."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version int PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    applied = []
    for version, name, sql in migration_files():
        if version in versions:
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            applied.append(name)
    return applied


async def load(url: str, schema: str, args: argparse.Namespace) -> tuple[Plan, str, dict]:
    """Create the schema and load it; returns the plan, the heavy account's API key and the
    timings of each step."""
    timings: dict[str, float] = {}
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    conn = await connect(url, schema)
    try:
        await apply_migrations(conn, [1])
        heavy_key = new_api_key()
        heavy = await conn.fetchval(
            "INSERT INTO accounts (name, key_hash, balance, topped_up)"
            " VALUES ('heavy', $1, 1000000000, 1000000000) RETURNING id",
            hash_key(heavy_key),
        )
        background = [
            await conn.fetchval(
                "INSERT INTO accounts (name, key_hash, balance, topped_up)"
                " VALUES ($1, $2, 1000000, 1000000) RETURNING id",
                f"background-{i}",
                hash_key(new_api_key()),
            )
            for i in range(args.background_accounts)
        ]
        plan = Plan(args, heavy, background)
        log(
            f"loading {plan.total:,} rows ({plan.heavy_rows:,} for the heavy account) over"
            f" {args.days} days with COPY"
        )
        started = time.monotonic()
        await conn.copy_to_table(
            "messages",
            source=_source(plan, max(CHUNK_ROWS, plan.total // 20)),
            columns=list(COLUMNS),
            format="text",
        )
        timings["copy_s"] = round(time.monotonic() - started, 1)
        timings["copy_rows_per_s"] = round(plan.total / timings["copy_s"])
        log(f"copied in {timings['copy_s']} s; applying the later migrations (index builds)")
        started = time.monotonic()
        await conn.execute("SET maintenance_work_mem = '1GB'")
        later = [v for v, _, _ in migration_files() if v > 1]
        await apply_migrations(conn, later)
        timings["later_migrations_s"] = round(time.monotonic() - started, 1)
        log(f"migrated in {timings['later_migrations_s']} s; rebuilding the rollups")
        started = time.monotonic()
        await conn.fetchval("SELECT smsgw_rollup_rebuild(NULL)")
        timings["rollup_rebuild_s"] = round(time.monotonic() - started, 1)
        log(f"rebuilt in {timings['rollup_rebuild_s']} s; VACUUM ANALYZE")
        started = time.monotonic()
        await conn.execute("VACUUM (ANALYZE) messages")
        await conn.execute("VACUUM (ANALYZE) accounts")
        await conn.execute("VACUUM (ANALYZE) message_rollups")
        timings["vacuum_analyze_s"] = round(time.monotonic() - started, 1)
    finally:
        await conn.close()
    return plan, heavy_key, timings


async def sizes(url: str, schema: str) -> dict[str, Any]:
    conn = await connect(url, schema)
    try:
        # Day partitions (migration 019) summed under their parent: the table, each index
        # (the per-day client_ref indexes as messages_DAY_client_ref).
        rows = await conn.fetch(
            "SELECT coalesce(p.relname, regexp_replace(c.relname, '^messages_[0-9]{8}_',"
            " 'messages_DAY_')) AS name, sum(pg_relation_size(c.oid))::int8 AS bytes"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_inherits i ON i.inhrelid = c.oid"
            " LEFT JOIN pg_class p ON p.oid = i.inhparent"
            " WHERE n.nspname = $1 AND (c.relname LIKE 'messages%'"
            " OR c.relname LIKE 'message_rollups%') AND c.relkind IN ('r', 'i')"
            " GROUP BY 1 ORDER BY 1",
            schema,
        )
        # Heap, TOAST and every index of every partition.
        stored = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
            " WHERE inhparent = 'messages'::regclass"
        )
        counts = await conn.fetchrow(
            "SELECT count(*) AS total, count(*) FILTER (WHERE account_id = "
            " (SELECT id FROM accounts WHERE name = 'heavy')) AS heavy FROM messages"
        )
        settings = await conn.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name IN"
            " ('shared_buffers', 'work_mem', 'effective_cache_size', 'server_version',"
            " 'max_parallel_workers_per_gather', 'random_page_cost')"
        )
    finally:
        await conn.close()
    per_message = int(stored) / max(1, counts["total"])
    return {
        "relations_mb": {r["name"]: round(r["bytes"] / 2**20, 1) for r in rows},
        "bytes_per_message": round(per_message),
        # At the target of 100M messages a day, kept 30 days.
        "gb_per_day_at_100m": round(per_message * 100e6 / 1e9, 1),
        "tb_per_30_days_at_100m": round(per_message * 100e6 * 30 / 1e12, 2),
        "rows_total": counts["total"],
        "rows_heavy": counts["heavy"],
        "postgres": {r["name"]: r["setting"] + (r["unit"] or "") for r in settings},
    }


async def deep_position(url: str, schema: str, account_id: int, offset: int, status: str | None):
    conn = await connect(url, schema)
    try:
        where = "account_id = $1" + (" AND status = $3" if status else "")
        args: list[Any] = [account_id, offset] + ([status] if status else [])
        row = await conn.fetchrow(
            f"SELECT created_at, id::text FROM messages WHERE {where}"
            " ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
            *args,
        )
        return row["created_at"], row["id"]
    finally:
        await conn.close()


async def one_of(url: str, schema: str, sql: str, *args: Any) -> Any:
    conn = await connect(url, schema)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def explain(url: str, schema: str, sql: str, args: Sequence[Any]) -> str:
    conn = await connect(url, schema)
    try:
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


async def explain_export_page(url: str, schema: str, account_id: int, query: MessageQuery) -> str:
    """The CSV query of an export page as the export runs it (storage/reads.py's export_page,
    under its settings)."""
    conn = await connect(url, schema)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(EXPORT_SETTINGS)
            sql, args, _ = await export_page(conn, account_id, query)
            rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


# --- measuring -------------------------------------------------------------------------------


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {
        "p50": round(statistics.median(ordered), 2),
        "p99": at(0.99),
        "max": round(ordered[-1], 2),
        "n": len(ordered),
    }


def timed_get(client: httpx.Client, path: str, params: dict[str, Any], reps: int) -> dict:
    samples = []
    items = None
    for i in range(reps + 2):
        started = time.perf_counter()
        r = client.get(path, params=params)
        elapsed = (time.perf_counter() - started) * 1000
        if r.status_code != 200:
            raise RuntimeError(f"{path} {params}: {r.status_code} {r.text[:300]}")
        if i >= 2:  # two warmups
            samples.append(elapsed)
        body = r.json()
        items = len(body["items"]) if "items" in body else len(body.get("groups", []))
    return {**percentiles(samples), "items": items}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextmanager
def rss_sampler(pid: int, every: float = 0.05) -> Iterator[dict[str, int]]:
    """Peak resident memory of `pid` while the block runs."""
    found = {"baseline_kb": rss_kb(pid), "peak_kb": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                found["peak_kb"] = max(found["peak_kb"], rss_kb(pid))
            except OSError:
                return
            stop.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()


def export(client: httpx.Client, params: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    lines = 0
    size = 0
    with client.stream("GET", "/v1/messages/export", params=params) as r:
        if r.status_code != 200:
            raise RuntimeError(f"export: {r.status_code}")
        for chunk in r.iter_bytes():
            lines += chunk.count(b"\n")
            size += len(chunk)
    seconds = time.perf_counter() - started
    rows = lines - 1  # the header; no text in the loaded data holds a newline
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "mb": round(size / 2**20, 1),
    }


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


# --- dropping a day under load ------------------------------------------------------------------

DROP_LOAD_RATE = 100  # single-message accepts a second while the oldest day is dropped
DROP_LOAD_S = 8.0  # how long they are sent; the drop starts DROP_AFTER_S into it
DROP_AFTER_S = 3.0


async def drop_oldest_day(url: str, schema: str) -> dict[str, Any]:
    """Detach and drop the oldest day partition of `messages`, as retention does
    (storage/partitions.py: the same statements, under the same lock timeout)."""
    conn = await connect(url, schema)
    try:
        part = await conn.fetchval(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'messages'::regclass ORDER BY c.relname LIMIT 1"
        )
        rows = await conn.fetchval(f'SELECT count(*) FROM "{part}"')
        pending = await conn.fetchval(
            "SELECT pending FROM day_partitioned WHERE parent = 'messages'"
        )
        started = time.perf_counter()
        attempts, dropped = 0, False
        while attempts < 5:  # as the next upkeep rounds would, after a lock timeout
            attempts += 1
            try:
                dropped = await drop_partition(conn, parent="messages", part=part, pending=pending)
                break
            except asyncpg.LockNotAvailableError:
                continue
        return {
            "partition": part,
            "rows": rows,
            "dropped": dropped,
            "attempts": attempts,
            "seconds": round(time.perf_counter() - started, 3),
        }
    finally:
        await conn.close()


def drop_under_load(client: httpx.Client, url: str, schema: str, stop_at: float) -> dict[str, Any]:
    """Single-message accepts at DROP_LOAD_RATE a second for DROP_LOAD_S (bounded in count and
    time), the oldest day dropped DROP_AFTER_S into them: how long the drop took, and the
    accepts' answers and latency before, during and after it."""
    answers: list[tuple[float, float, int]] = []  # (sent at, seconds, status)
    done = threading.Event()

    def send() -> None:
        began = time.monotonic()
        for n in range(int(DROP_LOAD_RATE * DROP_LOAD_S)):
            due = began + n / DROP_LOAD_RATE
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if time.monotonic() > stop_at:
                break
            body = {"to": f"+4915{n:09d}", "text": f"during the drop {n}"}
            at = time.monotonic()
            try:
                status = client.post("/v1/messages", json=body).status_code
            except httpx.HTTPError:
                status = 0
            answers.append((at - began, time.monotonic() - at, status))
        done.set()

    sender = threading.Thread(target=send, name="drop-load", daemon=True)
    sender.start()
    time.sleep(DROP_AFTER_S)
    began = time.monotonic() - DROP_AFTER_S
    drop_start = time.monotonic() - began
    drop = asyncio.run(drop_oldest_day(url, schema))
    drop_end = time.monotonic() - began
    done.wait(DROP_LOAD_S + 30)

    def figures(selected: list[tuple[float, float, int]]) -> dict[str, Any]:
        ms = sorted(seconds * 1000 for _, seconds, _ in selected)
        return {
            "n": len(ms),
            "accepted": sum(1 for *_, status in selected if status == 202),
            "p50_ms": round(ms[len(ms) // 2], 1) if ms else None,
            "max_ms": round(ms[-1], 1) if ms else None,
        }

    # An accept overlaps the drop if it was sent before the drop ended and answered after it
    # began.
    during = [a for a in answers if a[0] < drop_end and a[0] + a[1] > drop_start]
    return {
        **drop,
        "accepts_per_s": DROP_LOAD_RATE,
        "all": figures(answers),
        "during_drop": figures(during),
        "refused": sum(1 for *_, status in answers if status != 202),
    }


def measure(args: argparse.Namespace, url: str, schema: str, plan: Plan, key: str) -> dict:
    heavy = plan.heavy
    deep_at, deep_id = asyncio.run(deep_position(url, schema, heavy, plan.heavy_rows // 2, None))
    deep_failed = asyncio.run(
        deep_position(url, schema, heavy, int(plan.heavy_rows * P_FAILED) // 2, "failed")
    )
    recipient = asyncio.run(
        one_of(
            url,
            schema,
            "SELECT recipient FROM messages WHERE account_id = $1 ORDER BY created_at DESC LIMIT 1",
            heavy,
        )
    )
    client_ref = asyncio.run(
        one_of(
            url,
            schema,
            "SELECT client_ref FROM messages WHERE account_id = $1 AND client_ref IS NOT NULL"
            " ORDER BY created_at LIMIT 1 OFFSET 1000",
            heavy,
        )
    )
    middle = (plan.start + (plan.end - plan.start) / 2).replace(hour=0, minute=0, second=0)
    day = (middle, middle + timedelta(days=1))
    month = (plan.end - timedelta(days=30), plan.end)
    # Ends inside a 15-minute bucket: the rollups' whole buckets plus a scan of each end's part.
    cut = (month[0] + timedelta(minutes=7, seconds=13), month[1] - timedelta(minutes=4))
    deep_cursor = encode_cursor(deep_at, deep_id)
    deep_failed_cursor = encode_cursor(*deep_failed)
    list_cases: dict[str, dict[str, Any]] = {
        "list_first_page": {},
        "list_deep_page": {"cursor": deep_cursor},
        "list_status_failed": {"status": "failed"},
        "list_status_failed_deep": {"status": "failed", "cursor": deep_failed_cursor},
        "list_to_one_recipient": {"to": recipient},
        "list_express": {"express": "true"},
        "list_client_ref": {"client_ref": client_ref},
        "list_one_day": {"created_from": iso(day[0]), "created_to": iso(day[1])},
    }
    summary_cases = {
        "summary_day_by_day": {
            "created_from": iso(day[0]),
            "created_to": iso(day[1]),
            "group_by": "day",
        },
        "summary_day_by_status": {
            "created_from": iso(day[0]),
            "created_to": iso(day[1]),
            "group_by": "status",
        },
        "summary_30_days_by_day": {
            "created_from": iso(month[0]),
            "created_to": iso(month[1]),
            "group_by": "day",
        },
        "summary_30_days_by_status": {
            "created_from": iso(month[0]),
            "created_to": iso(month[1]),
            "group_by": "status",
        },
        "summary_30_days_by_day_tehran": {
            "created_from": iso(month[0]),
            "created_to": iso(month[1]),
            "group_by": "day",
            "tz": "Asia/Tehran",
        },
        "summary_30_days_by_operator": {
            "created_from": iso(month[0]),
            "created_to": iso(month[1]),
            "group_by": "operator",
        },
        "summary_30_days_cut_buckets": {
            "created_from": iso(cut[0]),
            "created_to": iso(cut[1]),
            "group_by": "day",
        },
    }
    admin_key = new_admin_key()
    result: dict[str, Any] = {"latency_ms": {}, "export": {}, "loadavg_1m": {}}
    # Other work on the machine competes with PostgreSQL and the gateway: say how much.
    result["loadavg_1m"]["before"] = round(os.getloadavg()[0], 2)
    with run_gateway(
        url, schema, admin_key=admin_key, log_path=args.out / "gateway_reports.log"
    ) as server:
        pid = server.process.pid
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=600) as client:
            for name, params in list_cases.items():
                result["latency_ms"][name] = timed_get(
                    client, "/v1/messages", {"limit": 100, **params}, args.reps
                )
                log(f"  {name}: {result['latency_ms'][name]}")
            for name, params in summary_cases.items():
                result["latency_ms"][name] = timed_get(
                    client, "/v1/reports/summary", params, args.reps
                )
                log(f"  {name}: {result['latency_ms'][name]}")
            day_params = {"created_from": iso(day[0]), "created_to": iso(day[1])}
            runs = [export(client, day_params) for _ in range(args.export_reps)]
            result["export"]["one_day"] = {
                "rows": runs[0]["rows"],
                "mb": runs[0]["mb"],
                "seconds": [r["seconds"] for r in runs],
                "rows_per_s_median": round(statistics.median(r["rows_per_s"] for r in runs)),
            }
            log(f"  export one day: {result['export']['one_day']}")
            with rss_sampler(pid) as rss:
                big = export(client, {"created_from": iso(month[0]), "created_to": iso(month[1])})
            big.update(
                {
                    "gateway_rss_baseline_mb": round(rss["baseline_kb"] / 1024, 1),
                    "gateway_rss_peak_mb": round(rss["peak_kb"] / 1024, 1),
                }
            )
            result["export"]["30_days"] = big
            log(f"  export 30 days: {big}")
            result["drop_under_load"] = drop_under_load(
                client, url, schema, time.monotonic() + DROP_LOAD_S + 5
            )
            log(f"  the oldest day dropped under load: {result['drop_under_load']}")
    result["loadavg_1m"]["after"] = round(os.getloadavg()[0], 2)

    explain_cases = {
        "list_first_page": MessageQuery(limit=101),
        "list_deep_page": MessageQuery(limit=101, after=(deep_at, deep_id)),
        "list_status_failed_deep": MessageQuery(limit=101, status="failed", after=deep_failed),
        "list_to_one_recipient": MessageQuery(limit=101, to=recipient),
        "list_express": MessageQuery(limit=101, express=True),
    }
    plans = {}
    for name, query in explain_cases.items():
        sql, sql_args = messages_sql(heavy, query)
        plans[name] = asyncio.run(explain(url, schema, sql, sql_args))
    export_query = MessageQuery(
        limit=EXPORT_PAGE,
        created_from=month[0],
        created_to=month[1],
        after=(deep_at, deep_id),
        ascending=True,
    )
    plans["export_page"] = asyncio.run(explain_export_page(url, schema, heavy, export_query))
    for name, (lo, hi, group_by) in {
        "summary_day_by_status": (day[0], day[1], "status"),
        "summary_30_days_by_day": (month[0], month[1], "day"),
        "summary_30_days_cut_buckets": (cut[0], cut[1], "day"),
    }.items():
        sql, sql_args = summary_sql(heavy, lo, hi, group_by)
        plans[name] = asyncio.run(explain(url, schema, sql, sql_args))
    result["explain"] = plans
    result["ranges"] = {
        "data": [iso(plan.start), iso(plan.end)],
        "day": [iso(day[0]), iso(day[1])],
        "30_days": [iso(month[0]), iso(month[1])],
        "30_days_cut_buckets": [iso(cut[0]), iso(cut[1])],
    }
    return result


# --- report ----------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    drop = result["drop_under_load"]
    lines = [
        "# Reports benchmark",
        "",
        f"{result['started_at']}, commit {result['commit']}"
        + (" (dirty tree)" if result["dirty"] else "")
        + f", PostgreSQL: {result['database']}. Heavy account: {result['rows_heavy']:,} rows;"
        f" all accounts: {result['rows_total']:,} rows over {result['days']} days."
        f" Load average (1 min) before and after measuring: {result['loadavg_1m']['before']},"
        f" {result['loadavg_1m']['after']} (on {os.cpu_count()} cores).",
        "",
        "Load: "
        + ", ".join(f"{k} {v}" for k, v in result["load"].items())
        + ". Sizes (MB): "
        + ", ".join(f"{k} {v}" for k, v in result["sizes"]["relations_mb"].items())
        + f". Stored per message (heap, TOAST, indexes): {result['sizes']['bytes_per_message']}"
        f" bytes; at 100M a day {result['sizes']['gb_per_day_at_100m']} GB a day,"
        f" {result['sizes']['tb_per_30_days_at_100m']} TB for 30 days.",
        "",
        "## Latency over HTTP, one request at a time (ms)",
        "",
        markdown_table(
            ["case", "p50", "p99", "max", "n", "items/groups"],
            [
                [name, v["p50"], v["p99"], v["max"], v["n"], v["items"]]
                for name, v in result["latency_ms"].items()
            ],
        ),
        "## Export",
        "",
        markdown_table(
            ["range", "rows", "MB", "seconds", "rows/s", "gateway RSS baseline → peak (MB)"],
            [
                [
                    "one day",
                    result["export"]["one_day"]["rows"],
                    result["export"]["one_day"]["mb"],
                    result["export"]["one_day"]["seconds"],
                    result["export"]["one_day"]["rows_per_s_median"],
                    "",
                ],
                [
                    "30 days",
                    result["export"]["30_days"]["rows"],
                    result["export"]["30_days"]["mb"],
                    result["export"]["30_days"]["seconds"],
                    result["export"]["30_days"]["rows_per_s"],
                    f"{result['export']['30_days']['gateway_rss_baseline_mb']} →"
                    f" {result['export']['30_days']['gateway_rss_peak_mb']}",
                ],
            ],
        ),
        "## The oldest day dropped under load",
        "",
        f"`{drop['partition']}` ({drop['rows']:,} rows): dropped {drop['dropped']} in"
        f" {drop['seconds']} s ({drop['attempts']} attempt(s)), while single-message accepts came"
        f" at {drop['accepts_per_s']}/s: all {drop['all']}; those overlapping the drop"
        f" {drop['during_drop']}; refused {drop['refused']}.",
        "",
        "## Query plans (EXPLAIN (ANALYZE, BUFFERS), heavy account)",
        "",
    ]
    for name, text in result["explain"].items():
        lines += [f"### {name}", "", "```", text, "```", ""]
    lines += ["PostgreSQL settings: " + str(result["sizes"]["postgres"]), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="heavy account's rows")
    parser.add_argument("--background-rows", type=int, default=None)
    parser.add_argument("--background-accounts", type=int, default=200)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--export-reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports/latest"))
    parser.add_argument("--keep-schema", action="store_true", help="do not drop the schema")
    args = parser.parse_args(argv)
    if args.background_rows is None:
        args.background_rows = args.rows // 5
    if args.rows < 10_000 or args.days < 31 or args.reps < 1 or args.background_accounts < 1:
        parser.error("needs --rows >= 10000, --days >= 31, --reps >= 1, --background-accounts >= 1")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    started_at = utc_timestamp()
    with (
        tempfile.TemporaryDirectory(prefix="smsgw-bench-reports-") as tmp,
        database(Path(tmp)) as (url, source),
    ):
        schema = fresh_schema("reports")
        try:
            plan, key, timings = asyncio.run(load(url, schema, args))
            found = asyncio.run(sizes(url, schema))
            log(f"loaded: {found}")
            measured = measure(args, url, schema, plan, key)
        finally:
            if not args.keep_schema:
                drop_schema(url, schema)
    result = {
        "benchmark": "reports",
        "started_at": started_at,
        "commit": git_commit(),
        "dirty": git_dirty(),
        "database": source,
        "host": LOOPBACK,
        "rows_heavy": found["rows_heavy"],
        "rows_total": found["rows_total"],
        "background_accounts": args.background_accounts,
        "days": args.days,
        "reps": args.reps,
        "load": timings,
        "sizes": found,
        **measured,
    }
    path = write_report(args.out, "reports", result, markdown(result))
    log(f"report: {path} and {path.with_suffix('.md')}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
