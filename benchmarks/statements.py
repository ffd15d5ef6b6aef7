"""What PostgreSQL plans and runs for each accepted message: `--workers` nodes on one port
under an open-loop load, on a schema with `--past-days` of day partitions, read from
pg_stat_statements.

    STATEMENTS_URL=postgresql://... python benchmarks/statements.py \
        [--workers 1] [--rate 300] [--seconds 20] [--past-days 90] [--settle 30]

The server must load pg_stat_statements (`shared_preload_libraries = 'pg_stat_statements'`,
`pg_stat_statements.track_planning = on`) and have the extension in its database; the script
resets its figures. It waits `--settle` seconds after making the partitions (autovacuum
analyzes them first). Prints the nodes' CPU an accept (all of them), the store's runs an accept
by name (from /metrics: one node's), and the top statements by planning and execution time an
accept. Only 127.0.0.1. Before 01:00 and after 23:00 UTC the group commit takes its exact way
for groups with a client_ref (storage/commit.py), which the load generator's requests carry.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_past_partitions,
    auth,
    create_accounts,
    drop_schema,
    fresh_schema,
    gateway_command,
    gateway_env,
    new_admin_key,
    run_loadgen,
    run_server,
)
from nodes import tree_cpu_s, wait_leased

_RUNS = re.compile(r'smsgw_store_statement_seconds_count\{statement="([^"]+)"\} (\S+)')
_TOP = """
SELECT calls, plans, total_plan_time, total_exec_time,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 90) AS query
FROM pg_stat_statements ORDER BY total_plan_time + total_exec_time DESC LIMIT 40
"""


async def query(url: str, sql: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def runs(url: str, admin_key: str) -> Counter[str]:
    text = httpx.get(f"{url}/metrics", headers=auth(admin_key)).text
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if m := _RUNS.match(line):
            counts[m.group(1)] += float(m.group(2))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--past-days", type=int, default=90)
    # Autovacuum analyzes the new partitions first; a run at once measures that too.
    parser.add_argument("--settle", type=float, default=30.0)
    args = parser.parse_args()
    url = os.environ["STATEMENTS_URL"]
    schema, admin_key = fresh_schema("statements"), new_admin_key()
    env = gateway_env(url, schema, admin_key)
    try:
        log = Path("/tmp") / f"{schema}.log"
        command = gateway_command(workers=args.workers)
        with run_server(command, log_path=log, env=env) as gateway:
            keys = create_accounts(gateway.url, admin_key, 100, credit=10**9)
            wait_leased(gateway.url, admin_key, ["--workers", str(args.workers)])
            print("partitions made:", add_past_partitions(url, schema, args.past_days))
            time.sleep(args.settle)
            pid = gateway.process.pid
            cpu_before, runs_before = tree_cpu_s(pid), runs(gateway.url, admin_key)
            asyncio.run(query(url, "SELECT pg_stat_statements_reset()"))
            load = run_loadgen(
                gateway.url,
                keys,
                connections=64,
                duration=args.seconds,
                warmup=0.001,
                extra_args=["--rate", str(args.rate)],
            )
            cpu_after, runs_after = tree_cpu_s(pid), runs(gateway.url, admin_key)
            top = asyncio.run(query(url, _TOP))
    finally:
        drop_schema(url, schema)
    n = load.requests
    cpu = cpu_after - cpu_before
    print(f"{load.rate_per_s}/s {load.by_status} latency {load.latency_ms}")
    print(f"nodes' CPU {1000 * cpu / n:.3f} ms an accept ({args.workers} nodes)")
    for name in sorted(runs_after, key=lambda k: runs_before[k] - runs_after[k]):
        if runs_after[name] > runs_before[name]:
            print(f"  {(runs_after[name] - runs_before[name]) / n:7.3f} runs an accept: {name}")
    plan = sum(r["total_plan_time"] for r in top) / n
    run = sum(r["total_exec_time"] for r in top) / n
    print(f"PostgreSQL, ms an accept: planning {plan:.3f}, execution {run:.3f}")
    for r in top:
        print(
            f"  calls {r['calls'] / n:6.3f} plans {r['plans'] / n:6.3f}"
            f" plan {r['total_plan_time'] / n:6.3f} exec {r['total_exec_time'] / n:6.3f}"
            f"  {r['query']}"
        )


if __name__ == "__main__":
    main()
