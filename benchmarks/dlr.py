"""Delivery report ingest: reports per second through POST /v1/dlr/{operator}, in batches.

    python benchmarks/dlr.py [--reports 200000] [--batch 5000] [--connections 6]
                             [--out benchmarks/reports/latest]

`smsgw serve` (one node, its own process) on a fresh schema, with a DLR key for operator
`bench`. `--reports` messages are written straight into PostgreSQL as `sent` through operator
`bench` (the set-up, not measured), then a load process of its own (this script with `--load`,
127.0.0.1 only) POSTs their delivery reports in batches of `--batch` (95% delivered, 5%
undelivered; `--unknown` of them name no message) over `--connections` keep-alive
connections, each report once, until all are sent or `--max-seconds` pass. Afterwards the
messages table is counted: every `applied` report must have moved its message.

Prints one JSON object and writes dlr.json and dlr.md into the out folder. The target (10,000
reports/s) is reported, not enforced; exit code 1 when a request failed or the table does not
agree with the answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import psutil

from common import (
    LOOPBACK,
    REPO_ROOT,
    CpuMeter,
    database,
    drop_schema,
    exit_on_sigterm,
    fresh_schema,
    gateway_command,
    gateway_env,
    git_commit,
    git_dirty,
    log,
    markdown_table,
    new_admin_key,
    run_server,
    stop_process,
    utc_timestamp,
    write_report,
)

TARGET_PER_S = 10_000
OPERATOR = "bench"
PEER_GATEWAY_PER_S = 1_482  # measured by a peer gateway on this kind of machine (the issue)


# --- the load process ---------------------------------------------------------------------


def load_main(args: argparse.Namespace) -> int:
    """POST every report once, `connections` requests in flight; print one JSON line."""
    import httpx
    import trio

    if not args.url.startswith(f"http://{LOOPBACK}:"):
        raise SystemExit(f"load only targets {LOOPBACK}")
    total, batch = args.reports, args.batch
    unknown_every = round(1 / args.unknown) if args.unknown > 0 else 0

    def report(i: int) -> dict[str, Any]:
        if unknown_every and i % unknown_every == 0:
            return {"operator_message_id": f"nobody-{i}", "status": "delivered"}
        if i % 20 == 0:
            return {"operator_message_id": f"b-{i}", "status": "undelivered", "error": "expired"}
        return {"operator_message_id": f"b-{i}", "status": "delivered"}

    bodies = [
        json.dumps(
            {"reports": [report(i) for i in range(start, min(total, start + batch))]}
        ).encode()
        for start in range(0, total, batch)
    ]
    latencies: list[float] = []
    results: dict[str, int] = {}
    failures: list[str] = []
    sent_reports = 0
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}

    async def main() -> float:
        nonlocal sent_reports
        queue = list(reversed(bodies))
        limits = httpx.Limits(max_connections=args.connections)
        async with httpx.AsyncClient(base_url=args.url, timeout=60, limits=limits) as client:

            async def worker() -> None:
                nonlocal sent_reports
                while queue:
                    body = queue.pop()
                    started = time.perf_counter()
                    response = await client.post(
                        f"/v1/dlr/{OPERATOR}", content=body, headers=headers
                    )
                    latencies.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                    answer = response.json()
                    for name, n in answer["counts"].items():
                        results[name] = results.get(name, 0) + n
                    sent_reports += len(answer["results"])

            started = time.perf_counter()
            with trio.move_on_after(args.max_seconds):
                async with trio.open_nursery() as nursery:
                    for _ in range(args.connections):
                        nursery.start_soon(worker)
            return time.perf_counter() - started

    elapsed = trio.run(main)
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 1)

    print(
        json.dumps(
            {
                "reports": sent_reports,
                "requests": len(latencies),
                "elapsed_s": round(elapsed, 3),
                "reports_per_s": round(sent_reports / elapsed, 1) if elapsed else 0.0,
                "results": results,
                "failures": failures[:10],
                "failed_requests": len(failures),
                "request_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            }
        )
    )
    return 0


# --- set-up and the report ----------------------------------------------------------------


def seed(url: str, schema: str, count: int) -> float:
    """`count` messages of one account, `sent` through operator `bench` as b-0, b-1, ...; the
    tables exist (the gateway migrated them). Returns the seconds it took."""

    async def run() -> float:
        conn = await asyncpg.connect(url)
        started = time.perf_counter()
        try:
            await conn.execute(f"SET search_path TO {schema}")
            account = await conn.fetchval(
                "INSERT INTO accounts (name, key_hash, balance, topped_up, captured)"
                " VALUES ('dlr-bench', $1, 0, $2, $2) RETURNING id",
                os.urandom(32),
                count * 5,
            )
            await conn.execute(
                "INSERT INTO messages (id, account_id, recipient, sender, body, segments, price,"
                " express, status, attempts, operator, operator_message_id, created_at,"
                " updated_at)"
                " SELECT uuid7_at(now() - interval '1 hour' + i * interval '1 ms'), $1,"
                " '+49151' || lpad(i::text, 8, '0'), 'bench',"
                " 'hello', 1, 5, false, 'sent', 1, $2, 'b-' || i,"
                " now() - interval '1 hour' + i * interval '1 ms', now()"
                " FROM generate_series(0, $3 - 1) AS i",
                account,
                OPERATOR,
                count,
            )
            await conn.execute("ANALYZE messages")
        finally:
            await conn.close()
        return time.perf_counter() - started

    return asyncio.run(run())


def postgres_cpu_s() -> float:
    """User + system CPU seconds of every postgres process of this machine's (the embedded
    server's backends and background workers; with DATABASE_URL, of whichever server runs
    here). Processes it may not read count nothing."""
    total = 0.0
    for process in psutil.process_iter(["name", "cpu_times"]):
        name, times = process.info["name"], process.info["cpu_times"]
        if name is not None and name.startswith("postgres") and times is not None:
            total += times.user + times.system
    return total


def count_statuses(url: str, schema: str) -> dict[str, int]:
    async def run() -> dict[str, int]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                f"SELECT status, count(*) AS n FROM {schema}.messages GROUP BY status"
            )
            kept = await conn.fetchval(f"SELECT count(*) FROM {schema}.dlr_unmatched")
        finally:
            await conn.close()
        return {**{r["status"]: int(r["n"]) for r in rows}, "dlr_unmatched": int(kept)}

    return asyncio.run(run())


def bench(args: argparse.Namespace) -> dict[str, Any]:
    admin_key = new_admin_key()
    dlr_key = "dlr_" + os.urandom(16).hex()
    with tempfile.TemporaryDirectory(prefix="smsgw-dlr-bench-") as tmp:
        work = Path(tmp)
        with database(work) as (url, source):
            schema = fresh_schema("dlr")
            env = {**gateway_env(url, schema, admin_key), "SMSGW_DLR_KEYS": f"{OPERATOR}={dlr_key}"}
            try:
                with run_server(gateway_command(), log_path=work / "gateway.log", env=env) as gw:
                    log(f"seeding {args.reports:,} sent messages")
                    seed_s = seed(url, schema, args.reports)
                    log(f"seeded in {seed_s:.1f} s; posting reports from a load process")
                    meter = CpuMeter(gw.process.pid)
                    command = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--load",
                        "--url",
                        gw.url,
                        "--key",
                        dlr_key,
                        "--reports",
                        str(args.reports),
                        "--batch",
                        str(args.batch),
                        "--connections",
                        str(args.connections),
                        "--unknown",
                        str(args.unknown),
                        "--max-seconds",
                        str(args.max_seconds),
                    ]
                    meter.start()
                    pg_before = postgres_cpu_s()
                    process = subprocess.Popen(
                        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
                    )
                    try:
                        stdout, _ = process.communicate(timeout=args.max_seconds + 60)
                    finally:
                        stop_process(process, grace=5)
                    cpu = meter.stop()
                    pg_cpu_s = postgres_cpu_s() - pg_before
                    load = json.loads(stdout.strip().splitlines()[-1])
                    statuses = count_statuses(url, schema)
            finally:
                drop_schema(url, schema)
    applied = load["results"].get("applied", 0)
    moved = statuses.get("delivered", 0) + statuses.get("undelivered", 0)
    agrees = moved == applied and statuses.get("dlr_unmatched", 0) == load["results"].get(
        "unknown", 0
    )
    return {
        "benchmark": "dlr",
        "at": utc_timestamp(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "cores": os.cpu_count(),
        "note": (
            "2-core machine shared with other work (other sessions' tests and benchmarks ran"
            " at the same time); figures are indicative, and lower than on an idle machine."
        ),
        "database": source,
        "settings": {
            "reports": args.reports,
            "batch": args.batch,
            "connections": args.connections,
            "unknown_share": args.unknown,
        },
        "reports_per_s": load["reports_per_s"],
        "target_per_s": TARGET_PER_S,
        "meets_target": load["reports_per_s"] >= TARGET_PER_S,
        "peer_gateway_per_s": PEER_GATEWAY_PER_S,
        "load": load,
        "cpu": msgspec.to_builtins(cpu),
        # CPU the database and the gateway spent per report: what one core each could do on an
        # idle machine, whatever share of the shared one they got.
        "postgres_cpu_s": round(pg_cpu_s, 2),
        "reports_per_postgres_cpu_s": round(load["reports"] / pg_cpu_s) if pg_cpu_s else None,
        "reports_per_gateway_cpu_s": (
            round(load["reports"] / (cpu.server / 100 * cpu.wall_s)) if cpu.server else None
        ),
        "table": statuses,
        "table_agrees": agrees,
        "ok": agrees and load["failed_requests"] == 0,
    }


def markdown(result: dict[str, Any]) -> str:
    load = result["load"]
    rows = [
        ["reports/s", f"{result['reports_per_s']:,.0f}", f"target {TARGET_PER_S:,}"],
        ["reports", f"{load['reports']:,}", f"in {load['requests']} requests"],
        ["request p50 / p99 ms", f"{load['request_ms']['p50']} / {load['request_ms']['p99']}", ""],
        ["results", json.dumps(load["results"]), ""],
        ["table agrees", str(result["table_agrees"]), json.dumps(result["table"])],
        [
            "reports per CPU second",
            f"PostgreSQL {result['reports_per_postgres_cpu_s']},"
            f" gateway {result['reports_per_gateway_cpu_s']}",
            "capacity of one core each, had they had it",
        ],
        ["cpu", json.dumps(result["cpu"]), "% of one core (server, load process, machine)"],
    ]
    return (
        f"# DLR ingest ({result['at']}, {result['commit']}, {result['cores']} cores)\n\n"
        + markdown_table(["figure", "value", "note"], rows)
        + f"\n{result['note']}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--connections", type=int, default=6)
    parser.add_argument("--unknown", type=float, default=0.01, help="share of unknown ids")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/reports/latest")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.batch <= 10_000:
        parser.error("--batch must be 1 to 10,000")
    if args.load:
        return load_main(args)
    exit_on_sigterm()
    result = bench(args)
    write_report(args.out, "dlr", result, markdown(result))
    print(json.dumps(result))
    log(
        f"{result['reports_per_s']:,.0f} reports/s (target {TARGET_PER_S:,});"
        f" table agrees: {result['table_agrees']}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
