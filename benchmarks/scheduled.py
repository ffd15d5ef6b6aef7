"""Scheduled sends: many messages scheduled for one moment, accepted through the batch API; the
node's RSS before and after, and how soon after their `send_at` they go out.

    python benchmarks/scheduled.py [--messages 100000] [--accounts 10] [--lead-s S]
                                   [--connections 4] [--operator-latency-ms 20]
                                   [--final-within 600] [--out benchmarks/reports/latest]

Parts, each a process, all on 127.0.0.1: PostgreSQL (DATABASE_URL when set, else an embedded
server in a temporary folder); a simulated HTTP operator (`python -m smsgw.sim.operator_server`)
with `--operator-latency-ms` median (3x that p99), no failures and no cap; one node (`smsgw
serve --workers 1`).

Steps: `--accounts` accounts; the node's RSS once it idles (start); `--messages` messages in
batches of 1,000 (`--connections` at a time, the accounts in turn), every batch with the same
`send_at`, `--lead-s` seconds after the first batch (default: 15 s plus a second per 2,000
messages, time for the accept); RSS after the accept, with every message `scheduled` in
PostgreSQL and none in the node's Scheduler; then, polling the operator's counter every 5 ms
from before the send_at, the first message's arrival; every message's outcome; RSS at its
peak while they are dispatched and once all are sent. From PostgreSQL: the first and last
outcome's time after the send_at (an outcome is recorded when the operator answered), the
statuses, the credit ledger of every account.

Fails (exit 1) when a message reached the operator before its send_at, the first one came
more than a second after it, one was not sent within `--final-within` seconds, the accept
ended after the send_at, or the credit does not reconcile.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from common import (
    CpuMeter,
    auth,
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
    utc_timestamp,
    write_report,
)
from smsgw.storage.ledger import LEDGER_SQL, broken_identities

BATCH = 1_000
CREDIT = 10**10
FIRST_WITHIN_S = 1.0  # the promise: dispatched starting within a second of send_at
POLL_S = 0.005


# --- the parts ------------------------------------------------------------------------------


def operator_command(latency_ms: float) -> list[str]:
    return operator_server_command(
        "--name",
        "sim",
        "--latency-ms-median",
        str(latency_ms),
        "--latency-ms-p99",
        str(3 * latency_ms),
        "--p-temporary",
        "0",
        "--p-permanent",
        "0",
    )


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def mib(value: float | None) -> float | None:
    return None if value is None else round(value / (1 << 20), 1)


class RssWatch:
    """The node's RSS every 100 ms until stopped, each sample with its wall-clock time."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        for _ in range(10_000_000):  # bounded; stopped long before
            rss = rss_bytes(self._pid)
            if rss is not None:
                self.samples.append((time.time(), rss))
            if self._stop.wait(0.1):
                return

    def now(self) -> int | None:
        return rss_bytes(self._pid)

    def peak(self, start: float, end: float) -> int | None:
        return max((r for t, r in self.samples if start <= t <= end), default=None)


def query(url: str, schema: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(f"SET search_path TO {schema}")
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def statuses(url: str, schema: str) -> dict[str, int]:
    rows = query(url, schema, "SELECT status, count(*) AS n FROM messages GROUP BY status")
    return {r["status"]: int(r["n"]) for r in rows}


def node_stats(url: str, admin_key: str) -> dict[str, dict[str, Any]]:
    """Each supervised child's figures (GET /v1/ops/supervisor), by name."""
    r = httpx.get(f"{url}/v1/ops/supervisor", headers=auth(admin_key), timeout=10)
    r.raise_for_status()
    return {c["name"]: c["stats"] for c in r.json()["children"]}


# --- the steps ------------------------------------------------------------------------------


def accept(
    url: str, keys: Sequence[str], messages: int, send_at: str, connections: int
) -> dict[str, Any]:
    """Post `messages` in batches of BATCH with the batch's `send_at`, `connections` at a
    time; the answers' counts and the time it took."""
    counts: dict[str, int] = {}
    lock = threading.Lock()
    local = threading.local()

    def post(start: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=url, timeout=60)
        n = min(BATCH, messages - start)
        body = {
            "send_at": send_at,
            "messages": [
                {"to": f"+49151{(start + i) % 10_000_000:07d}", "text": f"scheduled {start + i}"}
                for i in range(n)
            ],
        }
        key = keys[(start // BATCH) % len(keys)]
        r = client.post("/v1/messages/batch", json=body, headers=auth(key))
        with lock:
            if r.status_code != 202:
                counts[f"http {r.status_code}"] = counts.get(f"http {r.status_code}", 0) + n
                return
            for item in r.json()["results"]:
                counts[item["status"]] = counts.get(item["status"], 0) + 1

    started = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(post, range(0, messages, BATCH)))
    elapsed = time.monotonic() - started
    return {
        "answers": dict(sorted(counts.items())),
        "seconds": round(elapsed, 2),
        "msg_per_s": round(messages / elapsed, 1) if elapsed > 0 else None,
    }


def first_arrival(operator_url: str, until: float) -> float | None:
    """Poll the operator's call counter every POLL_S until it moves; the wall-clock time it
    was first seen above zero (None: not by `until`)."""
    with httpx.Client(timeout=5) as client:
        while time.time() < until:
            if client.get(f"{operator_url}/stats").json()["calls"] > 0:
                return time.time()
            time.sleep(POLL_S)
    return None


def wait_all_sent(url: str, schema: str, messages: int, within: float) -> tuple[int, float]:
    """Poll until `messages` are sent (bounded by `within` seconds): (how many, when seen)."""
    deadline = time.time() + within
    sent = 0
    while time.time() < deadline:
        sent = statuses(url, schema).get("sent", 0)
        if sent >= messages:
            break
        time.sleep(0.25)
    return sent, time.time()


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    admin_key = new_admin_key()
    logs = args.out / "scheduled-logs"
    with ExitStack() as stack:
        url, source = stack.enter_context(database(work))
        schema = fresh_schema("scheduled")
        stack.callback(drop_schema, url, schema)
        operator = stack.enter_context(
            run_server(operator_command(args.operator_latency_ms), log_path=logs / "operator.log")
        )
        node = stack.enter_context(
            run_server(
                gateway_command(
                    "--operator-url",
                    f"sim={operator.url}",
                    "--recipient-limit-per-hour",
                    "100000000",
                ),
                log_path=logs / "node.log",
                env=gateway_env(url, schema, admin_key),
            )
        )
        pid = node.process.pid
        keys = create_accounts(node.url, admin_key, args.accounts, credit=CREDIT)
        watch = stack.enter_context(RssWatch(pid))
        time.sleep(2.0)  # idle: the start-up's allocations settled
        rss_start = watch.now()

        lead = args.lead_s if args.lead_s is not None else 15.0 + args.messages / 2_000
        due = time.time() + lead
        send_at = datetime.fromtimestamp(due, UTC).isoformat()
        log(f"accepting {args.messages:,} messages scheduled for {send_at} ({lead:g} s ahead)")
        accepted = accept(node.url, keys, args.messages, send_at, args.connections)
        accept_ended = time.time()
        log(f"accepted: {accepted}")
        time.sleep(min(2.0, max(0.0, due - time.time() - 1.0)))
        rss_after_accept = watch.now()
        before = statuses(url, schema)
        stats = node_stats(node.url, admin_key)
        in_scheduler = stats["scheduler"]["bulk_backlog"] + stats["scheduler"]["express_backlog"]

        log(f"waiting for {send_at}")
        # Watching the operator from now on: a message sent early shows too.
        arrived: list[float | None] = []
        watcher = threading.Thread(
            target=lambda: arrived.append(first_arrival(operator.url, due + args.final_within)),
            daemon=True,
        )
        watcher.start()
        time.sleep(max(0.0, due - time.time()))
        cpu = CpuMeter(pid)
        cpu.start()
        sent, all_sent_seen = wait_all_sent(url, schema, args.messages, args.final_within)
        cpu_use = cpu.stop()
        watcher.join(timeout=args.final_within)
        arrival = arrived[0] if arrived else None
        rss_peak = watch.peak(due, time.time())
        time.sleep(2.0)
        rss_end = watch.now()

        after = statuses(url, schema)
        times = query(
            url,
            schema,
            "SELECT extract(epoch FROM min(updated_at))::float8 AS first,"
            " extract(epoch FROM max(updated_at))::float8 AS last,"
            " extract(epoch FROM min(send_at))::float8 AS send_min,"
            " extract(epoch FROM max(send_at))::float8 AS send_max"
            " FROM messages WHERE status = 'sent'",
        )[0]
        ledger = query(url, schema, LEDGER_SQL)
        broken = {str(r["id"]): broken_identities(r) for r in ledger if broken_identities(r)}
        promoted = node_stats(node.url, admin_key)["scheduled_sends"]

    def after_due(t: float | None) -> float | None:
        return None if t is None else round(t - due, 3)

    first_s = after_due(arrival)
    checks = {
        "accepted_all_scheduled": accepted["answers"] == {"scheduled": args.messages},
        "accept_ended_before_send_at": accept_ended < due,
        "all_scheduled_in_postgresql_before": before.get("scheduled", 0) == args.messages,
        "none_in_the_scheduler_before": in_scheduler == 0,
        "none_sent_before_send_at": first_s is not None
        and first_s >= 0
        and (times["first"] or 0) >= due - 0.001,
        "first_dispatch_within_1s": first_s is not None and first_s <= FIRST_WITHIN_S,
        "all_sent": sent >= args.messages and after.get("sent", 0) == args.messages,
        "credit_reconciles": not broken,
    }
    return {
        "benchmark": "scheduled",
        "at": utc_timestamp(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "settings": {
            "database": source,
            "messages": args.messages,
            "accounts": args.accounts,
            "batch": BATCH,
            "connections": args.connections,
            "lead_s": lead,
            "operator": f"{args.operator_latency_ms:g} ms median,"
            f" {3 * args.operator_latency_ms:g} ms p99, no failures, no cap",
        },
        "accept": accepted,
        "send_at": send_at,
        "first_dispatch_after_send_at_s": first_s,
        "first_sent_after_send_at_s": after_due(times["first"]),
        "last_sent_after_send_at_s": after_due(times["last"]),
        "all_sent_seen_after_send_at_s": after_due(all_sent_seen),
        "dispatch_msg_per_s": None
        if not (times["first"] and times["last"] and times["last"] > times["first"])
        else round(args.messages / (times["last"] - times["first"]), 1),
        "rss_mib": {
            "start": mib(rss_start),
            "after_accept": mib(rss_after_accept),
            "peak_while_sending": mib(rss_peak),
            "end": mib(rss_end),
        },
        "statuses_before": before,
        "statuses_after": after,
        "scheduled_sends": promoted,
        "node_cpu_percent_while_sending": cpu_use.server,
        "ledger_broken": broken,
        "checks": checks,
        "ok": all(checks.values()),
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    rss = result["rss_mib"]
    lines = [
        f"# scheduled ({result['at']}, {result['commit'][:10]}"
        f"{' dirty' if result['dirty'] else ''})",
        "",
        f"{s['messages']:,} messages of {s['accounts']} accounts scheduled for one moment"
        f" through the batch API ({s['batch']:,} a batch, {s['connections']} at a time), one"
        f" node, an HTTP operator ({s['operator']}), {s['database']} PostgreSQL:"
        f" **{'PASS' if result['ok'] else 'FAIL'}**.",
        "",
    ]
    rows = [
        [
            "accepted (msg/s, s)",
            f"{result['accept']['msg_per_s']} in {result['accept']['seconds']}",
        ],
        ["send_at (lead, s)", f"{result['send_at']} ({s['lead_s']:g})"],
        ["first reached the operator after send_at (s)", result["first_dispatch_after_send_at_s"]],
        ["first outcome after send_at (s)", result["first_sent_after_send_at_s"]],
        ["last outcome after send_at (s)", result["last_sent_after_send_at_s"]],
        ["dispatch rate, first to last outcome (msg/s)", result["dispatch_msg_per_s"]],
        [
            "RSS start / after accept / peak while sending / end (MiB)",
            f"{rss['start']} / {rss['after_accept']} / {rss['peak_while_sending']} / {rss['end']}",
        ],
        ["statuses before send_at", result["statuses_before"]],
        ["statuses after", result["statuses_after"]],
        [
            "promoted (statements, waits for room)",
            f"{result['scheduled_sends'].get('promoted')}"
            f" ({result['scheduled_sends'].get('promotions')},"
            f" {result['scheduled_sends'].get('waits_for_room')})",
        ],
        ["node CPU while sending (% of a core)", result["node_cpu_percent_while_sending"]],
    ]
    lines.append(markdown_table(["figure", "value"], rows))
    failed = [name for name, ok in result["checks"].items() if not ok]
    lines.append("Checks: " + ("all passed." if not failed else "FAILED " + ", ".join(failed)))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--connections", type=int, default=4, help="batches in flight")
    parser.add_argument("--lead-s", type=float, help="send_at, seconds after the accept starts")
    parser.add_argument("--operator-latency-ms", type=float, default=20.0)
    parser.add_argument("--final-within", type=float, default=600.0, help="seconds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports/latest"))
    args = parser.parse_args(argv)
    if not (1 <= args.messages <= 1_000_000 and 1 <= args.accounts <= 1_000):
        parser.error("--messages in [1, 1000000], --accounts in [1, 1000]")
    if not 1 <= args.connections <= 32:
        parser.error("--connections in [1, 32]")
    if args.lead_s is not None and not 2 <= args.lead_s <= 3_600:
        parser.error("--lead-s in [2, 3600]")
    if not (0 < args.operator_latency_ms <= 2_000 and 0 < args.final_within <= 3_600):
        parser.error("--operator-latency-ms in (0, 2000], --final-within in (0, 3600]")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="smsgw-bench-scheduled-") as tmp:
        result = run(args, Path(tmp))
    path = write_report(args.out, "scheduled", result, markdown(result))
    log(f"report: {path} and {path.with_suffix('.md')}")
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
