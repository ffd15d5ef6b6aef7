"""Overload: three times what a node sustains, offered for a minute; what it refuses carries a
Retry-After, its memory stays bounded, and dispatch and express keep their pace.

    python benchmarks/overload.py [--duration 60] [--sustain-s 30] [--operator-rate 2000]
                                  [--factor 3] [--account-backlog N] [--node-backlog N]
                                  [--quick] [--out benchmarks/reports/latest]

Parts, each a process, all on 127.0.0.1: PostgreSQL (DATABASE_URL when set, else an embedded
server in a temporary folder); a simulated operator (`python -m smsgw.sim.operator_server`)
that takes `--operator-rate` messages a second on its link, 50 ms median and 150 ms p99 round
trip, no failures, and answers "throttled" to batches once its link is a second behind; one
node (`smsgw serve --workers 1`) configured with that operator's rate (`--routing`, as an
SMPP contract's throughput would be), so the operator is the bottleneck and the node is not
CPU-bound; two open-loop load generators (`python -m smsgw.sim.loadgen --rate`): batches of
100 from 10 accounts (Zipf 1.0) with 95% of the load, single messages from 10 other accounts
with 5%; and an express prober that sends `{"express": true, "wait": true}` from an account
of its own four times a second and keeps every answer's status and time.

Two phases, each on a fresh schema, node and operator:

  sustain   `--sustain-s` seconds at 1.25x the operator's rate, default backlog bounds: the
            node's sustained rate is what the operator took a second (after a warmup)
  overload  `--factor` times the sustained rate for `--duration` seconds, with the backlog
            bounds lowered (`--account-backlog`, `--node-backlog`: by default 5 and 10
            seconds of the sustained rate) so that refusals start within the run; then the
            load stops and every accepted message must become final within `--final-within`
            seconds; RSS is watched for `--idle-s` more

Every second the node's RSS (/proc), the operator's counters and the node's admission figures
are sampled. The report: sustained rate; offered, accepted/s and sent/s (the operator's) during
overload, and sent/s against the sustained rate (within 10%); refusals by status and the
Retry-After values they carried (every one must carry one); express p50/p99 and how many
were late against the 2 s deadline or refused; RSS at start, its maximum against a stated
bound (the start's RSS, plus the request body budget, plus 2 KiB a message of the node
backlog bound or of the most the Scheduler keeps in memory, whichever is less, plus 256 bytes
a pair of the recipient limiter's most, plus 64 MiB of allocator slack), how much it grew
while the backlog was full, and whether it stayed flat once the backlog had drained; every
accepted id stored and final. The run fails (exit 1) when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from common import (
    CpuMeter,
    auth,
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
from smsgw.engine.node import EngineConfig
from smsgw.sim.loadgen import LoadReport

EXPRESS_DEADLINE_S = 2.0  # the node's default express deadline
BATCH = 100
BATCH_SHARE = 0.95  # of the offered messages; the rest are single messages
BATCH_ACCOUNTS = 10
SINGLE_ACCOUNTS = 10
CREDIT = 10**10
SUSTAIN_LOAD = 1.25  # phase 1's offered load, in times the operator's rate
PROBE_INTERVAL_S = 0.25
TO = "+4915123456789"
# Memory a message waiting in the node may cost, at most: its Scheduler entry, its body in the
# cache, the objects around them (measured well under 1 KiB; the bound is generous).
BYTES_PER_WAITING = 2048
# What one (account, number) pair of the recipient limiter may cost: every message sent or
# refused leaves one (most go to a number of their own) until the limiter holds its most,
# `EngineConfig.recipient_limit_keys`; so RSS grows with the messages seen, backlog or not,
# up to that bound.
BYTES_PER_RECIPIENT = 256
ALLOCATOR_SLACK = 64 << 20
# RSS after the drain may move this much and still count as flat.
FLAT = 8 << 20


# --- the parts ------------------------------------------------------------------------------


def operator_command(rate: float) -> list[str]:
    return operator_server_command(
        "--name",
        "sim",
        "--latency-ms-median",
        "50",
        "--latency-ms-p99",
        "150",
        "--p-temporary",
        "0",
        "--p-permanent",
        "0",
        "--max-per-second",
        str(rate),
        "--max-queue-s",
        "1",
    )


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Sampler:
    """Every second until stopped: the node's RSS, the operator's counters and the node's
    scheduler and admission figures, each sample stamped with time.monotonic()."""

    def __init__(self, pid: int, node_url: str, operator_url: str, admin_key: str) -> None:
        self._pid = pid
        self._node = node_url
        self._operator = operator_url
        self._admin = admin_key
        self._stop = threading.Event()
        self.samples: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            for _ in range(100_000):  # bounded; stopped long before
                sample: dict[str, Any] = {"t": time.monotonic(), "rss": rss_bytes(self._pid)}
                try:
                    operator = client.get(f"{self._operator}/stats").json()
                    sample["sent"] = operator["sent"]
                    sample["throttled"] = operator["throttled"]
                    sample["link_queue_max_s"] = operator["link_queue_max_s"]
                    r = client.get(f"{self._node}/v1/ops/supervisor", headers=auth(self._admin))
                    [scheduler] = [c for c in r.json()["children"] if c["name"] == "scheduler"]
                    stats = scheduler["stats"]
                    sample["bulk_backlog"] = stats["bulk_backlog"]
                    sample["express_backlog"] = stats["express_backlog"]
                    sample["admission"] = stats["admission"]
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                self.samples.append(sample)
                if self._stop.wait(max(0.0, sample["t"] + 1.0 - time.monotonic())):
                    return


class ExpressProber:
    """Express `"wait": true` sends every `interval` seconds until stopped; each answer kept
    as (status or "no answer", seconds, monotonic time sent)."""

    def __init__(self, url: str, key: str, interval: float = PROBE_INTERVAL_S) -> None:
        self._url = url
        self._key = key
        self._interval = interval
        self._stop = threading.Event()
        self.answers: list[tuple[str, float, float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ExpressProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        body = {"to": TO, "text": "overload express", "express": True, "wait": True}
        with httpx.Client(base_url=self._url, timeout=EXPRESS_DEADLINE_S + 5) as client:
            for _ in range(100_000):  # bounded; stopped long before
                started = time.monotonic()
                try:
                    r = client.post("/v1/messages", json=body, headers=auth(self._key))
                    kind = str(r.status_code)
                except httpx.HTTPError:
                    kind = "no answer"
                self.answers.append((kind, time.monotonic() - started, started))
                if self._stop.wait(max(0.0, started + self._interval - time.monotonic())):
                    return


def pending(url: str, schema: str) -> int:
    """Messages of `schema` not final yet (queued or sending)."""

    async def count() -> int:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            found = await conn.fetchval(
                f"SELECT count(*) FROM {schema}.messages WHERE status IN ('queued', 'sending')"
            )
        finally:
            await conn.close()
        return int(found)

    return asyncio.run(count())


def settle(url: str, schema: str, within: float) -> tuple[int, float]:
    """Wait (bounded) until every message is final; (how many still are not, seconds)."""
    started = time.monotonic()
    left = -1
    while time.monotonic() - started < within:
        try:
            left = pending(url, schema)
        except (OSError, asyncpg.PostgresError):
            left = -1
        if left == 0:
            break
        time.sleep(1.0)
    return left, round(time.monotonic() - started, 1)


# --- figures --------------------------------------------------------------------------------


def rate_between(samples: Sequence[dict[str, Any]], start: float, end: float) -> float | None:
    """Messages a second the operator took between the samples nearest `start` and `end`."""
    usable = [s for s in samples if "sent" in s and start - 1.0 <= s["t"] <= end + 1.0]
    if len(usable) < 2:
        return None
    first = min(usable, key=lambda s: abs(s["t"] - start))
    last = min(usable, key=lambda s: abs(s["t"] - end))
    if last["t"] <= first["t"]:
        return None
    return round((last["sent"] - first["sent"]) / (last["t"] - first["t"]), 1)


def mib(value: float | None) -> float | None:
    return None if value is None else round(value / (1 << 20), 1)


def express_summary(answers: Sequence[tuple[str, float, float]], start: float) -> dict[str, Any]:
    """Answers to probes sent from `start` on (the load's warmup included: express must keep
    its pace while the backlog fills too)."""
    kept = [(kind, seconds) for kind, seconds, sent in answers if sent >= start]
    kinds: dict[str, int] = {}
    for kind, _ in kept:
        kinds[kind] = kinds.get(kind, 0) + 1
    times = sorted(seconds for _, seconds in kept)

    def at(q: float) -> float | None:
        return round(times[min(len(times) - 1, int(q * len(times)))], 3) if times else None

    return {
        "probes": len(kept),
        "answers": kinds,
        "p50_s": at(0.50),
        "p99_s": at(0.99),
        "max_s": round(times[-1], 3) if times else None,
        # Sent, but after the deadline; 504 is a message failed (refunded) at its deadline.
        "late": sum(kind == "200" and s > EXPRESS_DEADLINE_S for kind, s in kept),
        "not_sent": sum(kind != "200" for kind, _ in kept),
    }


def memory_summary(
    samples: Sequence[dict[str, Any]],
    base: int | None,
    bound: int,
    full_at: float,
    stop: float,
    drained_at: float | None,
) -> dict[str, Any]:
    """RSS over the run: its maximum against `bound`; how much its peak grew while the
    backlog was full (from `full_at` to `stop`, the load's end: the last half against the
    first); and, from `drained_at` (every message final) on, whether it stayed flat."""
    rss = [(s["t"], s["rss"]) for s in samples if s.get("rss") is not None]
    during = [r for t, r in rss if full_at <= t <= stop]
    half = len(during) // 2
    first, second = during[:half], during[half:]
    grew = max(second) - max(first) if first and second else None
    idle = [r for t, r in rss if drained_at is not None and t >= drained_at]
    peak = max((r for _, r in rss), default=None)
    return {
        "start_mib": mib(base),
        "max_mib": mib(peak),
        "bound_mib": mib(bound),
        "within_bound": peak is not None and peak <= bound,
        # Growth of the peak from the first half of the full-backlog stretch to the second:
        # the recipient limiter's pairs (see BYTES_PER_RECIPIENT), not the backlog.
        "growth_while_full_mib": mib(grew),
        "drained_mib": mib(idle[0]) if idle else None,
        "end_mib": mib(idle[-1]) if idle else None,
        "flat_after_drain": len(idle) >= 2 and max(idle) - idle[0] <= FLAT,
        "series_mib": [mib(r) for _, r in rss],
    }


def by_status(reports: Sequence[LoadReport | None]) -> dict[str, int]:
    total: dict[str, int] = {}
    for report in reports:
        if report is not None:
            for status, n in report.by_status.items():
                total[status] = total.get(status, 0) + n
    return dict(sorted(total.items()))


def retry_afters(reports: Sequence[LoadReport | None]) -> dict[str, int]:
    total: dict[str, int] = {}
    for report in reports:
        if report is not None:
            for value, n in report.retry_after.items():
                total[value] = total.get(value, 0) + n
    return dict(sorted(total.items(), key=lambda kv: (kv[0] == "none", len(kv[0]), kv[0])))


# --- a phase --------------------------------------------------------------------------------


def phase(
    name: str,
    args: argparse.Namespace,
    database_url: str,
    work: Path,
    *,
    offered: float,
    duration: float,
    bounds: tuple[int, int] | None,
    drain: bool,
) -> dict[str, Any]:
    """One node, operator and schema under `offered` messages a second for `duration`
    measured seconds (after `args.warmup`), with `bounds` (account, node backlog; None: the
    defaults); with `drain`, then until every message is final."""
    config = EngineConfig()
    node_backlog = config.admission.node_backlog if bounds is None else bounds[1]
    serve_bounds = (
        []
        if bounds is None
        else ["--max-account-backlog", str(bounds[0]), "--max-node-backlog", str(bounds[1])]
    )
    logs = args.out / "overload-logs"
    schema = fresh_schema("overload")
    admin_key = new_admin_key()
    routing = work / "routing.json"
    routing.write_text(
        json.dumps({"operators": [{"name": "sim", "max_per_second": args.operator_rate}]})
    )
    result: dict[str, Any] = {"phase": name, "offered_msg_per_s": round(offered, 1)}
    log(f"{name}: {offered:,.0f} msg/s offered for {args.warmup:g} + {duration:g} s")
    with ExitStack() as stack:
        stack.callback(drop_schema, database_url, schema)
        operator = stack.enter_context(
            run_server(operator_command(args.operator_rate), log_path=logs / f"{name}-op.log")
        )
        serve = [
            "--operator-url",
            f"sim={operator.url}",
            "--routing",
            str(routing),
            "--recipient-limit-per-hour",
            "100000000",
            *serve_bounds,
        ]
        node = stack.enter_context(
            run_server(
                gateway_command(*serve),
                log_path=logs / f"{name}-node.log",
                env=gateway_env(database_url, schema, admin_key),
            )
        )
        pid = node.process.pid
        keys = create_accounts(
            node.url, admin_key, BATCH_ACCOUNTS + SINGLE_ACCOUNTS + 1, credit=CREDIT
        )
        batch_keys, single_keys = keys[:BATCH_ACCOUNTS], keys[BATCH_ACCOUNTS:-1]
        (work / "batch-keys.json").write_text(json.dumps(batch_keys))
        (work / "single-keys.json").write_text(json.dumps(single_keys))
        ids = [work / f"{name}-batches.ids", work / f"{name}-singles.ids"]
        base_rss = rss_bytes(pid)
        sampler = stack.enter_context(Sampler(pid, node.url, operator.url, admin_key))
        cpu = CpuMeter(pid)
        started = time.monotonic()
        measure_from = started + args.warmup
        with (
            loadgen(
                node.url,
                work / "batch-keys.json",
                ids[0],
                offered * BATCH_SHARE,
                args.warmup + duration,
                "--warmup",
                str(args.warmup),
                "--batch",
                str(BATCH),
                "--zipf",
                "1.0",
                "--connections",
                "32",
            ) as batches,
            loadgen(
                node.url,
                work / "single-keys.json",
                ids[1],
                offered * (1 - BATCH_SHARE),
                args.warmup + duration,
                "--warmup",
                str(args.warmup),
                "--connections",
                "32",
            ) as singles,
            ExpressProber(node.url, keys[-1]) as prober,
        ):
            time.sleep(args.warmup)
            cpu.start()
            reports = [load_report(p, duration + 60) for p in (batches, singles)]
            result["cpu_percent"] = msgspec.to_builtins(cpu.stop())
        stopped = time.monotonic()
        drained_at = None
        if drain:
            left, settle_s = settle(database_url, schema, args.final_within)
            result["not_final"] = left
            result["settle_s"] = settle_s
            drained_at = time.monotonic()
            time.sleep(args.idle_s)
        samples = list(sampler.samples)
        durable = [check_durable(database_url, schema, f) for f in ids if f.exists()]
    measured_to = measure_from + duration
    result["sent_msg_per_s"] = rate_between(samples, measure_from, measured_to)
    result["accepted_msg_per_s"] = round(sum(r.items_per_s for r in reports if r is not None), 1)
    result["offered_measured_msg_per_s"] = round(
        sum(r.offered_rate_per_s for r in reports if r is not None), 1
    )
    result["requests_by_status"] = by_status(reports)
    result["retry_after"] = retry_afters(reports)
    result["loadgen"] = [
        None
        if r is None
        else {
            "requests": r.requests,
            "by_status": r.by_status,
            "items": r.items,
            "items_rejected": r.items_rejected,
            "errors": r.errors,
            "timeouts": r.timeouts,
            "unanswered": r.unanswered,
            "latency_ms": msgspec.to_builtins(r.latency_ms),
        }
        for r in reports
    ]
    result["express"] = express_summary(prober.answers, started)
    result["accepted"] = sum(d.unique for d in durable)
    result["lost"] = sum(d.missing for d in durable)
    result["loadgen_failed"] = sum(r is None for r in reports)
    backlogs = [s["bulk_backlog"] for s in samples if "bulk_backlog" in s]
    result["bulk_backlog_max"] = max(backlogs, default=None)
    # The operator's own view: messages it refused as "throttled" (its link more than a
    # second behind, which the node's token bucket should never let happen) and the deepest
    # queue a batch met on its link.
    operator = [s for s in samples if "throttled" in s]
    result["operator_throttled"] = operator[-1]["throttled"] if operator else None
    result["operator_link_queue_max_s"] = operator[-1]["link_queue_max_s"] if operator else None
    admission = [s["admission"] for s in samples if "admission" in s]
    result["admission_last"] = admission[-1] if admission else None
    result["request_body_bytes_peak"] = max(
        (a.get("request_body_bytes_peak", 0) for a in admission), default=None
    )
    # The Scheduler keeps at most `scheduler_memory_bound` waiting messages in memory, however
    # deep the backlog.
    bound = (
        (base_rss or 0)
        + config.admission.request_body_bytes
        + min(node_backlog, config.scheduler_memory_bound) * BYTES_PER_WAITING
        + config.recipient_limit_keys * BYTES_PER_RECIPIENT
        + ALLOCATOR_SLACK
    )
    full_at = next(
        (s["t"] for s in samples if s.get("bulk_backlog", 0) >= 0.9 * node_backlog), measured_to
    )
    result["backlog_full_after_s"] = round(full_at - started, 1) if full_at < stopped else None
    result["memory"] = memory_summary(
        samples, base_rss, bound, min(full_at, stopped), stopped, drained_at
    )
    result["series"] = {
        "t_s": [round(s["t"] - started, 1) for s in samples],
        "sent_total": [s.get("sent") for s in samples],
        "bulk_backlog": [s.get("bulk_backlog") for s in samples],
        "operator_throttled": [s.get("throttled") for s in samples],
    }
    return result


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with database(work) as (url, source):
        sustain = phase(
            "sustain",
            args,
            url,
            work,
            offered=SUSTAIN_LOAD * args.operator_rate,
            duration=args.sustain_s,
            bounds=None,
            drain=False,
        )
        sustained = sustain["sent_msg_per_s"] or args.operator_rate
        account_backlog = args.account_backlog or int(5 * sustained)
        node_backlog = args.node_backlog or int(10 * sustained)
        overload = phase(
            "overload",
            args,
            url,
            work,
            offered=args.factor * sustained,
            duration=args.duration,
            bounds=(account_backlog, node_backlog),
            drain=True,
        )
    return summarize(args, source, sustain, overload, account_backlog, node_backlog)


def summarize(
    args: argparse.Namespace,
    source: str,
    sustain: dict[str, Any],
    overload: dict[str, Any],
    account_backlog: int,
    node_backlog: int,
) -> dict[str, Any]:
    sustained = sustain["sent_msg_per_s"]
    sent = overload["sent_msg_per_s"]
    refused = {s: n for s, n in overload["requests_by_status"].items() if s in ("429", "503")}
    express = overload["express"]
    checks = {
        "refusals_happened": sum(refused.values()) > 0,
        "every_refusal_has_retry_after": overload["retry_after"].get("none", 0) == 0,
        "sent_within_10pct_of_sustained": (
            sustained is not None and sent is not None and sent >= 0.9 * sustained
        ),
        "express_p99_within_deadline": (
            express["p99_s"] is not None and express["p99_s"] <= EXPRESS_DEADLINE_S
        ),
        "express_all_sent": express["not_sent"] == 0,
        "rss_within_bound": overload["memory"]["within_bound"],
        "rss_flat_after_drain": overload["memory"]["flat_after_drain"],
        "every_accepted_final": overload.get("not_final") == 0,
        "none_lost": overload["lost"] == 0 and sustain["lost"] == 0,
        "load_generators_reported": not (overload["loadgen_failed"] or sustain["loadgen_failed"]),
    }
    return {
        "benchmark": "overload",
        "at": utc_timestamp(),
        "commit": git_commit(),
        "dirty": git_dirty(),
        "cpu_count": os.cpu_count(),
        "settings": {
            "database": source,
            "operator_rate_msg_per_s": args.operator_rate,
            "operator": "50 ms median, 150 ms p99, no failures, throttles past 1 s of queue",
            "sustain_s": args.sustain_s,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "factor": args.factor,
            "batch": BATCH,
            "batch_share": BATCH_SHARE,
            "accounts": {"batches": BATCH_ACCOUNTS, "singles": SINGLE_ACCOUNTS, "express": 1},
            "account_backlog": account_backlog,
            "node_backlog": node_backlog,
            "request_body_bytes": EngineConfig().admission.request_body_bytes,
            "express_probe_interval_s": PROBE_INTERVAL_S,
            "express_deadline_s": EXPRESS_DEADLINE_S,
        },
        "sustained_msg_per_s": sustained,
        "offered_msg_per_s": overload["offered_measured_msg_per_s"],
        "accepted_msg_per_s": overload["accepted_msg_per_s"],
        "sent_msg_per_s": sent,
        "sent_vs_sustained": None if not (sent and sustained) else round(sent / sustained, 3),
        "refused_requests": refused,
        "retry_after": overload["retry_after"],
        "express": express,
        "memory": {k: v for k, v in overload["memory"].items() if k != "series_mib"},
        "checks": checks,
        "ok": all(checks.values()),
        "phases": [sustain, overload],
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    overload = result["phases"][1]
    memory = result["memory"]
    express = result["express"]
    lines = [
        f"# overload ({result['at']}, {result['commit'][:10]}"
        f"{' dirty' if result['dirty'] else ''}, {result['cpu_count']} cores)",
        "",
        f"One node, an operator taking {s['operator_rate_msg_per_s']:g} msg/s"
        f" ({s['operator']}), {s['database']} PostgreSQL; {s['factor']:g}x the sustained"
        f" rate for {s['duration_s']:g} s with backlog bounds {s['account_backlog']:,} per"
        f" account and {s['node_backlog']:,} per node: **{'PASS' if result['ok'] else 'FAIL'}**.",
        "",
    ]
    rows = [
        ["sustained (sent/s, phase 1)", result["sustained_msg_per_s"]],
        ["offered during overload (msg/s)", result["offered_msg_per_s"]],
        ["accepted during overload (msg/s)", result["accepted_msg_per_s"]],
        ["sent during overload (msg/s)", result["sent_msg_per_s"]],
        ["sent / sustained", result["sent_vs_sustained"]],
        ["refused requests by status", json.dumps(result["refused_requests"])],
        ["Retry-After values (s: answers)", json.dumps(result["retry_after"])],
        ["express answers", json.dumps(express["answers"])],
        [
            "express p50 / p99 / max (s)",
            f"{express['p50_s']} / {express['p99_s']} / {express['max_s']}",
        ],
        [f"express late (> {s['express_deadline_s']:g} s)", express["late"]],
        ["bulk backlog max", overload["bulk_backlog_max"]],
        [
            "operator: throttled / deepest link queue (s)",
            f"{overload['operator_throttled']} / {overload['operator_link_queue_max_s']}",
        ],
        ["request body bytes peak", overload["request_body_bytes_peak"]],
        [
            "RSS start / max / bound (MiB)",
            f"{memory['start_mib']} / {memory['max_mib']} / {memory['bound_mib']}",
        ],
        ["RSS growth while the backlog was full (MiB)", memory["growth_while_full_mib"]],
        [
            "RSS when drained / after idling (MiB)",
            f"{memory['drained_mib']} / {memory['end_mib']}",
        ],
        [
            "accepted / lost / not final",
            f"{overload['accepted']} / {overload['lost']} / {overload.get('not_final')}",
        ],
        ["settled after the load (s)", overload.get("settle_s")],
        ["node CPU during overload (% of a core)", overload["cpu_percent"]["server"]],
    ]
    lines.append(markdown_table(["figure", "value"], rows))
    failed = [name for name, ok in result["checks"].items() if not ok]
    lines.append("Checks: " + ("all passed." if not failed else "FAILED " + ", ".join(failed)))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="overload, seconds")
    parser.add_argument("--sustain-s", type=float, default=30.0, help="phase 1, seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="before each measurement")
    parser.add_argument("--operator-rate", type=float, default=2000.0, help="msg/s")
    parser.add_argument("--factor", type=float, default=3.0, help="overload / sustained")
    parser.add_argument("--account-backlog", type=int, help="default: 5 s of the sustained")
    parser.add_argument("--node-backlog", type=int, help="default: 10 s of the sustained")
    parser.add_argument("--final-within", type=float, default=180.0, help="seconds")
    parser.add_argument("--idle-s", type=float, default=10.0, help="RSS watched after")
    parser.add_argument(
        "--quick", action="store_true", help="CI: 10 s sustain, 20 s overload, 5 s idle"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports/latest"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sustain_s, args.duration, args.idle_s = 10.0, 20.0, 5.0
    if not (0 < args.duration <= 600 and 0 < args.sustain_s <= 600 and 0 <= args.warmup <= 60):
        parser.error("--duration and --sustain-s in (0, 600], --warmup in [0, 60]")
    if not (0 < args.operator_rate <= 20_000 and 1 <= args.factor <= 10):
        parser.error("--operator-rate in (0, 20000], --factor in [1, 10]")
    if not 0 < args.final_within <= 1800 or not 0 <= args.idle_s <= 300:
        parser.error("--final-within in (0, 1800], --idle-s in [0, 300]")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="smsgw-bench-overload-") as tmp:
        result = run(args, Path(tmp))
    path = write_report(args.out, "overload", result, markdown(result))
    log(f"report: {path} and {path.with_suffix('.md')}")
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
