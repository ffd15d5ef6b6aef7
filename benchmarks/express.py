"""Express behind a deep bulk backlog, and the gateway's memory with that backlog queued.

1. A fresh schema gets `--accounts` accounts and `--backlog` queued bulk messages spread
   evenly over them (written by PostgreSQL itself, with their credit held, as if accepted).
2. `smsgw serve` starts on 127.0.0.1: Recovery counts the backlog per account and the
   Scheduler pages it in within its memory bound. The simulated operator answers each batch in
   `--operator-ms`, with a window of `--window`: operators are saturated for the whole run
   (the backlog outlasts it).
3. A separate process sends express messages with `"wait": true` at `--rate` a second for
   `--seconds`. Accept-to-operator per message is read from PostgreSQL (`updated_at -
   created_at`: from accept to the operator's answer, so it includes `--operator-ms`).
4. The gateway's RSS (VmRSS, and VmHWM: the peak) is sampled every second throughout.

Targets (issue 4): express p99 <= 100 ms + the operator's latency, 0 deadline misses, and
RSS under 500 MB with 1,000,000 queued across 50,000 accounts.

Prints one JSON object; writes benchmarks/reports/latest/express.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SEED_ACCOUNTS = """
INSERT INTO accounts (name, key_hash, balance, held, topped_up)
SELECT 'bulk-' || g, sha256(('bulk-key-' || g)::bytea), 1000000000 - $2::bigint, $2::bigint,
       1000000000
FROM generate_series(1, $1::int) AS g
"""

# Evenly spread: message g goes to the (g mod accounts)-th account, 5 a segment, queued.
SEED_MESSAGES = """
INSERT INTO messages (id, account_id, recipient, sender, body, segments, price, express,
                      status, created_at, updated_at)
SELECT uuid7_at(now() - interval '1 hour' + g * interval '1 microsecond'), a.first + (g % $2::int),
       '+4479' || lpad((g % 100000000)::text, 8, '0'),
       'bulk', 'backlog message ' || g, 1, 5, false, 'queued',
       now() - interval '1 hour' + g * interval '1 microsecond',
       now() - interval '1 hour' + g * interval '1 microsecond'
FROM generate_series(0, $1::int - 1) AS g, (SELECT min(id) AS first FROM accounts) AS a
"""

EXPRESS_CLIENT = r"""
import json, sys, time, httpx, trio
url, key, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
results = []

async def one(client, n):
    body = {"to": f"+4915{n:09d}", "text": f"code {n:06d}", "express": True, "wait": True}
    started = time.monotonic()
    try:
        r = await client.post(
            "/v1/messages", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    except httpx.TransportError as exc:  # its node was killed under it: status 0
        results.append({"status": 0, "seconds": time.monotonic() - started,
                        "code": type(exc).__name__})
        return
    results.append({"status": r.status_code, "seconds": time.monotonic() - started,
                    "code": r.json().get("code") if r.status_code != 200 else None})

async def main():
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            for n in range(int(rate * seconds)):
                await trio.sleep_until(start + n / rate)
                nursery.start_soon(one, client, n)
    print(json.dumps(results))

trio.run(main)
"""


DEADLINE_S = 2.0  # the express deadline the gateway runs with (its default)

OWNER = """
SELECT n.id, n.pid FROM shard_leases l JOIN nodes n ON n.id = l.owner
WHERE l.shard = shard_of($1::bigint) AND l.expires_at > now()
"""


def kill_owner(url: str, schema: str, account_id: int) -> dict[str, Any]:
    """SIGKILL the node process that leases `account_id`'s shard (found in PostgreSQL)."""

    async def find() -> asyncpg.Record:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"SET search_path TO {schema}")
            return await conn.fetchrow(OWNER, account_id)
        finally:
            await conn.close()

    row = asyncio.run(find())
    if row is None:
        raise RuntimeError("nobody leases the express account's shard")
    os.kill(row["pid"], signal.SIGKILL)
    return {"node": row["id"], "pid": row["pid"], "at": common.utc_timestamp()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def seed(url: str, schema: str, accounts: int, backlog: int) -> float:
    started = time.monotonic()
    per_account = backlog // accounts

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"SET search_path TO {schema}")
            await conn.execute(SEED_ACCOUNTS, accounts, per_account * 5)
            await conn.execute(SEED_MESSAGES, per_account * accounts, accounts)
            await conn.execute("ANALYZE messages")
        finally:
            await conn.close()

    asyncio.run(run())
    return time.monotonic() - started


def migrate(url: str, schema: str, admin_key: str) -> None:
    env = common.gateway_env(url, schema, admin_key)
    subprocess.run(
        [sys.executable, "-m", "smsgw.cli", "migrate"], env=env, check=True, capture_output=True
    )


class RssSampler:
    """VmRSS of a process every second, in a thread; `peak_mb` also reads VmHWM at the end."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _field(self, name: str) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(name + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            value = self._field("VmRSS")
            if value is not None:
                self.samples.append(value)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, float | None]:
        hwm = self._field("VmHWM")
        self._stop.set()
        self._thread.join()
        return {
            "rss_max_mb": round(max(self.samples), 1) if self.samples else None,
            "rss_last_mb": round(self.samples[-1], 1) if self.samples else None,
            "rss_peak_vmhwm_mb": round(hwm, 1) if hwm is not None else None,
        }


def scheduler_view(client: httpx.Client) -> dict[str, Any]:
    children = {c["name"]: c for c in client.get("/v1/ops/supervisor").json()["children"]}
    writer = children["store_writer"]["stats"]
    leases = children.get("shard_leases", {}).get("stats", {})
    scheduler = children["scheduler"]["stats"]
    return {
        "scheduler": scheduler,
        "writer": {
            k: writer.get(k)
            for k in ("groups", "items", "commit_ms_ewma", "commit_ms_max", "committers")
        },
        "leases": {
            k: leases.get(k)
            for k in ("owned", "lapses", "lost", "loaded", "fenced_at_send", "last_tick_ms")
        },
        # The window is the Scheduler's; the messages in flight and sent are the pool's.
        "pool": {
            **{k: scheduler[k] for k in ("window", "express_reserve")},
            **{k: children["provider_pool"]["stats"][k] for k in ("inflight", "sent")},
        },
    }


def express_rows(url: str, schema: str, account_id: int) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"SET search_path TO {schema}")
            rows = await conn.fetch(
                "SELECT status, reason,"
                " extract(epoch FROM updated_at - created_at)::float8 AS seconds"
                " FROM messages WHERE account_id = $1",
                account_id,
            )
            return [dict(r) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def main() -> None:
    common.exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=50_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--operator-ms", type=float, default=50.0)
    parser.add_argument("--rate", type=float, default=20.0, help="express messages a second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--settle-s", type=float, default=10.0, help="after start, before load")
    parser.add_argument(
        "--no-leases",
        action="store_true",
        help="serve --no-leases: a node without shard leases (start-up recovery counts the"
        " bulk backlog either way)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="node processes (serve --workers N) on one port"
    )
    parser.add_argument(
        "--kill-owner-at",
        type=float,
        default=None,
        metavar="S",
        help="S seconds into the load, SIGKILL the node that dispatches the express account"
        " (its shard's owner; with --workers >= 2 serve starts a new one)",
    )
    parser.add_argument(
        "--past-days",
        type=int,
        default=0,
        help="make this many days of partitions first, as a node past its retention holds",
    )
    parser.add_argument("--out", type=Path, default=common.BENCHMARKS_DIR / "reports" / "latest")
    args = parser.parse_args()
    name = (
        "express"
        if args.workers == 1 and args.kill_owner_at is None
        else (f"express-w{args.workers}" + ("-kill" if args.kill_owner_at is not None else ""))
    )

    with (
        tempfile.TemporaryDirectory(prefix="smsgw-express-") as work,
        common.database(Path(work)) as (url, source),
    ):
        schema = common.fresh_schema("express")
        admin_key = common.new_admin_key()
        try:
            migrate(url, schema, admin_key)
            made = common.add_past_partitions(url, schema, args.past_days)
            common.log(f"seeding {args.backlog} messages over {args.accounts} accounts")
            seed_s = seed(url, schema, args.accounts, args.backlog)
            common.log(f"seeded in {seed_s:.1f} s; starting the gateway")
            command = [
                *common.gateway_command(workers=args.workers),
                "--window",
                str(args.window),
                "--operator-latency-ms",
                f"{args.operator_ms},{args.operator_ms}",
                "--recipient-limit-per-hour",
                "1000000",
                "--operator-errors",
                "0,0",
                *(["--no-leases"] if args.no_leases else []),
            ]
            env = common.gateway_env(url, schema, admin_key)
            log_path = Path(work) / "gateway.log"
            started = time.monotonic()
            with common.run_server(command, log_path=log_path, env=env, ready_timeout=300) as srv:
                ready_s = time.monotonic() - started
                # One node: its RSS. Several: the process is serve's parent, not a node.
                rss = RssSampler(srv.process.pid) if args.workers == 1 else None
                if rss is not None:
                    rss.start()
                headers = {"Authorization": f"Bearer {admin_key}"}
                with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as admin:
                    account = admin.post(
                        "/v1/accounts", json={"name": "otp", "credit": 10**9}
                    ).json()
                    time.sleep(args.settle_s)
                    before = scheduler_view(admin)
                    common.log(f"before load: {json.dumps(before)[:400]}")
                    client = subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            EXPRESS_CLIENT,
                            srv.url,
                            account["api_key"],
                            str(args.rate),
                            str(args.seconds),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    killed = None
                    if args.kill_owner_at is not None:
                        time.sleep(args.kill_owner_at)
                        killed = kill_owner(url, schema, account["id"])
                        common.log(f"SIGKILLed the owner: {killed}")
                    out, err = client.communicate(timeout=args.seconds + 120)
                    if client.returncode:
                        raise RuntimeError(err[-2000:])
                    after = scheduler_view(admin)
                memory = rss.stop() if rss is not None else {}
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_path, args.out / "express-gateway.log")
            answers = json.loads(out)
            rows = express_rows(url, schema, account["id"])
        finally:
            common.drop_schema(url, schema)

    sent = [r["seconds"] for r in rows if r["status"] == "sent"]
    misses = sum(1 for r in rows if r["reason"] == "deadline_exceeded")
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a["status"])] = statuses.get(str(a["status"]), 0) + 1
    ok_latency = [a["seconds"] for a in answers if a["status"] == 200]
    # An answer after the deadline (2 s by default), whatever it says, is a late answer (a
    # connection its killed node dropped, status 0, is no answer).
    late = sum(1 for a in answers if a["status"] and a["seconds"] > DEADLINE_S)
    result: dict[str, Any] = {
        "benchmark": name,
        "commit": common.git_commit(),
        "dirty": common.git_dirty(),
        "at": common.utc_timestamp(),
        "cores": os.cpu_count(),
        "database": source,
        "accounts": args.accounts,
        "backlog": args.backlog,
        "seed_seconds": round(seed_s, 1),
        "start_to_listening_seconds": round(ready_s, 1),
        "leases": not args.no_leases,
        "workers": args.workers,
        "past_days": args.past_days,
        "past_partitions": made,
        "killed_owner": killed,
        "window": args.window,
        "operator_ms": args.operator_ms,
        "express_sent": len(sent),
        "express_accept_to_operator_p50_ms": round(1000 * percentile(sent, 0.5), 1),
        "express_accept_to_operator_p99_ms": round(1000 * percentile(sent, 0.99), 1),
        "express_accept_to_operator_max_ms": round(1000 * max(sent), 1) if sent else None,
        "express_target_p99_ms": 100 + args.operator_ms,
        "deadline_misses": misses,
        "answers_by_status": statuses,
        "late_answers": late,
        "wait_answer_p99_ms": round(1000 * percentile(ok_latency, 0.99), 1),
        "memory": memory,
        "before": before,
        "after": after,
    }
    print(json.dumps(result, indent=2))
    title = f"# Express behind a bulk backlog ({args.workers} node(s)"
    title += ", owner SIGKILLed mid-run)" if killed else ")"
    markdown = (
        title
        + "\n\n"
        + common.markdown_table(
            ["figure", "value"],
            [
                ["backlog / accounts", f"{args.backlog} / {args.accounts}"],
                [
                    "express accept→operator p50 / p99 ms",
                    f"{result['express_accept_to_operator_p50_ms']}"
                    f" / {result['express_accept_to_operator_p99_ms']}",
                ],
                ["target p99 ms", result["express_target_p99_ms"]],
                ["deadline misses", misses],
                ["answers by status", json.dumps(statuses)],
                ["late answers (after the deadline)", late],
                [
                    "RSS max / peak MB",
                    f"{memory.get('rss_max_mb')} / {memory.get('rss_peak_vmhwm_mb')}",
                ],
            ],
        )
    )
    common.write_report(args.out, name, result, markdown)


if __name__ == "__main__":
    main()
