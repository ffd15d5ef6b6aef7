"""The outage scenario: three simulated operators; A fails every attempt for a while, then B
takes batches and never answers for as long, under steady load with 5% express.

    python benchmarks/outage.py [--outage-s 30] [--rate 200] [--warmup-s 10] [--after-s 20]
                                [--out benchmarks/reports/latest]

Three operator servers (`python -m smsgw.sim.operator_server`, 20 ms median / 80 ms p99, 1%
permanent failures), `smsgw serve --workers 1` sending to them (`--operator-url A=...`, a
2 s attempt timeout), and the load generator in a process of its own offering `--rate`
messages/s (single messages, 5% express) for the whole run: `--warmup-s` normal, A in errors
for `--outage-s` (POST /outage on A), then B in timeouts for `--outage-s`, then `--after-s`
normal. The script polls GET /v1/ops/supervisor every 0.2 s for the breakers. Afterwards, with
every message final, PostgreSQL is read: messages lost (accepted ids not stored or not final),
double charges (captures beyond one per sent message), double sends (the operators' `sent`
counts against the gateway's), express deadline misses, sent/s by phase, and refunds against
the failed messages' prices.

Prints one JSON object and writes outage.json and outage.md into the out folder. Exit code 1
when a message was lost or charged twice, or the refunds do not match.
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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from common import (
    REPO_ROOT,
    CpuMeter,
    create_accounts,
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
    operator_server_command,
    run_server,
    stop_process,
    utc_timestamp,
    write_report,
)
from smsgw.storage.ledger import LEDGER_SQL

OPERATORS = ("A", "B", "C")


def operator_command(name: str, seed: int) -> list[str]:
    return operator_server_command(
        "--name",
        name,
        "--latency-ms-median",
        "20",
        "--latency-ms-p99",
        "80",
        "--p-temporary",
        "0",
        "--p-permanent",
        "0.01",
        "--seed",
        str(seed),
    )


def set_outage(url: str, mode: str | None) -> None:
    httpx.post(f"{url}/outage", json={"mode": mode}, timeout=5).raise_for_status()


def poll_supervisor(
    client: httpx.Client, started: float, timeline: list[dict[str, Any]]
) -> dict[str, Any]:
    tree = client.get("/v1/ops/supervisor").json()
    pool = next(c for c in tree["children"] if c["name"] == "provider_pool")
    at = time.monotonic() - started
    operators = pool["stats"]["operators"]
    timeline.append(
        {
            "t": round(at, 2),
            **{
                name: {
                    "state": o["state"],
                    "inflight": o["inflight"],
                    "error_ratio": o["recent_error_ratio"],
                    "latency_ms": o["recent_latency_ms"],
                    "opens": o["opens"],
                    "last_opened_ago_s": o["last_opened_ago_s"],
                }
                for name, o in operators.items()
            },
        }
    )
    return operators


def first_open_after(timeline: list[dict[str, Any]], name: str, since: float) -> float | None:
    """Seconds from `since` to the breaker of `name` opening, from the polls: the first poll
    after `since` that shows it opened (later than `since`), less how long ago it opened."""
    for row in timeline:
        o = row.get(name)
        if o is None or row["t"] < since or o["last_opened_ago_s"] is None:
            continue
        opened_at = row["t"] - o["last_opened_ago_s"]
        if opened_at >= since - 0.25:  # the polls' resolution
            return round(max(0.0, opened_at - since), 3)
    return None


def closed_again(timeline: list[dict[str, Any]], name: str, since: float) -> float | None:
    for row in timeline:
        o = row.get(name)
        if o is not None and row["t"] >= since and o["state"] == "closed":
            return round(row["t"] - since, 2)
    return None


async def analyse(url: str, schema: str, phases: dict[str, tuple[float, float]]) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"SET search_path TO {schema}")
        status = {
            r["status"]: r["n"]
            for r in await conn.fetch("SELECT status, count(*) AS n FROM messages GROUP BY 1")
        }
        reasons = {
            f"{r['reason']}{' (express)' if r['express'] else ''}": r["n"]
            for r in await conn.fetch(
                "SELECT reason, express, count(*) AS n FROM messages WHERE status = 'failed'"
                " GROUP BY 1, 2"
            )
        }
        by_operator = {
            r["operator"] or "-": r["n"]
            for r in await conn.fetch(
                "SELECT operator, count(*) AS n FROM messages WHERE status = 'sent' GROUP BY 1"
            )
        }
        express = await conn.fetchrow(
            "SELECT count(*) AS n,"
            " count(*) FILTER (WHERE status = 'failed' AND reason = 'deadline_exceeded')"
            "   AS failed_deadline,"
            " count(*) FILTER (WHERE status = 'sent' AND updated_at > deadline) AS sent_late,"
            " count(*) FILTER (WHERE status = 'failed') AS failed"
            " FROM messages WHERE express"
        )
        rates = {}
        for phase, (start, end) in phases.items():
            n = await conn.fetchval(
                "SELECT count(*) FROM messages WHERE status = 'sent'"
                " AND updated_at >= to_timestamp($1) AND updated_at < to_timestamp($2)",
                start,
                end,
            )
            accepted = await conn.fetchval(
                "SELECT count(*) FROM messages"
                " WHERE created_at >= to_timestamp($1) AND created_at < to_timestamp($2)",
                start,
                end,
            )
            rates[phase] = {
                "sent_per_s": round(n / (end - start), 1),
                "accepted_per_s": round(accepted / (end - start), 1),
            }
        ledger = [dict(r) for r in await conn.fetch(LEDGER_SQL)]
    finally:
        await conn.close()
    return {
        "status": status,
        "failed_reasons": reasons,
        "sent_by_operator": by_operator,
        "express": dict(express),
        "rates": rates,
        "ledger": ledger,
    }


async def stored_ids(url: str, schema: str, ids: list[str]) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"SET search_path TO {schema}")
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE status IN ('queued', 'sending'))"
            " AS pending FROM messages WHERE id = ANY($1::uuid[])",
            ids,
        )
    finally:
        await conn.close()
    return int(row["n"]), int(row["pending"])


async def pending(url: str, schema: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                f"SELECT count(*) FROM {schema}.messages WHERE status IN ('queued', 'sending')"
            )
        )
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s offered")
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/reports/latest")
    args = parser.parse_args()
    exit_on_sigterm()
    total = args.warmup_s + 2 * args.outage_s + args.after_s
    if total > 600:
        parser.error("the run is bounded to 600 s")
    admin_key = new_admin_key()
    with tempfile.TemporaryDirectory(prefix="smsgw-outage-") as tmp_name:
        tmp = Path(tmp_name)
        with database(tmp) as (db_url, db_source):
            schema = fresh_schema("outage")
            try:
                result = run(args, tmp, db_url, db_source, schema, admin_key, total)
            finally:
                drop_schema(db_url, schema)
    print(json.dumps(result))
    path = write_report(args.out, "outage", result, markdown(result))
    log(f"report: {path}")
    return 0 if result["ok"] else 1


def run(
    args: argparse.Namespace,
    tmp: Path,
    db_url: str,
    db_source: str,
    schema: str,
    admin_key: str,
    total: float,
) -> dict[str, Any]:
    logs = tmp / "logs"
    servers = []
    with ExitStack() as stack:
        for i, name in enumerate(OPERATORS):
            servers.append(
                stack.enter_context(
                    run_server(operator_command(name, i + 1), log_path=logs / f"op-{name}.log")
                )
            )
        urls = {name: s.url for name, s in zip(OPERATORS, servers, strict=True)}
        gateway_args = [
            *(arg for name in OPERATORS for arg in ("--operator-url", f"{name}={urls[name]}")),
            "--attempt-timeout",
            "2",
        ]
        gateway = stack.enter_context(
            run_server(
                gateway_command(*gateway_args),
                log_path=logs / "gateway.log",
                env=gateway_env(db_url, schema, admin_key),
            )
        )
        keys = create_accounts(gateway.url, admin_key, args.accounts, credit=100_000_000)
        keys_file = tmp / "keys.json"
        keys_file.write_text(json.dumps(keys))
        ids_file = tmp / "ids.txt"
        loadgen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smsgw.sim.loadgen",
                "--url",
                gateway.url,
                "--keys",
                str(keys_file),
                "--connections",
                "32",
                "--duration",
                str(total),
                "--rate",
                str(args.rate),
                "--express-share",
                "0.05",
                "--ids-out",
                str(ids_file),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        cpu = CpuMeter(gateway.process.pid)
        cpu.start()
        started = time.monotonic()
        wall0 = time.time()
        a_start = args.warmup_s
        b_start = a_start + args.outage_s
        b_end = b_start + args.outage_s
        events = [
            (a_start, "A", "errors"),
            (b_start, "A", None),
            (b_start, "B", "timeouts"),
            (b_end, "B", None),
        ]
        timeline: list[dict[str, Any]] = []
        try:
            with httpx.Client(
                base_url=gateway.url,
                headers={"Authorization": f"Bearer {admin_key}"},
                timeout=10,
            ) as client:
                while loadgen.poll() is None and time.monotonic() - started < total + 60:
                    now = time.monotonic() - started
                    while events and events[0][0] <= now:
                        _, name, mode = events.pop(0)
                        log(f"t={now:.1f}s: operator {name} -> {mode or 'normal'}")
                        set_outage(urls[name], mode)
                    poll_supervisor(client, started, timeline)
                    time.sleep(0.2)
                for _, name, mode in events:  # the load ended early: restore the operators
                    set_outage(urls[name], mode)
                stdout, _ = loadgen.communicate(timeout=60)
                load = json.loads(stdout.strip().splitlines()[-1])
                cpu_use = cpu.stop()
                # Every accepted message must end: wait for the retries (bounded), keeping a
                # trickle of polls so the breakers' state is recorded.
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and asyncio.run(pending(db_url, schema)):
                    poll_supervisor(client, started, timeline)
                    time.sleep(0.5)
                final_ops = poll_supervisor(client, started, timeline)
                op_stats = {name: httpx.get(f"{u}/stats").json() for name, u in urls.items()}
        finally:
            stop_process(loadgen, grace=5)
    ids = [line for line in ids_file.read_text().splitlines() if line]
    stored, still_pending = asyncio.run(stored_ids(db_url, schema, ids))
    phases = {
        "before": (wall0 + 2.0, wall0 + a_start),
        "A_errors": (wall0 + a_start, wall0 + b_start),
        "B_timeouts": (wall0 + b_start, wall0 + b_end),
        "after": (wall0 + b_end, wall0 + total),
    }
    found = asyncio.run(analyse(db_url, schema, phases))
    (acct_sum,) = [
        {k: sum(int(row[k]) for row in found["ledger"]) for k in found["ledger"][0] if k != "id"}
    ]
    sent = acct_sum["n_sent"]
    double_charges = acct_sum["l_capture_n"] - sent
    operator_sent = sum(int(s["sent"]) for s in op_stats.values())
    refunds = acct_sum["l_release"]
    failed_price = acct_sum["price_failed"]
    lost = len(set(ids)) - stored + still_pending
    express = found["express"]
    result: dict[str, Any] = {
        "benchmark": "outage",
        "at": utc_timestamp(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "cores": os.cpu_count(),
        "database": db_source,
        "note": "2-core machine shared with other sessions' tests and benchmarks",
        "settings": {
            "outage_s": args.outage_s,
            "warmup_s": args.warmup_s,
            "after_s": args.after_s,
            "rate_per_s": args.rate,
            "express_share": 0.05,
            "attempt_timeout_s": 2.0,
            "operators": "3 x operator_server, 20/80 ms, 1% permanent",
        },
        "accepted": len(set(ids)),
        "messages_lost": lost,
        "double_charges": double_charges,
        "double_sends": operator_sent - sent,
        "express": {
            "messages": express["n"],
            "deadline_misses": express["failed_deadline"] + express["sent_late"],
            "failed_deadline_exceeded": express["failed_deadline"],
            "sent_late": express["sent_late"],
        },
        "time_to_open_s": {
            "A": first_open_after(timeline, "A", a_start),
            "B": first_open_after(timeline, "B", b_start),
        },
        "closed_again_after_outage_s": {
            "A": closed_again(timeline, "A", b_start),
            "B": closed_again(timeline, "B", b_end),
        },
        "throughput": found["rates"],
        "status": found["status"],
        "failed_reasons": found["failed_reasons"],
        "sent_by_operator": found["sent_by_operator"],
        "refunds": {"released": refunds, "failed_prices": failed_price},
        "final_breakers": {n: o["state"] for n, o in final_ops.items()},
        "load": {k: load.get(k) for k in ("requests", "by_status", "errors", "timeouts")},
        "cpu_percent": {"gateway": cpu_use.server, "machine": cpu_use.machine},
        "loadavg_1m_before": cpu_use.loadavg_1m_before,
        "timeline": timeline[:: max(1, len(timeline) // 200)],
    }
    result["ok"] = lost == 0 and double_charges == 0 and refunds == failed_price
    return result


def markdown(r: dict[str, Any]) -> str:
    rows = [
        ("accepted", r["accepted"]),
        ("messages lost", r["messages_lost"]),
        ("double charges", r["double_charges"]),
        ("double sends (operator side)", r["double_sends"]),
        ("express messages", r["express"]["messages"]),
        ("express deadline misses", r["express"]["deadline_misses"]),
        ("time to open A (errors), s", r["time_to_open_s"]["A"]),
        ("time to open B (timeouts), s", r["time_to_open_s"]["B"]),
        ("A closed again, s after its outage", r["closed_again_after_outage_s"]["A"]),
        ("B closed again, s after its outage", r["closed_again_after_outage_s"]["B"]),
        (
            "refunds / failed prices",
            f"{r['refunds']['released']} / {r['refunds']['failed_prices']}",
        ),
    ]
    phases = [(p, v["accepted_per_s"], v["sent_per_s"]) for p, v in r["throughput"].items()]
    return (
        f"# Outage scenario ({r['at']}, commit {r['commit']}, {r['cores']} cores)\n\n"
        f"{r['note']}. Settings: {json.dumps(r['settings'])}.\n\n"
        + markdown_table(("figure", "value"), rows)
        + "\n"
        + markdown_table(("phase", "accepted/s", "sent/s"), phases)
        + f"\nFailed by reason: {json.dumps(r['failed_reasons'])}\n"
        + f"\nSent by operator: {json.dumps(r['sent_by_operator'])}\n"
        + f"\nok: {r['ok']}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
