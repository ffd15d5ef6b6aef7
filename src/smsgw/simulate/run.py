"""`smsgw simulate SCENARIO`: run a scenario in virtual time or on the wall clock, and report.

Wall clock: a gateway node in this process (real hypercorn on 127.0.0.1, real PostgreSQL:
DATABASE_URL or the embedded server in var/pgdata, a fresh schema per run, dropped after),
driven over HTTP by the load generator in its own process (`python -m smsgw.sim.loadgen`).
Figures come from the load generator (accept latency), from samples of the node's counters
each second (throughput, backlog, operator health) and from PostgreSQL afterwards (final
statuses, accept-to-sent latency, fairness, the credit reconciliation of storage/ledger.py,
and whether every id that got a 202 is stored). It replays a scenario's message count,
accounts, skew and express share, not its time shape: the load is closed loop.

Virtual time: smsgw.simulate.virtual.
"""

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

from smsgw.runtime.server import NodeOptions, run_node
from smsgw.sim.loadgen import LoadReport
from smsgw.sim.operator import CountingProvider, SimulatedOperator
from smsgw.simulate.report import (
    Bucket,
    Check,
    CreditCheck,
    FairnessRow,
    Live,
    Quantiles,
    RunInfo,
    SimReport,
    WaitHistogram,
    default_folder,
    fairness_groups,
    judge,
    outages_of,
    utc_now,
    write,
)
from smsgw.simulate.scenarios import Mode, Scenario, Target, scenario
from smsgw.storage.database import Database, asyncio_loop
from smsgw.storage.embedded import database_url
from smsgw.storage.ledger import LEDGER_SQL, broken_identities

NORMAL_PRICE = 5
EXPRESS_PRICE = 7
FINAL_TIMEOUT_S = 300.0
# A closed-loop wall run goes at about this many messages a second on 2 cores: outage windows
# of a scenario are squeezed by (its messages / this) / its duration to land inside the run.
WALL_RATE_ESTIMATE = 500.0


class Overrides(msgspec.Struct, frozen=True, kw_only=True):
    """Command-line changes to a scenario (None: keep the scenario's)."""

    accounts: int | None = None
    messages: int | None = None
    connections: int | None = None
    credit: int | None = None
    express_share: float | None = None
    final_timeout: float | None = None

    def apply(self, s: Scenario) -> Scenario:
        changes = {
            k: v
            for k, v in (
                ("accounts", self.accounts),
                ("messages", self.messages),
                ("connections", self.connections),
                ("credit_per_account", self.credit),
                ("express_share", self.express_share),
            )
            if v is not None
        }
        return msgspec.structs.replace(s, **changes) if changes else s


def wall_squeeze(s: Scenario) -> float:
    """The factor a wall-clock run compresses the scenario's time by (see WALL_RATE_ESTIMATE)."""
    return min(1.0, (s.messages / WALL_RATE_ESTIMATE) / s.duration_s)


def run(
    name: str,
    *,
    mode: Mode | None = None,
    scale: float = 1.0,
    seed: int | None = None,
    out: Path | None = None,
    live: bool = True,
    overrides: Overrides | None = None,
) -> tuple[SimReport, Path]:
    """Run scenario `name`, write its report folder (under var/reports by default) and
    print a summary; returns the report and the folder."""
    overrides = overrides or Overrides()
    chosen = overrides.apply(scenario(name, scale=scale, seed=seed))
    mode = mode or chosen.mode
    if mode == "virtual":
        from smsgw.simulate.virtual import run_virtual

        report = run_virtual(chosen, live=live)
    else:
        timeout = overrides.final_timeout or FINAL_TIMEOUT_S
        report = trio.run(partial(simulate_wall, chosen, live=live, final_timeout=timeout))
    folder = out if out is not None else default_folder(Path("var/reports"), chosen.name)
    write(report, folder)
    print_summary(report, folder)
    return report, folder


def print_summary(report: SimReport, folder: Path) -> None:
    lines = [
        "",
        f"smsgw simulate {report.scenario} ({report.mode}, scale {report.scale:g},"
        f" seed {report.seed}): {'PASS' if report.passed else 'FAIL'}",
    ]
    for k, v in report.totals.items():
        lines.append(f"  {k:<34} {v:>12,}")
    for name, q in report.latency.items():
        lines.append(
            f"  {name + ' latency':<34} p50 {q.p50_s * 1000:.1f} ms, p95 {q.p95_s * 1000:.1f} ms,"
            f" p99 {q.p99_s * 1000:.1f} ms"
        )
    c = report.credit
    lines.append(
        f"  {'credit':<34} {c.matching}/{c.accounts} accounts reconcile;"
        f" captured {c.captured:,}, held {c.held:,}, refunded {c.refunded:,}"
    )
    for check in report.checks:
        lines.append(
            f"  check {check.name:<28} {'ok' if check.passed else 'FAILED'} {check.detail}"
        )
    for t in report.targets:
        value = "n/a" if t.value is None else f"{t.value:g}"
        lines.append(f"  [{'PASS' if t.passed else 'FAIL'}] {t.label} (value {value})")
    lines.append(f"  wall time {report.run.wall_s:.1f} s on {report.run.cpu_count} cores")
    lines.append(f"report: {folder}/report.md")
    print("\n".join(lines), flush=True)


# --- wall clock -------------------------------------------------------------------------------


class _Sampler:
    """Per-second samples of a running node: accepted, finished, backlog, operator attempts."""

    def __init__(self, bucket_s: float) -> None:
        self.bucket_s = bucket_s
        self.started = trio.current_time()
        self.timeline: list[Bucket] = []
        self.ops: dict[str, dict[str, int]] = {}
        self._last = (0, 0, 0, 0)

    def bucket(self) -> Bucket:
        index = int((trio.current_time() - self.started) // self.bucket_s)
        while len(self.timeline) <= index:
            self.timeline.append(Bucket(t_s=len(self.timeline) * self.bucket_s, operators={}))
        return self.timeline[index]

    def count(self, operator: str, kind: str, n: int) -> None:
        per_bucket = self.bucket().operators.setdefault(operator, {})
        per_bucket[kind] = per_bucket.get(kind, 0) + n
        total = self.ops.setdefault(operator, {})
        total[kind] = total.get(kind, 0) + n

    def sample(self, node: Any) -> tuple[int, int, int]:
        """Move the node's cumulative counters into the current bucket; (accepted, refused,
        final)."""
        figures = node.engine.writer.figures
        credit = figures.credit
        refused = sum(figures.refused.values())
        accepted = credit.get("held_messages", 0)
        sent = credit.get("captured_messages", 0)
        failed = credit.get("released_messages", 0)
        bucket = self.bucket()
        a0, r0, s0, f0 = self._last
        bucket.accepted += accepted - a0
        bucket.refused += refused - r0
        bucket.sent += sent - s0
        bucket.failed += failed - f0
        bucket.backlog = accepted - sent - failed
        self._last = (accepted, refused, sent, failed)
        return accepted, refused, sent + failed

    async def run(self, node: Any, live: Live | None) -> None:
        """Sample every `bucket_s` until cancelled. The bar counts requests answered
        (accepted and refused), less those answered before the load began (the opening
        checks), so it reaches the scenario's message count when the load generator ends."""
        accepted, refused, _ = self.sample(node)
        before = accepted + refused
        while True:
            await trio.sleep(self.bucket_s)
            accepted, refused, final = self.sample(node)
            if live is not None:
                live.update(
                    accepted + refused - before,
                    f"accepted {accepted:,}  refused {refused:,}  final {final:,}",
                )


async def simulate_wall(
    s: Scenario,
    *,
    live: bool = True,
    final_timeout: float = FINAL_TIMEOUT_S,
    database: str | None = None,
) -> SimReport:
    """Run `s` against a node on 127.0.0.1 with PostgreSQL at `database` (default:
    DATABASE_URL or the embedded server), in a fresh schema that is dropped afterwards."""
    started = time.perf_counter()
    started_at = utc_now()
    admin_key = "adm_" + secrets.token_urlsafe(24)
    schema = f"sim_{s.name.replace('-', '_')}_{secrets.token_hex(4)}"
    # Its own node id: a `serve` of this host on the same database keeps the host name.
    node_options = NodeOptions(
        database_url=database or database_url(),
        admin_key=admin_key,
        port=0,
        schema=schema,
        node_id="simulate",
    )
    sampler = _Sampler(1.0)
    squeeze = wall_squeeze(s)
    providers = []
    for profile, w in zip(s.operators, s.weights, strict=True):
        profile = msgspec.structs.replace(
            profile, outages=tuple((a * squeeze, b * squeeze) for a, b in profile.outages)
        )
        providers.append((CountingProvider(SimulatedOperator(profile), sampler.count), w))
    weights = s.zipf_weights()
    average_price = NORMAL_PRICE * (1 - s.express_share) + EXPRESS_PRICE * s.express_share
    credits = [
        s.credit_per_account
        or max(100, math.ceil(s.messages * w * average_price * s.credit_factor))
        for w in weights
    ]
    print(
        f"smsgw simulate {s.name} (wall clock): {s.messages:,} messages from {s.accounts:,}"
        f" accounts, {s.connections} connections; PostgreSQL schema {schema}",
        file=sys.stderr,
    )
    live_bar = Live(f"simulate {s.name}", s.messages) if live else None
    try:
        # PostgreSQL is reached through trio-asyncio: this task needs a loop of its own too.
        async with asyncio_loop(), trio.open_nursery() as nursery:
            node = await nursery.start(partial(run_node, node_options, providers))
            db: Database = node.store.db
            try:
                headers = {"Authorization": f"Bearer {admin_key}"}
                async with httpx.AsyncClient(base_url=node.url, headers=headers) as http:
                    accounts = []
                    for i, credit in enumerate(credits):
                        r = await http.post(
                            "/v1/accounts", json={"name": f"sim-{i}", "credit": credit}
                        )
                        r.raise_for_status()
                        accounts.append(r.json())
                    checks = await _checks(http, accounts[0]["api_key"]) if s.checks else []
                account_ids = [a["id"] for a in accounts]
                sampler.started = trio.current_time()
                # The sampler runs as long as the work, not as long as the node: the node's
                # nursery waits for it when stopping.
                async with trio.open_nursery() as sampling:
                    sampling.start_soon(sampler.run, node, live_bar)
                    load, lost = await _run_load(node.url, [a["api_key"] for a in accounts], s, db)
                    counts: dict[str, int] = {}
                    with trio.move_on_after(final_timeout):
                        counts = await _wait_final(db, account_ids)
                    sampling.cancel_scope.cancel()
                sampler.sample(node)
                report = await _report(
                    s, db, account_ids, load, lost, counts, checks, sampler, started, started_at
                )
            finally:
                node.stop.set()
                nursery.cancel_scope.deadline = trio.current_time() + 30
        # Once the node has stopped: its background actors (leases, callbacks, the DLR
        # reconciler, the pager) query the schema until then, and would deadlock the DROP.
        async with asyncio_loop():
            admin_db = await Database.open(node_options.database_url)
            try:
                await admin_db.run(lambda conn: conn.execute(f"DROP SCHEMA {schema} CASCADE"))
            finally:
                await admin_db.close()
    finally:
        if live_bar is not None:
            live_bar.close(s.messages)
    return report


async def _checks(http: httpx.AsyncClient, api_key: str) -> list[Check]:
    """The acceptance run's opening: health, readiness, then a single, an express and an OTP
    send, each followed until it is final."""
    checks: list[Check] = []
    r = await http.get("/health")
    checks.append(Check("health", r.status_code == 200, f"GET /health {r.status_code}"))
    r = await http.get("/ready")
    checks.append(Check("ready", r.status_code == 200, f"GET /ready {r.status_code}"))
    auth = {"Authorization": f"Bearer {api_key}"}
    sends = {
        "single": {"to": "+4915123456789", "text": "Hello from the acceptance run"},
        "express": {"to": "+4915123456788", "text": "Express hello", "express": True},
        "otp": {
            "to": "+4915123456787",
            "text": "Your code is 493021",
            "express": True,
            "client_ref": f"otp-{secrets.token_hex(4)}",
        },
    }
    for name, body in sends.items():
        r = await http.post("/v1/messages", json=body, headers=auth)
        if r.status_code != 202:
            checks.append(Check(name, False, f"POST /v1/messages {r.status_code}"))
            continue
        message_id = r.json()["id"]
        status = "queued"
        with trio.move_on_after(30):
            while status in ("queued", "sending"):
                await trio.sleep(0.05)
                g = await http.get(f"/v1/messages/{message_id}", headers=auth)
                status = g.json().get("status", "?") if g.status_code == 200 else "?"
        checks.append(
            Check(name, status in ("sent", "failed"), f"202, then {status} ({message_id})")
        )
    return checks


async def _run_load(url: str, keys: list[str], s: Scenario, db: Database) -> tuple[LoadReport, int]:
    """The load generator in its own process; returns its report and how many ids it got a
    202 for are not in the messages table (lost)."""
    with tempfile.TemporaryDirectory(prefix="smsgw-sim-") as tmp:
        keys_file = Path(tmp) / "keys.json"
        keys_file.write_text(json.dumps(keys))
        ids_file = Path(tmp) / "ids.txt"
        zipf = s.zipf if s.whale is None else 2.0  # the whale: rank 0 takes most of the load
        command = [
            sys.executable, "-m", "smsgw.sim.loadgen",
            "--url", url,
            "--keys", str(keys_file),
            "--connections", str(s.connections),
            "--count", str(s.messages),
            "--duration", str(int(min(3600, max(60, s.messages / 20)))),
            "--express-share", str(s.express_share),
            "--zipf", str(zipf),
            "--seed", str(s.seed),
            "--ids-out", str(ids_file),
        ]  # fmt: skip
        done = await trio.run_process(command, capture_stdout=True)
        load = msgspec.json.decode(done.stdout.strip().splitlines()[-1], type=LoadReport)
        ids = sorted(set(ids_file.read_text().split()))

    async def stored(conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM messages WHERE id = ANY($1)", ids))

    found = await db.run(stored) if ids else 0
    return load, len(ids) - found


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
        key = r["status"] if r["status"] != "failed" else f"failed: {r['reason']}"
        counts[key] = counts.get(key, 0) + r["n"]
    return counts


async def _wait_final(db: Database, account_ids: list[int]) -> dict[str, int]:
    while True:
        counts = await _message_counts(db, account_ids)
        if counts.get("queued", 0) + counts.get("sending", 0) == 0:
            return counts
        await trio.sleep(0.2)


async def _credit(db: Database, account_ids: list[int]) -> CreditCheck:
    """storage/ledger.py's reconciliation for the run's accounts, from PostgreSQL alone."""
    wanted = set(account_ids)
    rows = [r for r in await db.run(lambda c: c.fetch(LEDGER_SQL)) if r["id"] in wanted]
    broken = {str(r["id"]): broken_identities(dict(r), final=True) for r in rows}
    broken = {a: b for a, b in broken.items() if b}
    return CreditCheck(
        accounts=len(account_ids),
        matching=len(rows) - len(broken),
        topped_up=sum(r["topped_up"] for r in rows),
        captured=sum(r["captured"] for r in rows),
        held=sum(r["held"] for r in rows),
        refunded=sum(r["l_release"] for r in rows),
        balance=sum(r["balance"] for r in rows),
        broken=dict(list(broken.items())[:20]),
    )


async def _report(
    s: Scenario,
    db: Database,
    account_ids: list[int],
    load: LoadReport,
    lost: int,
    counts: dict[str, int],
    checks: list[Check],
    sampler: _Sampler,
    started: float,
    started_at: str,
) -> SimReport:
    rank = {account_id: i for i, account_id in enumerate(account_ids)}
    groups = fairness_groups(s)
    group_of = {}
    for index, (_, ranks) in enumerate(groups):
        for r in ranks:
            group_of[r] = index
    to_sent = WaitHistogram()
    express = WaitHistogram()
    group_waits = [WaitHistogram() for _ in groups]
    sent_express = late_express = 0

    async def waits(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return list(
            await conn.fetch(
                "SELECT account_id, express, status, reason,"
                " extract(epoch FROM updated_at - created_at)::float8 AS wait,"
                " coalesce(updated_at > deadline, false) AS late"
                " FROM messages WHERE account_id = ANY($1::bigint[])",
                account_ids,
            )
        )

    express_accepted = 0
    for r in await db.run(waits):
        if r["express"]:
            express_accepted += 1
        if r["status"] == "sent":
            wait = max(0.0, r["wait"])
            to_sent.add(wait)
            group_waits[group_of[rank[r["account_id"]]]].add(wait)
            if r["express"]:
                express.add(wait)
                sent_express += 1
                late_express += bool(r["late"])
        elif r["express"] and r["reason"] == "deadline_exceeded":
            late_express += 1
    credit = await _credit(db, account_ids)
    # The opening checks' sends are in PostgreSQL too: count them with the load.
    check_sends = sum(c.detail.startswith("202") for c in checks)
    accepted = load.by_status.get("202", 0) + check_sends
    requests = load.requests + check_sends
    sent = counts.get("sent", 0)
    failed = {k: v for k, v in counts.items() if k.startswith("failed: ")}
    not_final = counts.get("queued", 0) + counts.get("sending", 0)
    totals: dict[str, int] = {
        "offered": requests,
        "accepted": accepted,
        **{f"refused: HTTP {k}": v for k, v in load.by_status.items() if k != "202"},
        "errors, timeouts, unanswered": load.errors + load.timeouts + load.unanswered,
        "sent": sent,
        "failed": sum(failed.values()),
        **failed,
        "not_final": not_final,
        "lost": lost,
    }
    ok_final = accepted - lost - not_final
    figures: dict[str, float] = {
        "lost": lost,
        "not_final": not_final,
        "credit_mismatches": credit.accounts - credit.matching,
        "success_rate": round(ok_final / requests, 6) if requests else 0.0,
        "sent_share": round(sent / accepted, 6) if accepted else 0.0,
        "express_within_deadline": (
            round(1 - late_express / express_accepted, 6) if express_accepted else 1.0
        ),
        "checks_failed": sum(not c.passed for c in checks),
        "accept_rate_per_s": load.rate_per_s,
        "to_sent_p95_s": to_sent.quantile(0.95),
    }
    waits_p95 = [h.quantile(0.95) for h in group_waits if h.count]
    if len(waits_p95) >= 2 and waits_p95[0] > 0:
        figures["fairness_p95_ratio"] = round(waits_p95[-1] / waits_p95[0], 4)
    accept = _accept_quantiles(load)
    targets = judge(s.targets, figures)
    if checks:
        targets += judge(
            [Target("checks_failed", "<=", 0, "health, single, express and OTP checks pass")],
            figures,
        )
    return SimReport(
        scenario=s.name,
        description=s.description,
        mode="wall",
        scale=s.scale,
        seed=s.seed,
        duration_s=load.duration_s,
        offered=requests,
        totals=totals,
        figures=figures,
        latency={
            "accept": accept,
            "accept_to_sent": to_sent.summary(),
            "express_to_sent": express.summary(),
        },
        cdf={
            "accept": [(ms / 1000.0, f) for ms, f in load.latency_cdf_ms],
            "accept to sent": to_sent.cdf(),
            "express to sent": express.cdf(),
        },
        bucket_s=sampler.bucket_s,
        timeline=sampler.timeline,
        fairness=[
            FairnessRow(name, len(ranks), hist.count, hist.summary())
            for (name, ranks), hist in zip(groups, group_waits, strict=True)
        ],
        operators=sampler.ops,
        credit=credit,
        targets=targets,
        passed=all(t.passed for t in targets),
        checks=checks,
        outages=outages_of(s.operators, wall_squeeze(s)),
        run=RunInfo(
            wall_s=round(time.perf_counter() - started, 2),
            cpu_count=os.cpu_count(),
            started_at=started_at,
            items=accepted,
            note=(
                f"Wall clock: one node in-process on 127.0.0.1, PostgreSQL, the load generator"
                f" in its own process ({s.connections} closed-loop connections,"
                f" {load.rate_per_s:,.0f} accepts/s). The machine may have been shared."
            ),
        ),
    )


def _accept_quantiles(load: LoadReport) -> Quantiles:
    summary = load.latency_ms
    if summary is None:
        return WaitHistogram().summary()
    hist = WaitHistogram()
    previous = 0.0
    # Rebuild a histogram from the generator's CDF points (bucket resolution either way).
    total = load.requests
    for ms, fraction in load.latency_cdf_ms:
        n = round((fraction - previous) * total)
        if n > 0:
            hist.add(ms / 1000.0, n)
        previous = fraction
    q = hist.summary()
    return msgspec.structs.replace(
        q,
        p50_s=summary.p50 / 1000.0,
        p95_s=summary.p95 / 1000.0,
        p99_s=summary.p99 / 1000.0,
        max_s=summary.max / 1000.0,
    )
