"""Messages per second through one node: COPY floor, batch accepts, sustained end to end, and
dispatch under saturated single-message intake, side by side in one run.

    python benchmarks/throughput.py [--quick] [--rate 12000] [--profile] [--out DIR]

Phases, each on a fresh schema (PostgreSQL is DATABASE_URL when set, else an embedded server
started once in a temporary folder), each gateway `smsgw serve` in its own process, each load
from `python -m smsgw.sim.loadgen` in its own process, everything on 127.0.0.1 only:

  copy            `copy_records_to_table` of --copy-rows gateway-shaped rows into an empty
                  messages table made by the migrations (same columns and indexes): the floor
                  PostgreSQL sets for writing messages, rows/s (median of --copy-rounds)
  batch_accepts   POST /v1/messages/batch, --batch-connections x --batch-size messages, closed
                  loop for --batch-duration s: accepted messages/s, against copy (>= 0.70).
                  The node sends at most --batch-operator-cap msg/s meanwhile (a campaign
                  uploaded faster than operators take it: intake is what is measured); a node
                  restarted without the cap drains the backlog (recovery) for reconciliation
  batch_dispatching  the same with dispatch flat out: every message accepted is also sent
                  and its status committed, on the same two cores
  sustained       open loop at --rate messages/s in batches of --sustained-batch for
                  --sustained-duration s, to the in-process simulated operator with
                  --operator-latency-ms (median,p99): accepted/s, sent/s, backlog, accept->sent
  sustained_http  the same, the simulated operator in its own process over HTTP
                  (`python -m smsgw.sim.operator_server`, `smsgw serve --operator-url`)
  sustained_smpp  the same, over SMPP to the simulated SMSC in its own process
                  (`python -m smsgw.sim.smsc`: --smpp-binds binds, each with a window of
                  --smpp-window and --smpp-tps, receipts on): sent/s (a message counts once
                  it reached `sent`, or a receipt moved it on) and receipts ingested/s
  saturated       single-message POSTs on --saturated-connections connections, closed loop for
                  --saturated-duration s: messages reaching an operator per second against
                  messages accepted per second (>= 0.90)

Each gateway is one node (`--workers 1`) unless --workers says more (several nodes on one port,
as `serve` runs by default: one per core).

Window figures (accepted/s, sent/s, accept->sent) come from PostgreSQL over the measured wall
clock window [t0, t1): created_at of accepted rows, updated_at of sent rows. Backlog is the
count of non-final rows and the scheduler's backlog (GET /v1/ops/supervisor) at t0 and t1.
After each gateway phase: every id that got a 202 must be in PostgreSQL (durable); the backlog
is given up to --drain-timeout s to drain; then a reconciliation query checks every message
is final, charged exactly once (one hold each, one capture per sent, one release per failed)
and every account's top-ups - captured - held = balance. Prints one JSON object on stdout and
writes throughput.json and throughput.md into --out. Exit code 1 when a phase lost an accepted
message or failed reconciliation; throughput targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import psutil

from common import (
    LOOPBACK,
    REPO_ROOT,
    CpuMeter,
    CpuUse,
    DelayedProfile,
    Durability,
    Server,
    add_past_partitions,
    check_durable,
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
from smsgw.engine.messages import OutboundSms
from smsgw.http.context import uuid7
from smsgw.sim.loadgen import LoadReport
from smsgw.storage.commit_sql import COPY_COLUMNS
from smsgw.storage.commit_sql import copy_records as gateway_copy_records
from smsgw.storage.ledger import LEDGER_SQL, broken_identities
from smsgw.storage.migrate import migration_files

CREDIT = 10**12  # per account: far more than any run can spend
OPERATOR_NAME = "sim"  # `serve`'s in-process simulated operator (--operator-name)
TARGETS = {"batch_vs_copy": 0.70, "dispatch_vs_accept": 0.90}
LOADGEN_STARTUP_S = 0.5  # from spawning the load generator to its first request, about
LOADGEN_TAIL_S = 1.0  # load keeps going this long past t1, so the window is all under load
PROFILE_S = 10.0
SEGMENT_TEXT = "Your code is 123456"  # the load generator's default text
COPY_SEED = 9


# --- PostgreSQL, read directly ---------------------------------------------------------------


def query(url: str, schema: str | None, sql: str, *args: Any) -> list[dict[str, Any]]:
    """One statement on a fresh connection (one snapshot), in `schema`."""

    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            if schema is not None:
                await conn.execute(f"SET search_path TO {schema}")
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


PENDING_SQL = "SELECT count(*) AS n FROM messages WHERE status IN ('queued', 'sending')"


def pending(url: str, schema: str) -> int:
    return int(query(url, schema, PENDING_SQL)[0]["n"])


# --- a: the COPY floor ----------------------------------------------------------------------


class CopyResult(msgspec.Struct):
    rows: int
    rounds: int
    seconds: list[float]  # per round: the COPY call alone
    rows_per_s: float  # median of the rounds
    duration_s: float  # the median round's COPY


def copy_records(rows: int, accounts: int) -> list[tuple[Any, ...]]:
    """Rows exactly as the gateway COPYs them (`smsgw.storage.commit_sql.copy_records`) for the load
    generator's messages: UUIDv7 ids, a few accounts, client refs, and recipients drawn at
    random as the load generator draws them (sequential numbers would land every
    recipient-index entry at the end of its account's range: a floor the gateway's own rows
    can never reach)."""
    now = time.time()
    prefix = f"cp-{os.urandom(4).hex()}"
    rng = random.Random(COPY_SEED)
    messages = [
        OutboundSms(
            id=uuid7(),
            account_id=1 + n % accounts,
            to=f"+4479{rng.randrange(100_000_000):08d}",
            sender="smsgw",
            text=SEGMENT_TEXT,
            segments=1,
            price=5,
            express=False,
            created_at=now + n * 1e-5,
            client_ref=f"{prefix}-{n}",
        )
        for n in range(rows)
    ]
    return gateway_copy_records(messages)


def copy_phase(url: str, args: argparse.Namespace) -> CopyResult:
    seconds: list[float] = []
    for r in range(1, args.copy_rounds + 1):
        schema = fresh_schema("bench_copy")
        records = copy_records(args.copy_rows, args.accounts)

        async def run(schema: str = schema, records: list[tuple[Any, ...]] = records) -> float:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f"CREATE SCHEMA {schema}")
                await conn.execute(f"SET search_path TO {schema}")
                for _, _, sql in migration_files():
                    await conn.execute(sql)
                started = time.perf_counter()
                await conn.copy_records_to_table(
                    "messages", records=records, columns=COPY_COLUMNS, schema_name=schema
                )
                return time.perf_counter() - started
            finally:
                await conn.close()

        try:
            took = asyncio.run(run())
        finally:
            drop_schema_quietly(url, schema, args)
        seconds.append(round(took, 3))
        log(f"copy#{r}: {args.copy_rows} rows in {took:.2f} s = {args.copy_rows / took:,.0f}/s")
    median = statistics.median(seconds)
    return CopyResult(
        rows=args.copy_rows,
        rounds=args.copy_rounds,
        seconds=seconds,
        rows_per_s=round(args.copy_rows / median, 1),
        duration_s=median,
    )


def drop_schema_quietly(url: str, schema: str, args: argparse.Namespace) -> None:
    if args.keep_schemas:
        return
    try:
        drop_schema(url, schema)
    except Exception as exc:
        log(f"could not drop schema {schema}: {exc}")


# --- gateway phases ---------------------------------------------------------------------------


class PhaseSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    duration: float
    warmup: float
    connections: int
    batch: int | None = None
    rate: float | None = None
    operator: str = "in-process"  # or "http", "smpp"
    latency_ms: tuple[float, float] | None = None  # operator median, p99
    # Messages a second the node may send to its (in-process) operator during the window;
    # the backlog is then drained by a node restarted without the cap. None: no cap.
    operator_cap: float | None = None


class Backlog(msgspec.Struct):
    """Non-final messages at a moment: in PostgreSQL, and in the node's own view."""

    db_pending: int
    scheduler: int | None  # bulk + express backlog waiting for the window
    inflight: int | None  # at operators now
    retrying: int | None  # waiting in the retry timer
    # The group commit so far (GET /v1/ops/supervisor's store_writer): groups, rows, and
    # each commit's seconds (count, mean, p50/p99 bucket bounds).
    writer: dict[str, Any] | None = None


class Window(msgspec.Struct):
    """What PostgreSQL says happened in the measured wall-clock window."""

    seconds: float
    accepted: int
    sent: int
    receipts: int  # moved on to delivered/undelivered by a receipt in the window
    failed: int
    reached_operator: int  # final with an operator's answer: sent, or refused by it
    accepted_per_s: float
    sent_per_s: float
    reached_operator_per_s: float
    sent_per_second: dict[str, float] | None  # min / median / max over whole seconds
    accept_to_sent_ms: dict[str, float] | None  # p50 / p99 of the sent
    accept_to_sent_first_attempt_ms: dict[str, float] | None  # the same, no retries


class Reconciliation(msgspec.Struct):
    accounts: int
    accounts_ok: int
    messages: int
    sent: int
    failed: int
    pending: int
    captured: int
    held: int
    balance: int
    topped_up: int
    problems: list[str]  # the first few accounts that break an identity
    ok: bool


class GatewayPhase(msgspec.Struct, kw_only=True):
    name: str
    spec: PhaseSpec
    duration_s: float  # the measured window
    load: dict[str, Any]  # the load generator's report
    window: Window
    backlog_start: Backlog
    backlog_end: Backlog
    backlog_grew: bool
    durability: Durability
    drain_s: float | None  # after the load, until no message was pending; None: not drained
    drain_pending_left: int
    reconciliation: Reconciliation
    cpu: CpuUse
    operator_cpu: CpuUse | None
    postgres_cpu: float | None  # % of one core, embedded PostgreSQL only
    profile: dict[str, Any] | None
    loadavg_before: list[float] | None
    loadavg_after: list[float] | None


class PostgresCpu:
    """CPU of the embedded PostgreSQL (its postmaster and the processes it forked), in percent
    of one core between `start` and `stop`. Backends that exit meanwhile take their CPU with
    them, so it is a floor; the gateway's pooled connections live through a phase. None with
    DATABASE_URL (the server may be anywhere)."""

    def __init__(self, data_dir: Path | None) -> None:
        self._data_dir = data_dir
        self._start: float | None = None
        self._wall = 0.0

    def _cpu_s(self) -> float | None:
        if self._data_dir is None:
            return None
        try:
            postmaster = psutil.Process(
                int((self._data_dir / "postmaster.pid").read_text().split()[0])
            )
            processes = [postmaster, *postmaster.children()]
        except (OSError, ValueError, IndexError, psutil.Error):
            return None
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:  # a backend that ended since it was listed
                continue
            total += times.user + times.system
        return total

    def start(self) -> None:
        self._wall = time.monotonic()
        self._start = self._cpu_s()

    def stop(self) -> float | None:
        end = self._cpu_s()
        wall = time.monotonic() - self._wall
        if end is None or self._start is None or wall <= 0:
            return None
        return round(100.0 * (end - self._start) / wall, 1)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def supervisor(url: str, admin_key: str) -> dict[str, dict[str, Any]]:
    """Each child's stats from GET /v1/ops/supervisor; {} when it cannot be read."""
    try:
        r = httpx.get(
            f"{url}/v1/ops/supervisor",
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=5.0,
        )
        r.raise_for_status()
        return {c["name"]: c.get("stats") or {} for c in r.json()["children"]}
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log(f"supervisor status unavailable: {exc}")
        return {}


def backlog(url: str, schema: str, gateway_url: str, admin_key: str) -> Backlog:
    children = supervisor(gateway_url, admin_key)
    scheduler = children.get("scheduler", {})
    pool = children.get("provider_pool", {})
    retry = children.get("retry_timer", {})
    queued = None
    if "bulk_backlog" in scheduler:
        queued = int(scheduler["bulk_backlog"]) + int(scheduler.get("express_backlog", 0))
    retrying = int(retry["waiting"]) if "waiting" in retry else None
    writer = children.get("store_writer", {})
    return Backlog(
        db_pending=pending(url, schema),
        scheduler=queued,
        inflight=int(pool["inflight"]) if "inflight" in pool else None,
        retrying=retrying,
        writer={k: writer[k] for k in ("groups", "items", "commit_seconds") if k in writer} or None,
    )


# A message that went out is `sent`, or `delivered`/`undelivered` once its receipt came (then
# updated_at is the receipt's time: later than the send by the SMSC's receipt delay).
WENT_OUT = "status IN ('sent', 'delivered', 'undelivered')"

WINDOW_SQL = f"""
SELECT
  count(*) FILTER (WHERE created_at >= $1 AND created_at < $2) AS accepted,
  count(*) FILTER (WHERE {WENT_OUT} AND updated_at >= $1 AND updated_at < $2) AS sent,
  count(*) FILTER (WHERE status IN ('delivered', 'undelivered')
                   AND updated_at >= $1 AND updated_at < $2) AS receipts,
  count(*) FILTER (WHERE status = 'failed' AND updated_at >= $1 AND updated_at < $2) AS failed,
  count(*) FILTER (WHERE status = 'failed' AND operator IS NOT NULL
                   AND updated_at >= $1 AND updated_at < $2) AS failed_at_operator
FROM messages
"""

PER_SECOND_SQL = f"""
SELECT floor(extract(epoch FROM updated_at))::bigint AS second, count(*) AS n
FROM messages WHERE {WENT_OUT} AND updated_at >= $1 AND updated_at < $2
GROUP BY 1 ORDER BY 1
"""

LATENCY_SQL = f"""
SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
         ORDER BY extract(epoch FROM updated_at - created_at)) AS all_sent,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
         ORDER BY extract(epoch FROM updated_at - created_at))
         FILTER (WHERE attempts = 1) AS first_attempt
FROM messages WHERE {WENT_OUT} AND updated_at >= $1 AND updated_at < $2
"""


def window_figures(url: str, schema: str, t0: float, t1: float) -> Window:
    start, end = utc(t0), utc(t1)
    seconds = t1 - t0
    counts = query(url, schema, WINDOW_SQL, start, end)[0]
    per_second = query(url, schema, PER_SECOND_SQL, start, end)
    # Whole seconds only: the first and last are cut by the window's edges.
    whole = [r["n"] for r in per_second if t0 <= r["second"] and r["second"] + 1 <= t1]
    latency = query(url, schema, LATENCY_SQL, start, end)[0]

    def ms(pair: list[float] | None) -> dict[str, float] | None:
        if not pair or pair[0] is None:
            return None
        return {"p50": round(pair[0] * 1000, 1), "p99": round(pair[1] * 1000, 1)}

    reached = counts["sent"] + counts["failed_at_operator"]
    return Window(
        seconds=round(seconds, 3),
        accepted=counts["accepted"],
        sent=counts["sent"],
        receipts=counts["receipts"],
        failed=counts["failed"],
        reached_operator=reached,
        accepted_per_s=round(counts["accepted"] / seconds, 1),
        sent_per_s=round(counts["sent"] / seconds, 1),
        reached_operator_per_s=round(reached / seconds, 1),
        sent_per_second=(
            {"min": min(whole), "median": statistics.median(whole), "max": max(whole)}
            if whole
            else None
        ),
        accept_to_sent_ms=ms(latency["all_sent"]),
        accept_to_sent_first_attempt_ms=ms(latency["first_attempt"]),
    )


def reconcile(url: str, schema: str) -> Reconciliation:
    rows = query(url, schema, LEDGER_SQL)
    problems: list[str] = []
    ok_accounts = 0
    for a in rows:
        broken = broken_identities(a)
        if broken:
            if len(problems) < 5:
                problems.append(f"account {a['id']}: {', '.join(broken)}")
        else:
            ok_accounts += 1

    def total(key: str) -> int:
        return int(sum(a[key] for a in rows))

    return Reconciliation(
        accounts=len(rows),
        accounts_ok=ok_accounts,
        messages=total("n_all"),
        sent=total("n_sent"),
        failed=total("n_failed"),
        pending=total("n_pending"),
        captured=total("captured"),
        held=total("held"),
        balance=total("balance"),
        topped_up=total("topped_up"),
        problems=problems,
        ok=bool(rows) and ok_accounts == len(rows),
    )


def drain(url: str, schema: str, timeout: float) -> tuple[float | None, int]:
    """Wait until no message is pending: (seconds it took or None, pending left)."""
    started = time.monotonic()
    left = pending(url, schema)
    while left > 0:
        if time.monotonic() - started > timeout:
            return None, left
        time.sleep(0.5)
        left = pending(url, schema)
    return round(time.monotonic() - started, 2), 0


# --- processes --------------------------------------------------------------------------------


@contextmanager
def operator_server(spec: PhaseSpec, out: Path) -> Iterator[Server]:
    median, p99 = spec.latency_ms or (20.0, 80.0)
    command = operator_server_command(
        "--latency-ms-median", str(median), "--latency-ms-p99", str(p99)
    )
    with run_server(command, log_path=out / f"{spec.name}.operator.log") as server:
        yield server


@contextmanager
def smsc_server(args: argparse.Namespace, out: Path) -> Iterator[Server]:
    command = [sys.executable, "-m", "smsgw.sim.smsc", "--port", "0"]
    command += ["--window", str(args.smpp_window), "--receipt-delay-ms", "50"]
    with run_server(command, log_path=out / "sustained_smpp.smsc.log") as server:
        yield server


def start_loadgen(
    url: str, keys_file: Path, spec: PhaseSpec, ids_file: Path
) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "smsgw.sim.loadgen", "--url", url, "--keys", str(keys_file)]
    command += ["--connections", str(spec.connections), "--warmup", str(spec.warmup)]
    command += ["--duration", str(spec.warmup + LOADGEN_STARTUP_S + spec.duration + LOADGEN_TAIL_S)]
    command += ["--ids-out", str(ids_file)]
    if spec.batch is not None:
        command += ["--batch", str(spec.batch)]
    if spec.rate is not None:
        command += ["--rate", str(spec.rate)]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )


def finish_loadgen(process: subprocess.Popen[str], timeout: float) -> LoadReport:
    try:
        stdout, _ = process.communicate(timeout=timeout)
    finally:
        stop_process(process, grace=5)
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed with exit code {process.returncode}")
    return msgspec.json.decode(stdout.strip().splitlines()[-1], type=LoadReport)


# --- one gateway phase ------------------------------------------------------------------------


def gateway_phase(spec: PhaseSpec, url: str, args: argparse.Namespace, work: Path) -> GatewayPhase:
    schema = fresh_schema(f"bench_tp_{spec.name}")
    admin_key = new_admin_key()
    ids_file = work / f"{spec.name}.ids"
    keys_file = work / f"{spec.name}.keys.json"
    log(f"{spec.name}: schema {schema}, {spec}")
    try:
        with ExitStack() as stack:
            extra: list[str] = []
            operator: Server | None = None
            if spec.operator == "http":
                operator = stack.enter_context(operator_server(spec, args.out))
                extra += ["--operator-url", operator.url]
            elif spec.operator == "smpp":
                operator = stack.enter_context(smsc_server(args, args.out))
                port = urlsplit(operator.url).port
                query = f"binds={args.smpp_binds}&window={args.smpp_window}&tps={args.smpp_tps}"
                extra += ["--operator-url", f"smsc=smpp://gw:pw@{LOOPBACK}:{port}?{query}"]
            elif spec.latency_ms is not None:
                extra += ["--operator-latency-ms", f"{spec.latency_ms[0]},{spec.latency_ms[1]}"]
            capped: list[str] = []
            if spec.operator_cap is not None:
                routing = work / f"{spec.name}.routing.json"
                cap = {"name": OPERATOR_NAME, "max_per_second": spec.operator_cap}
                routing.write_text(json.dumps({"operators": [cap]}))
                capped = ["--routing", str(routing)]
            env = gateway_env(url, schema, admin_key)
            gateway = stack.enter_context(
                run_server(
                    [*gateway_command(workers=args.workers), *extra, *capped],
                    log_path=args.out / f"{spec.name}.log",
                    env=env,
                )
            )
            add_past_partitions(url, schema, args.past_days)
            keys = create_accounts(gateway.url, admin_key, args.accounts, credit=CREDIT)
            keys_file.write_text(json.dumps(keys))
            load_before = loadavg()
            meter = CpuMeter(gateway.process.pid)
            pg_meter = PostgresCpu(args.pg_data_dir)
            pg_meter.start()
            op_meter = CpuMeter(operator.process.pid) if operator is not None else None
            meter.start()
            if op_meter is not None:
                op_meter.start()
            launched = time.time()
            loadgen = start_loadgen(gateway.url, keys_file, spec, ids_file)
            try:
                profiler = None
                time.sleep(max(0.0, launched + LOADGEN_STARTUP_S + spec.warmup - time.time()))
                t0 = time.time()
                start = backlog(url, schema, gateway.url, admin_key)
                if args.profile:
                    # The middle of the window: steady state, clear of both edges.
                    seconds = min(PROFILE_S, spec.duration)
                    profiler = DelayedProfile(
                        gateway.process.pid,
                        max(0.0, (spec.duration - seconds) / 2 - (time.time() - t0)),
                        seconds,
                        args.out / f"{spec.name}.pyspy.txt",
                    )
                time.sleep(max(0.0, t0 + spec.duration - time.time()))
                t1 = time.time()
                end = backlog(url, schema, gateway.url, admin_key)
                load = finish_loadgen(loadgen, spec.warmup + spec.duration + 60)
            finally:
                stop_process(loadgen, grace=5)
            cpu = meter.stop()
            postgres_cpu = pg_meter.stop()
            operator_cpu = op_meter.stop() if op_meter is not None else None
            load_after = loadavg()
            profile = profiler.finish() if profiler is not None else None
            window = window_figures(url, schema, t0, t1)
            durability = check_durable(url, schema, ids_file)
            if capped:
                # The backlog the cap built up goes out from a node without it: a restart
                # (graceful stop, then recovery of every queued message from PostgreSQL).
                log(f"{spec.name}: restarting the node without the operator cap to drain")
                stop_process(gateway.process)
                stack.enter_context(
                    run_server(
                        [*gateway_command(workers=args.workers), *extra],
                        log_path=args.out / f"{spec.name}.drain.log",
                        env=env,
                    )
                )
            log(
                f"{spec.name}: accepted {window.accepted_per_s:,.0f}/s, sent"
                f" {window.sent_per_s:,.0f}/s, pending {start.db_pending} -> {end.db_pending};"
                f" draining (up to {args.drain_timeout:g} s)"
            )
            drain_s, left = drain(url, schema, args.drain_timeout)
            reconciliation = reconcile(url, schema)
    finally:
        drop_schema_quietly(url, schema, args)
    offered = spec.rate or window.accepted_per_s
    grew = end.db_pending - start.db_pending > offered  # more than one second of load
    phase = GatewayPhase(
        name=spec.name,
        spec=spec,
        duration_s=window.seconds,
        load=msgspec.to_builtins(load),
        window=window,
        backlog_start=start,
        backlog_end=end,
        backlog_grew=grew,
        durability=durability,
        drain_s=drain_s,
        drain_pending_left=left,
        reconciliation=reconciliation,
        cpu=cpu,
        operator_cpu=operator_cpu,
        postgres_cpu=postgres_cpu,
        profile=profile,
        loadavg_before=load_before,
        loadavg_after=load_after,
    )
    log(
        f"{spec.name}: loadgen {load.items_per_s:,.0f} items/s ({load.rate_per_s:,.1f} req/s),"
        f" durable={durability.durable}, drained in {drain_s} s,"
        f" reconciliation {'ok' if reconciliation.ok else reconciliation.problems}"
    )
    return phase


# --- the run ----------------------------------------------------------------------------------


def specs(args: argparse.Namespace) -> list[PhaseSpec]:
    latency = args.operator_latency_ms
    batch = PhaseSpec(
        name="batch_accepts",
        duration=args.batch_duration,
        warmup=2.0,
        connections=args.batch_connections,
        batch=args.batch_size,
        operator_cap=args.batch_operator_cap or None,
    )
    return [
        batch,
        msgspec.structs.replace(batch, name="batch_dispatching", operator_cap=None),
        PhaseSpec(
            name="sustained",
            duration=args.sustained_duration,
            warmup=3.0,
            connections=args.sustained_connections,
            batch=args.sustained_batch,
            rate=args.rate,
            latency_ms=latency,
        ),
        PhaseSpec(
            name="sustained_http",
            duration=args.sustained_duration,
            warmup=3.0,
            connections=args.sustained_connections,
            batch=args.sustained_batch,
            rate=args.rate,
            operator="http",
            latency_ms=latency,
        ),
        PhaseSpec(
            name="sustained_smpp",
            duration=args.sustained_duration,
            warmup=3.0,
            connections=args.sustained_connections,
            batch=args.sustained_batch,
            rate=args.rate,
            operator="smpp",
        ),
        PhaseSpec(
            name="saturated",
            duration=args.saturated_duration,
            warmup=2.0,
            connections=args.saturated_connections,
            latency_ms=latency,
        ),
    ]


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator > 0 else None


def summarize(
    copy: CopyResult | None,
    phases: dict[str, GatewayPhase],
    args: argparse.Namespace,
    source: str,
    loadavg_start: list[float] | None,
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    if copy is not None:
        figures["copy_rows_per_s"] = copy.rows_per_s
    if "batch_accepts" in phases:
        b = phases["batch_accepts"]
        figures["batch_accepts_per_s"] = b.load["items_per_s"]
        figures["batch_accepts_per_s_db"] = b.window.accepted_per_s
        figures["batch_accepts_sent_per_s"] = b.window.sent_per_s
        if copy is not None:
            # PostgreSQL's count over the wall-clock window: the load generator's own window
            # also holds its last batches' round trips, after it stopped sending.
            value = ratio(b.window.accepted_per_s, copy.rows_per_s)
            checks["batch_vs_copy"] = {
                "value": value,
                "target": TARGETS["batch_vs_copy"],
                "pass": (value or 0.0) >= TARGETS["batch_vs_copy"],
            }
    if "batch_dispatching" in phases:
        b = phases["batch_dispatching"]
        figures["batch_dispatching"] = {
            "accepted_per_s": b.window.accepted_per_s,
            "sent_per_s": b.window.sent_per_s,
            "vs_copy": ratio(b.window.accepted_per_s, copy.rows_per_s) if copy else None,
        }
    for name in ("sustained", "sustained_http", "sustained_smpp"):
        if name in phases:
            p = phases[name]
            per_s = p.window.sent_per_s
            figures[name] = {
                "offered_per_s": p.load["offered_rate_per_s"],
                "target_per_s": p.spec.rate,
                "accepted_per_s": p.window.accepted_per_s,
                "sent_per_s": p.window.sent_per_s,
                "receipts_per_s": round(p.window.receipts / p.window.seconds, 1),
                # What a message that went out cost, at the window's steady rate: the gateway's
                # CPU and the operator process's (the HTTP simulator, or the SMSC), per message.
                "gateway_cpu_ms_per_sent": (
                    round(10 * p.cpu.server / per_s, 3)
                    if per_s and p.cpu.server is not None
                    else None
                ),
                "operator_cpu_ms_per_sent": (
                    round(10 * p.operator_cpu.server / per_s, 3)
                    if per_s and p.operator_cpu is not None and p.operator_cpu.server is not None
                    else None
                ),
                "pending_start": p.backlog_start.db_pending,
                "pending_end": p.backlog_end.db_pending,
                "scheduler_backlog_start": p.backlog_start.scheduler,
                "scheduler_backlog_end": p.backlog_end.scheduler,
                "backlog_grew": p.backlog_grew,
                "accept_to_sent_ms": p.window.accept_to_sent_ms,
                "accept_to_sent_first_attempt_ms": p.window.accept_to_sent_first_attempt_ms,
            }
            # Keeping up: the offered rate was accepted and sent, and no backlog built up
            # (issue 22 asks 0.97 of the SMPP phase).
            rate = p.spec.rate or 0.0
            target = 0.97 if name == "sustained_smpp" else 0.95
            checks[f"{name}_keeps_up"] = {
                "value": ratio(p.window.sent_per_s, rate),
                "target": target,
                "pass": not p.backlog_grew
                and p.window.accepted_per_s >= target * rate
                and p.window.sent_per_s >= target * rate,
            }
    if "saturated" in phases:
        s = phases["saturated"]
        value = ratio(s.window.reached_operator_per_s, s.window.accepted_per_s)
        figures["saturated"] = {
            "accepted_per_s": s.window.accepted_per_s,
            "reached_operator_per_s": s.window.reached_operator_per_s,
            "sent_per_s": s.window.sent_per_s,
            "ratio": value,
        }
        checks["dispatch_vs_accept"] = {
            "value": value,
            "target": TARGETS["dispatch_vs_accept"],
            "pass": (value or 0.0) >= TARGETS["dispatch_vs_accept"],
        }
    return {
        "benchmark": "throughput",
        "commit": git_commit(),
        "dirty": git_dirty(),
        "timestamp": utc_timestamp(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "database": source,
        "quick": args.quick,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out", "pg_data_dir")
        },
        "figures": figures,
        "checks": checks,
        "copy": msgspec.to_builtins(copy) if copy is not None else None,
        "phases": {name: msgspec.to_builtins(p) for name, p in phases.items()},
        "duration_s": {
            **({"copy": copy.duration_s} if copy is not None else {}),
            **{name: p.duration_s for name, p in phases.items()},
        },
        "durable": all(p.durability.durable for p in phases.values()),
        "reconciled": all(p.reconciliation.ok for p in phases.values()),
    }


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _nodes(workers: int) -> str:
    return "one node" if workers == 1 else f"{workers} nodes on one port"


def markdown(result: dict[str, Any]) -> str:
    out = [
        f"# Throughput: messages/s through {_nodes(result['settings'].get('workers', 1))}\n",
        f"Commit {result['commit']}{' (working tree modified)' if result['dirty'] else ''},"
        f" {result['timestamp']}, {result['cpu_count']} CPUs, PostgreSQL: {result['database']},"
        f" load average {result['loadavg_start']} at the start and {result['loadavg_end']} at"
        f" the end{', quick run' if result['quick'] else ''}. Figures from PostgreSQL over each"
        " measured wall-clock window unless marked loadgen.\n",
    ]
    copy = result["copy"]
    if copy is not None:
        out.append(
            f"**COPY floor:** {copy['rows']:,} rows in {copy['duration_s']} s ="
            f" **{copy['rows_per_s']:,.0f} rows/s** (median of {copy['rounds']};"
            f" rounds {copy['seconds']} s).\n"
        )
    rows = []
    for name, p in result["phases"].items():
        w, load, cpu = p["window"], p["load"], p["cpu"]
        rec = p["reconciliation"]
        latency = w["accept_to_sent_ms"] or {}
        first = w["accept_to_sent_first_attempt_ms"] or {}
        rows.append(
            [
                name,
                p["duration_s"],
                load.get("offered_rate_per_s") if p["spec"]["rate"] else "max",
                load["items_per_s"],
                w["accepted_per_s"],
                w["sent_per_s"],
                w["reached_operator_per_s"],
                f"{_cell(p['backlog_start']['db_pending'])} -> "
                f"{_cell(p['backlog_end']['db_pending'])}" + (" GREW" if p["backlog_grew"] else ""),
                f"{_cell(latency.get('p50'))} / {_cell(latency.get('p99'))}"
                f" ({_cell(first.get('p50'))} / {_cell(first.get('p99'))})",
                "yes" if p["durability"]["durable"] else f"NO ({p['durability']['missing']})",
                _cell(p["drain_s"])
                if p["drain_s"] is not None
                else f"NO ({p['drain_pending_left']})",
                "ok" if rec["ok"] else "FAIL",
                f"{_cell(cpu['server'])} / {_cell(p['postgres_cpu'])} / {_cell(cpu['loadgen'])}"
                f" / {_cell(cpu['machine'])}"
                + (
                    f" / op {_cell(p['operator_cpu']['server'])}"
                    if p["operator_cpu"] is not None
                    else ""
                ),
            ]
        )
    header = [
        "phase",
        "window s",
        "offered/s",
        "accepted/s (loadgen)",
        "accepted/s",
        "sent/s",
        "reached operator/s",
        "pending start -> end",
        "accept->sent ms p50 / p99 (1st attempt)",
        "durable",
        "drain s",
        "reconciled",
        "CPU % gateway / postgres / loadgen / machine",
    ]
    out.append(markdown_table(header, [[_cell(c) for c in row] for row in rows]))
    checks = [
        [name, c["value"], f">= {c['target']}", "pass" if c["pass"] else "FAIL"]
        for name, c in result["checks"].items()
    ]
    out.append("\n" + markdown_table(["check", "value", "target", "result"], checks))
    for name, p in result["phases"].items():
        if p.get("profile"):
            prof = p["profile"]
            out.append(
                f"\n**Profile of the gateway in {name}** ({prof['samples']} samples, py-spy,"
                " inclusive, smsgw code):\n\n"
            )
            out.append(
                markdown_table(
                    ["frame", "%"], [[f["frame"], f["percent"]] for f in prof["inclusive_smsgw"]]
                )
            )
            out.append(
                "\nSelf time by package: "
                + ", ".join(f"{k} {v}%" for k, v in prof["self_by_package"].items())
                + "\n"
            )
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s phases, a smaller COPY (CI)")
    parser.add_argument(
        "--phases",
        default=(
            "copy,batch_accepts,batch_dispatching,sustained,sustained_http,sustained_smpp,saturated"
        ),
    )
    parser.add_argument("--smpp-binds", type=int, default=4, help="sustained_smpp: binds")
    parser.add_argument("--smpp-window", type=int, default=50, help="sustained_smpp: per bind")
    parser.add_argument(
        "--smpp-tps", type=float, default=4_000.0, help="sustained_smpp: PDUs/s a bind may send"
    )
    parser.add_argument("--rate", type=float, default=12_000.0, help="sustained msg/s offered")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--copy-rows", type=int)
    parser.add_argument("--copy-rounds", type=int)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--batch-connections", type=int, default=8)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="node processes of each gateway (`serve --workers`; its default is one per core):"
        " the server CPU figure is theirs together",
    )
    parser.add_argument("--batch-duration", type=float)
    parser.add_argument(
        "--batch-operator-cap",
        type=float,
        default=1_000.0,
        help="batch_accepts: msg/s the node may send while it takes the batches in (0: no cap)",
    )
    parser.add_argument("--sustained-batch", type=int, default=500)
    # Enough that a slow gateway, not the client, is what makes the schedule fall behind.
    parser.add_argument("--sustained-connections", type=int, default=32)
    parser.add_argument("--sustained-duration", type=float)
    parser.add_argument("--saturated-connections", type=int, default=64)
    parser.add_argument("--saturated-duration", type=float)
    parser.add_argument(
        "--operator-latency-ms", default="100,200", help="simulated operators: MEDIAN,P99"
    )
    parser.add_argument("--drain-timeout", type=float, help="seconds to wait for the backlog")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway mid-window")
    parser.add_argument(
        "--past-days",
        type=int,
        default=0,
        help="the gateway phases' schemas get this many days of partitions first, as a node"
        " past its retention holds (90 by default)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports/latest"))
    parser.add_argument("--keep-schemas", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "copy_rows": 50_000 if quick else 200_000,
        "copy_rounds": 1 if quick else 3,
        "batch_duration": 10.0 if quick else 20.0,
        "sustained_duration": 10.0 if quick else 60.0,
        "saturated_duration": 10.0 if quick else 30.0,
        "drain_timeout": 120.0 if quick else 300.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        median, p99 = (float(x) for x in args.operator_latency_ms.split(","))
    except ValueError:
        parser.error("--operator-latency-ms wants MEDIAN,P99")
    args.operator_latency_ms = (median, p99)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    known = {"copy", "batch_accepts", "batch_dispatching", "sustained", "sustained_http"}
    known.update(("sustained_smpp", "saturated"))
    if not set(args.phases) <= known:
        parser.error(f"--phases: choose from {', '.join(sorted(known))}")
    numbers = (args.copy_rows, args.copy_rounds, args.accounts, args.batch_size)
    durations = (args.batch_duration, args.sustained_duration, args.saturated_duration)
    if min(numbers) < 1 or min(durations) <= 0 or not 0 < args.rate <= 1e6:
        parser.error("counts must be >= 1, durations > 0, --rate in (0, 1e6]")
    if max(durations) > 600 or args.drain_timeout > 1800:
        parser.error("phases are bounded: at most 600 s each, --drain-timeout at most 1800")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    loadavg_start = loadavg()
    log(f"throughput: {os.cpu_count()} CPUs, load average {loadavg_start}")
    copy: CopyResult | None = None
    phases: dict[str, GatewayPhase] = {}
    with (
        tempfile.TemporaryDirectory(prefix="smsgw-bench-throughput-") as tmp,
        database(Path(tmp)) as (database_url, source),
    ):
        args.pg_data_dir = Path(tmp) / "pgdata" if source == "embedded" else None
        if "copy" in args.phases:
            copy = copy_phase(database_url, args)
        for spec in specs(args):
            if spec.name in args.phases:
                phases[spec.name] = gateway_phase(spec, database_url, args, Path(tmp))
    result = summarize(copy, phases, args, source, loadavg_start)
    path = write_report(args.out, "throughput", result, markdown(result))
    log(f"report: {path} and {path.with_suffix('.md')}")
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0 if result["durable"] and result["reconciled"] else 1


if __name__ == "__main__":
    sys.exit(main())
