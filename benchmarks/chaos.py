"""Faults in a loop: two nodes under a steady open-loop load, one fault a cycle, checked after each.

    python benchmarks/chaos.py [--cycles 3] [--rate 200] [--cycle-s 12] [--faults LIST]
                               [--out benchmarks/reports/latest]

Everything runs on 127.0.0.1 and on a PostgreSQL cluster of its own (an embedded server in a
temporary folder, `storage.embedded.ControlledServer`), never DATABASE_URL: the benchmark stops,
kills and restarts it. Parts, each a process: that PostgreSQL; a simulated operator
(`python -m smsgw.sim.operator_server`, 20/80 ms, 3% temporary and 2% permanent failures);
two nodes `smsgw serve --workers 1` (c0, c1), each on a port of its own that a restart keeps;
per cycle two load generators (`python -m smsgw.sim.loadgen --rate`): single messages with 5%
express to one node, batches of 10 to the other (the nodes swap roles each cycle), together
`--rate` messages a second; and an express prober that sends `"wait": true` express messages
through both nodes in turn, twice a second, and keeps every answer.

Cycle i injects fault `--faults[i % n]` `--fault-at` seconds into its load:

  kill-node         SIGKILL the cycle's victim node, restart it (same id, same port) after
                    `--down-s`
  stop-node         SIGSTOP the victim for `--stop-s` (longer than its 3 s lease), then SIGCONT
  pg-restart        `pg_ctl stop -m fast`, start again after `--down-s`
  pg-immediate      `pg_ctl stop -m immediate` (no checkpoint: WAL recovery at the start)
  pg-kill           SIGKILL every PostgreSQL process, start again after `--down-s`
  operator-errors   the operator fails every attempt for `--outage-s` (POST /outage)
  operator-timeouts the operator answers nothing for `--outage-s`

When the fault ends, recovery is measured: seconds until both nodes' `/ready` is 200, until
a probe message is accepted (202) by each node, and until those probes are final (`sent`,
or `failed` by the operator's refusal: the dispatch path works again). After the
cycle's load: every accepted id (loadgen `--ids-out`, the prober's) is stored, every message
in the database is final within `--final-within` seconds (not only the accepted ones: a
message stored under a 503 must not be stranded either), and the credit ledger identities of
storage/ledger.py hold for every account (one hold per message, one capture per `sent`, one
release per `failed`: no double charge). Express answers during the cycle are counted by kind
(200 sent, 504 deadline_exceeded, 503, 502, no answer), with those slower than the deadline
plus a second (`late`). `swept`: what each node's stranded-message sweep has dispatched since
the node started (a message an in-memory path dropped; 0 is expected).

Every loop is bounded in count and time; a cycle that does not recover or settle within its
bounds is a failure of the run (exit status 1), and the report says which check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from common import (
    LOOPBACK,
    Server,
    auth,
    create_accounts,
    exit_on_sigterm,
    gateway_command,
    gateway_env,
    git_commit,
    git_dirty,
    load_report,
    loadgen,
    log,
    markdown_table,
    new_admin_key,
    operator_server_command,
    run_server,
    utc_timestamp,
    write_report,
)
from smsgw.storage.embedded import ControlledServer
from smsgw.storage.ledger import LEDGER_SQL, broken_identities

FAULTS = (
    "kill-node",
    "pg-restart",
    "stop-node",
    "operator-errors",
    "pg-kill",
    "operator-timeouts",
    "pg-immediate",
)
NODES = ("c0", "c1")
SCHEMA = "chaos"
ACCOUNTS = 20
CREDIT = 10**10
EXPRESS_DEADLINE_S = 2.0  # the node's default express deadline
TO = "+4915123456789"


# --- the parts ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class ChaosNode:
    """One `smsgw serve --workers 1` node on a fixed port, which a restart keeps."""

    def __init__(self, name: str, port: int, env: dict[str, str], extra: list[str], logs: Path):
        self.name = name
        self.port = port
        self.url = f"http://{LOOPBACK}:{port}"
        self._env = env
        self._extra = extra
        self._logs = logs
        self._stack: ExitStack | None = None
        self.server: Server | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        args = ["--node-id", self.name, "--reuse-port", *self._extra]
        command = [c if c != "0" else str(self.port) for c in gateway_command(*args)]
        self._stack = ExitStack()
        log_path = self._logs / f"node-{self.name}-{self.starts}.log"
        self.server = self._stack.enter_context(
            run_server(command, log_path=log_path, env=self._env)
        )

    def kill(self) -> None:
        assert self.server is not None and self._stack is not None
        self.server.process.send_signal(signal.SIGCONT)
        self.server.process.kill()
        self.server.process.wait()
        self._stack.close()
        self.server = None

    def pause(self, paused: bool) -> None:
        assert self.server is not None
        self.server.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def close(self) -> None:
        if self.server is not None:
            self.server.process.send_signal(signal.SIGCONT)
        if self._stack is not None:
            self._stack.close()


def operator_command() -> list[str]:
    return operator_server_command(
        "--name",
        "sim",
        "--latency-ms-median",
        "20",
        "--latency-ms-p99",
        "80",
        "--p-temporary",
        "0.03",
        "--p-permanent",
        "0.02",
    )


def query(url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(f"SET search_path TO {SCHEMA}")
            return [dict(r) for r in await conn.fetch(sql, *params)]
        finally:
            await conn.close()

    return asyncio.run(run())


# --- load -----------------------------------------------------------------------------------


class ExpressProber:
    """Express `"wait": true` sends through each node in turn, every `interval` seconds,
    until stopped; each answer kept as (kind, seconds, id or None)."""

    def __init__(self, nodes: list[ChaosNode], key: str, interval: float = 0.5) -> None:
        self._nodes = nodes
        self._key = key
        self._interval = interval
        self._stop = threading.Event()
        self.answers: list[tuple[str, float]] = []
        self.accepted: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ExpressProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        body = {"to": TO, "text": "chaos express", "express": True, "wait": True}
        timeout = EXPRESS_DEADLINE_S + 5
        with httpx.Client(timeout=timeout) as client:
            for i in range(100_000):  # bounded; stopped long before
                if self._stop.wait(self._interval):
                    return
                node = self._nodes[i % len(self._nodes)]
                started = time.monotonic()
                try:
                    r = client.post(f"{node.url}/v1/messages", json=body, headers=auth(self._key))
                    kind = str(r.status_code)
                    # 200: sent; 502/504: stored, failed and refunded (their body may say
                    # which message); the checks after the cycle cover those without an id.
                    answer = r.json() if r.status_code in (200, 502, 504) else {}
                    if isinstance(answer, dict) and isinstance(answer.get("id"), str):
                        self.accepted.append(answer["id"])
                except (httpx.HTTPError, ValueError):
                    kind = "no answer"
                self.answers.append((kind, time.monotonic() - started))


# --- faults and recovery --------------------------------------------------------------------


class Parts:
    def __init__(
        self,
        pg: ControlledServer,
        nodes: list[ChaosNode],
        operator: Server,
        admin_key: str,
        args: Any,
    ) -> None:
        self.pg = pg
        self.admin_key = admin_key
        self.nodes = nodes
        self.operator = operator
        self.args = args


def inject(fault: str, parts: Parts, victim: ChaosNode) -> float:
    """Do `fault` and undo it; returns the monotonic time it ended (recovery counts from
    there)."""
    args = parts.args
    if fault == "kill-node":
        victim.kill()
        time.sleep(args.down_s)
        victim.start()  # returns once it listens: recovery at start-up is part of the fault
        return time.monotonic()
    if fault == "stop-node":
        victim.pause(True)
        time.sleep(args.stop_s)
        victim.pause(False)
        return time.monotonic()
    if fault in ("pg-restart", "pg-immediate", "pg-kill"):
        if fault == "pg-kill":
            parts.pg.kill()
        else:
            parts.pg.stop("fast" if fault == "pg-restart" else "immediate")
        time.sleep(args.down_s)
        parts.pg.start()
        return time.monotonic()
    if fault in ("operator-errors", "operator-timeouts"):
        mode = fault.split("-")[1]
        outage = f"{parts.operator.url}/outage"
        httpx.post(outage, json={"mode": mode}, timeout=5).raise_for_status()
        time.sleep(args.outage_s)
        httpx.post(outage, json={"mode": None}, timeout=5).raise_for_status()
        return time.monotonic()
    raise ValueError(fault)


def recovery(parts: Parts, key: str, since: float, within: float) -> dict[str, Any]:
    """Seconds from `since` until every node is ready, until each accepted a probe, until the
    probes are final; None for a stage not reached within `within` seconds."""
    stages: dict[str, float | None] = {"ready_s": None, "accepting_s": None, "final_s": None}
    probes: dict[str, str] = {}
    deadline = since + within
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            now = time.monotonic()
            try:
                if stages["ready_s"] is None:
                    if all(client.get(f"{n.url}/ready").status_code == 200 for n in parts.nodes):
                        stages["ready_s"] = now - since
                elif stages["accepting_s"] is None:
                    for n in parts.nodes:
                        if n.name not in probes:
                            body = {"to": TO, "text": f"probe via {n.name}"}
                            r = client.post(f"{n.url}/v1/messages", json=body, headers=auth(key))
                            if r.status_code == 202:
                                probes[n.name] = str(r.json()["id"])
                    if len(probes) == len(parts.nodes):
                        stages["accepting_s"] = time.monotonic() - since
                else:
                    rows = query(
                        parts.pg.url,
                        # Final, not only sent: the operator refuses 2% for good.
                        "SELECT count(*) AS n FROM messages WHERE id = ANY($1::uuid[])"
                        " AND status IN ('sent', 'failed')",
                        list(probes.values()),
                    )
                    if rows[0]["n"] == len(probes):
                        stages["final_s"] = now - since
                        break
            except (httpx.HTTPError, OSError, asyncpg.PostgresError):
                pass
            time.sleep(0.1)
    return {k: None if v is None else round(v, 3) for k, v in stages.items()} | {
        "probes": list(probes.values())
    }


def swept(node: ChaosNode, admin_key: str) -> int | None:
    try:
        r = httpx.get(f"{node.url}/v1/ops/supervisor", headers=auth(admin_key), timeout=5)
        [leases] = [c for c in r.json()["children"] if c["name"] == "shard_leases"]
        return int(leases["stats"]["swept"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def settle(url: str, within: float) -> tuple[int, float]:
    """Wait (bounded) until no message is queued or sending; (how many still are, seconds)."""
    started = time.monotonic()
    left = -1
    while time.monotonic() - started < within:
        try:
            rows = query(
                url, "SELECT count(*) AS n FROM messages WHERE status IN ('queued', 'sending')"
            )
            left = int(rows[0]["n"])
        except (OSError, asyncpg.PostgresError):
            left = -1
        if left == 0:
            break
        time.sleep(0.25)
    return left, round(time.monotonic() - started, 3)


def express_summary(answers: list[tuple[str, float]]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for kind, _ in answers:
        kinds[kind] = kinds.get(kind, 0) + 1
    times = sorted(s for _, s in answers)
    return {
        "answers": kinds,
        # Answered, but after the deadline and a second more (a request to a paused or dead
        # node that gets no answer is counted under "no answer" instead).
        "late": sum(k != "no answer" and s > EXPRESS_DEADLINE_S + 1.0 for k, s in answers),
        "p50_s": round(times[len(times) // 2], 3) if times else None,
        "max_s": round(times[-1], 3) if times else None,
    }


# --- a cycle --------------------------------------------------------------------------------


def cycle(i: int, fault: str, parts: Parts, keys: list[str], work: Path) -> dict[str, Any]:
    args = parts.args
    victim = parts.nodes[i % len(parts.nodes)]
    other = parts.nodes[(i + 1) % len(parts.nodes)]
    keys_file = work / "keys.json"
    singles_ids = work / f"cycle{i}-singles.ids"
    batch_ids = work / f"cycle{i}-batch.ids"
    log(f"cycle {i}: {fault} (victim {victim.name}), {args.rate:g} msg/s for {args.cycle_s:g} s")
    result: dict[str, Any] = {"cycle": i, "fault": fault, "victim": victim.name}
    started = time.monotonic()
    with (
        loadgen(
            victim.url,
            keys_file,
            singles_ids,
            args.rate * 0.5,
            args.cycle_s,
            "--connections",
            "16",
            "--express-share",
            "0.05",
        ) as singles,
        loadgen(
            other.url,
            keys_file,
            batch_ids,
            args.rate * 0.5,
            args.cycle_s,
            "--connections",
            "16",
            "--batch",
            "10",
        ) as batches,
        ExpressProber(parts.nodes, keys[0]) as prober,
    ):
        time.sleep(args.fault_at)
        fault_started = time.monotonic()
        ended = inject(fault, parts, victim)
        result["fault_s"] = round(ended - fault_started, 3)
        result["recovery"] = recovery(parts, keys[1], ended, args.recover_within)
        remaining = args.cycle_s - (time.monotonic() - started)
        reports = [load_report(p, max(0.0, remaining) + 30) for p in (singles, batches)]
    result["express"] = express_summary(prober.answers)
    result["load"] = {
        name: None if r is None else {**r.by_status, "errors": r.errors, "timeouts": r.timeouts}
        for name, r in zip(("singles", "batches"), reports, strict=True)
    }
    left, settle_s = settle(parts.pg.url, args.final_within)
    accepted = {
        line
        for f in (singles_ids, batch_ids)
        if f.exists()
        for line in f.read_text().splitlines()
        if line
    }
    accepted.update(prober.accepted)
    accepted.update(result["recovery"]["probes"])
    stored = query(
        parts.pg.url,
        "SELECT count(*) AS n FROM messages WHERE id = ANY($1::uuid[])",
        sorted(accepted),
    )[0]["n"]
    ledger = query(parts.pg.url, LEDGER_SQL)
    broken = {str(r["id"]): broken_identities(r) for r in ledger if broken_identities(r)}
    recovered = all(v is not None for k, v in result["recovery"].items() if k.endswith("_s"))
    # Messages the stranded-message sweep found held nowhere and dispatched, per node (since
    # its last start): each one is an in-memory path that dropped a message.
    result["swept"] = {n.name: swept(n, parts.admin_key) for n in parts.nodes}
    result.update(
        {
            "accepted": len(accepted),
            "lost": len(accepted) - int(stored),
            "not_final": left,
            "settle_s": settle_s,
            "ledger_broken": broken,
            "nodes_alive": all(
                n.server is not None and n.server.process.poll() is None for n in parts.nodes
            ),
        }
    )
    result["ok"] = (
        result["lost"] == 0
        and left == 0
        and not broken
        and recovered
        and result["nodes_alive"]
        and None not in reports
    )
    log(
        f"cycle {i}: {fault} {'ok' if result['ok'] else 'FAILED'}: accepted {len(accepted)},"
        f" lost {result['lost']}, not final {left}, recovery {result['recovery']}"
    )
    return result


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    logs = args.out / "chaos-logs"
    logs.mkdir(parents=True, exist_ok=True)
    pg = ControlledServer(work / "pgdata")
    cycles: list[dict[str, Any]] = []
    with ExitStack() as stack:
        log(f"starting a private PostgreSQL in {work / 'pgdata'}")
        pg.start()
        stack.callback(pg.close)
        operator = stack.enter_context(
            run_server(operator_command(), log_path=logs / "operator.log")
        )
        admin_key = new_admin_key()
        env = gateway_env(pg.url, SCHEMA, admin_key)
        extra = [
            "--operator-url",
            f"sim={operator.url}",
            "--attempt-timeout",
            "2",
            "--recipient-limit-per-hour",
            "100000000",
        ]
        nodes = [ChaosNode(name, free_port(), env, extra, logs) for name in NODES]
        for node in nodes:
            stack.callback(node.close)
            node.start()
        keys = create_accounts(nodes[0].url, admin_key, ACCOUNTS, credit=CREDIT, name_prefix="c")
        (work / "keys.json").write_text(json.dumps(keys))
        parts = Parts(pg, nodes, operator, admin_key, args)
        for i in range(args.cycles):
            fault = args.faults[i % len(args.faults)]
            cycles.append(cycle(i, fault, parts, keys, work))
    return summarize(cycles, args)


def summarize(cycles: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    by_fault: dict[str, dict[str, Any]] = {}
    for c in cycles:
        entry = by_fault.setdefault(c["fault"], {"cycles": 0, "failed": 0, "recovery_s": []})
        entry["cycles"] += 1
        entry["failed"] += not c["ok"]
        entry["recovery_s"].append(c["recovery"]["accepting_s"])
    for entry in by_fault.values():
        times = [t for t in entry.pop("recovery_s") if t is not None]
        entry["accepting_again_s_max"] = max(times) if times else None
        entry["accepting_again_s_median"] = sorted(times)[len(times) // 2] if times else None
    return {
        "benchmark": "chaos",
        "at": utc_timestamp(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "settings": {
            "cycles": args.cycles,
            "rate_msg_per_s": args.rate,
            "cycle_s": args.cycle_s,
            "fault_at_s": args.fault_at,
            "down_s": args.down_s,
            "stop_s": args.stop_s,
            "outage_s": args.outage_s,
            "faults": list(args.faults),
            "nodes": len(NODES),
            "database": "private embedded PostgreSQL (ControlledServer)",
        },
        "lost": sum(c["lost"] for c in cycles),
        "not_final": sum(max(0, c["not_final"]) for c in cycles),
        "ledger_broken_cycles": sum(bool(c["ledger_broken"]) for c in cycles),
        "failed_cycles": [c["cycle"] for c in cycles if not c["ok"]],
        "by_fault": by_fault,
        "cycles": cycles,
        "ok": bool(cycles) and all(c["ok"] for c in cycles),
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"# chaos ({result['at']}, {result['commit'][:10]}{' dirty' if result['dirty'] else ''})",
        "",
        f"{s['cycles']} cycles, {s['rate_msg_per_s']:g} msg/s offered for {s['cycle_s']:g} s a"
        f" cycle, two nodes, {s['database']}: **{'PASS' if result['ok'] else 'FAIL'}**"
        f" (lost {result['lost']}, not final {result['not_final']}, cycles with a broken"
        f" ledger {result['ledger_broken_cycles']}).",
        "",
    ]
    rows = [
        [
            c["cycle"],
            c["fault"],
            c["victim"],
            c["accepted"],
            c["lost"],
            c["not_final"],
            c["recovery"]["ready_s"],
            c["recovery"]["accepting_s"],
            c["recovery"]["final_s"],
            c["settle_s"],
            json.dumps(c["express"]["answers"], sort_keys=True),
            c["express"]["late"],
            json.dumps(c["swept"], sort_keys=True),
            "ok" if c["ok"] else "FAIL",
        ]
        for c in result["cycles"]
    ]
    header = [
        "cycle",
        "fault",
        "victim",
        "accepted",
        "lost",
        "not final",
        "ready s",
        "accepting s",
        "probes final s",
        "settled s",
        "express answers",
        "express late",
        "swept",
        "",
    ]
    lines.append(markdown_table(header, rows))
    lines.append("Recovery is counted from the end of the fault (the restarted node listening,")
    lines.append("SIGCONT, PostgreSQL started, the operator's outage cleared).")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s offered in all")
    parser.add_argument("--cycle-s", type=float, default=12.0, help="load per cycle, seconds")
    parser.add_argument("--fault-at", type=float, default=3.0, help="seconds into the load")
    parser.add_argument("--down-s", type=float, default=2.0, help="a node or PostgreSQL down")
    parser.add_argument("--stop-s", type=float, default=5.0, help="a node SIGSTOPped")
    parser.add_argument("--outage-s", type=float, default=4.0, help="the operator's outage")
    parser.add_argument("--recover-within", type=float, default=60.0)
    parser.add_argument("--final-within", type=float, default=90.0)
    parser.add_argument(
        "--faults",
        type=lambda v: tuple(v.split(",")),
        default=FAULTS,
        help=f"comma-separated, cycled through (default {','.join(FAULTS)})",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports/latest"))
    args = parser.parse_args(argv)
    if not 1 <= args.cycles <= 1000 or args.rate <= 0 or args.rate > 5000:
        parser.error("--cycles in 1..1000, --rate in (0, 5000]")
    if not 0 < args.fault_at < args.cycle_s <= 600:
        parser.error("0 < --fault-at < --cycle-s <= 600")
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="smsgw-bench-chaos-") as tmp:
        result = run(args, Path(tmp))
    path = write_report(args.out, "chaos", result, markdown(result))
    log(f"report: {path} and {path.with_suffix('.md')}")
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
