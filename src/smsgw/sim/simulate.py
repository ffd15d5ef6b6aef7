"""`smsgw simulate`: a gateway on PostgreSQL, driven over HTTP by a separate load process."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import trio

from smsgw.server import NodeOptions, run_node
from smsgw.storage.embedded import database_url
from smsgw.storage.ledger import LEDGER_SQL, broken_identities
from smsgw.storage.pg import Database, asyncio_loop

NORMAL_PRICE = 5


class SimulateOptions(msgspec.Struct, frozen=True):
    accounts: int = 20
    messages: int = 5_000
    connections: int = 32
    credit: int = 0  # per account; 0: about 80% of what its share of the load needs
    express_share: float = 0.05
    seed: int = 1
    timeout: float = 300.0
    report_dir: str = "var/reports"


class Reconciliation(msgspec.Struct):
    accounts: int
    matching: int
    expected_balance: int
    actual_balance: int
    held: int
    captured: int
    refunded: int
    ledger_ok: bool

    @property
    def ok(self) -> bool:
        return (
            self.matching == self.accounts
            and self.expected_balance == self.actual_balance
            and self.held == 0
            and self.ledger_ok
        )


class SimulationReport(msgspec.Struct):
    cpu_count: int | None
    accounts: int
    requests: int
    accepted: int
    rejected: dict[str, int]
    stored: int
    lost: int
    sent: int
    failed: dict[str, int]
    not_final: int
    accept_rate_per_s: float
    end_to_end_per_s: float
    accept_latency_ms: dict[str, float]
    wall_seconds: float
    reconciliation: Reconciliation

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.not_final == 0 and self.reconciliation.ok


async def reconcile(db: Database, account_ids: list[int]) -> Reconciliation:
    """Check every account against its messages and its ledger, independently of the engine
    (storage/ledger.py): balance == top-ups - captured - held, captured == prices of sent
    messages, held == prices of messages not yet final, and the ledger adds up to the same."""

    async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return list(await conn.fetch(LEDGER_SQL))

    wanted = set(account_ids)
    rows = [r for r in await db.run(fetch) if r["id"] in wanted]
    matching = 0
    expected_total = actual_total = held = captured = refunded = 0
    ledger_ok = len(rows) == len(account_ids)
    for r in rows:
        expected = r["topped_up"] - r["price_sent"] - r["price_pending"]
        if (
            expected == r["balance"]
            and r["captured"] == r["price_sent"]
            and r["held"] == r["price_pending"]
        ):
            matching += 1
        ledger_ok &= not broken_identities(dict(r), final=False)
        expected_total += expected
        actual_total += r["balance"]
        held += r["held"]
        captured += r["captured"]
        refunded += r["l_release"]
    return Reconciliation(
        accounts=len(account_ids),
        matching=matching,
        expected_balance=expected_total,
        actual_balance=actual_total,
        held=held,
        captured=captured,
        refunded=refunded,
        ledger_ok=ledger_ok,
    )


async def _message_counts(db: Database, account_ids: list[int]) -> dict[str, int]:
    async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return list(
            await conn.fetch(
                "SELECT status, coalesce(reason, '') AS reason, count(*) AS n FROM messages"
                " WHERE account_id = ANY($1::bigint[]) GROUP BY status, reason",
                account_ids,
            )
        )

    counts: dict[str, int] = {}
    for r in await db.run(fetch):
        key = r["status"] if r["status"] != "failed" else f"failed:{r['reason']}"
        counts[key] = counts.get(key, 0) + r["n"]
    return counts


async def simulate(options: SimulateOptions) -> SimulationReport:
    started = time.perf_counter()
    admin_key = "adm_" + secrets.token_urlsafe(24)
    # Its own node id: a `serve` of this host on the same database keeps the host name.
    node_options = NodeOptions(
        database_url=database_url(), admin_key=admin_key, port=0, node_id="simulate"
    )
    credit = options.credit or math.ceil(
        options.messages / options.accounts * NORMAL_PRICE * (1 + options.express_share) * 0.8
    )
    print(
        f"smsgw simulate: {options.messages} messages from {options.accounts} accounts"
        f" ({credit} credit each), {options.connections} connections",
        file=sys.stderr,
    )
    async with asyncio_loop(), trio.open_nursery() as nursery:
        node = await nursery.start(partial(run_node, node_options))
        try:
            headers = {"Authorization": f"Bearer {admin_key}"}
            async with httpx.AsyncClient(base_url=node.url, headers=headers) as http:
                accounts = []
                for i in range(options.accounts):
                    r = await http.post("/v1/accounts", json={"name": f"sim-{i}", "credit": credit})
                    r.raise_for_status()
                    accounts.append(r.json())
            account_ids = [a["id"] for a in accounts]
            load = await _run_load(node.url, [a["api_key"] for a in accounts], options)
            accepted = load["by_status"].get("202", 0)
            print(f"load done: {accepted} accepted; waiting for final states", file=sys.stderr)
            counts = {}
            with trio.move_on_after(options.timeout):
                counts = await _wait_final(node.store.db, account_ids)
            reconciliation = await reconcile(node.store.db, account_ids)
        finally:
            node.stop.set()
    wall = time.perf_counter() - started
    sent = counts.get("sent", 0)
    failed = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("failed:")}
    stored = sum(counts.values())
    not_final = counts.get("queued", 0) + counts.get("sending", 0)
    report = SimulationReport(
        cpu_count=os.cpu_count(),
        accounts=options.accounts,
        requests=load["requests"],
        accepted=accepted,
        rejected={k: v for k, v in load["by_status"].items() if k != "202"},
        stored=stored,
        lost=max(0, accepted - stored),
        sent=sent,
        failed=failed,
        not_final=not_final,
        accept_rate_per_s=load["rate_per_s"],
        end_to_end_per_s=round((sent + sum(failed.values())) / wall, 1),
        accept_latency_ms=load["latency_ms"],
        wall_seconds=round(wall, 2),
        reconciliation=reconciliation,
    )
    _print_report(report)
    _write_report(report, Path(options.report_dir))
    return report


async def _run_load(url: str, keys: list[str], options: SimulateOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="smsgw-sim-") as tmp:
        keys_file = Path(tmp) / "keys.json"
        keys_file.write_text(json.dumps(keys))
        command = [
            sys.executable,
            "-m",
            "smsgw.sim.loadgen",
            "--url",
            url,
            "--keys",
            str(keys_file),
            "--connections",
            str(options.connections),
            "--count",
            str(options.messages),
            "--duration",
            str(int(options.timeout)),
            "--express-share",
            str(options.express_share),
            "--seed",
            str(options.seed),
        ]
        done = await trio.run_process(command, capture_stdout=True)
        result: dict[str, Any] = json.loads(done.stdout)
        return result


async def _wait_final(db: Database, account_ids: list[int]) -> dict[str, int]:
    while True:
        counts = await _message_counts(db, account_ids)
        if counts.get("queued", 0) + counts.get("sending", 0) == 0:
            return counts
        await trio.sleep(0.2)


def _print_report(r: SimulationReport) -> None:
    rec = r.reconciliation
    lines = [
        "",
        "smsgw simulation report",
        "=======================",
        f"cpus                    {r.cpu_count}",
        f"requests                {r.requests}",
        f"accepted (202)          {r.accepted}",
        f"rejected                {_fmt(r.rejected) or 'none'}",
        f"stored                  {r.stored} (lost: {r.lost})",
        f"sent                    {r.sent}",
        f"failed                  {sum(r.failed.values())} ({_fmt(r.failed) or 'none'})",
        f"not final               {r.not_final}",
        f"accept throughput       {r.accept_rate_per_s:.1f} msg/s",
        f"end-to-end throughput   {r.end_to_end_per_s:.1f} msg/s (accept to final, wall)",
        "accept latency          "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in r.accept_latency_ms.items()),
        f"wall time               {r.wall_seconds:.1f} s",
        f"credit reconciliation   expected balance {rec.expected_balance}, actual"
        f" {rec.actual_balance}, held {rec.held}, captured {rec.captured},"
        f" refunded {rec.refunded}, ledger {'ok' if rec.ledger_ok else 'MISMATCH'}:"
        f" {rec.matching}/{rec.accounts} accounts {'MATCH' if rec.ok else 'MISMATCH'}",
        f"result                  {'PASS' if r.ok else 'FAIL'}",
    ]
    print("\n".join(lines))


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _write_report(report: SimulationReport, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"simulate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    print(f"report written to {path}")
