"""Single-message HTTP accepts per second: the gateway against a no-op handler on the same stack.

    python benchmarks/accept.py [--duration 10] [--connections 64] [--out benchmarks/reports/latest]

Three kinds of phase, run one after another in each of `--rounds` rounds (default 3; the
figures are the medians over the rounds), each with `--connections` keep-alive connections from the
load generator (`python -m smsgw.sim.loadgen`, its own process, 127.0.0.1 only), a 2 s warmup
and then `--duration` measured seconds:

  gateway_100_accounts  `smsgw serve` (one node) on a fresh schema, 100 accounts, keys round robin
  gateway_1_account     the same on another fresh schema, all load on one account
  noop                  benchmarks/noop_server.py: quart-trio on hypercorn, reads the body, 202

With `--console-clients N` (5: the issue's "five open browsers"), each round also runs
`gateway_100_accounts+console`: the same gateway phase while a separate process (this script
with `--poll-console`) polls GET /v1/ops/console once a second on N keep-alive connections, as
N open ops consoles do (the page itself is fetched once per tab and is static). The report
adds the ratio of its accepts/s to the phase without it (target >= 0.95).

After each gateway phase every id that got a 202 (warmup included) is looked up in the
messages table: "durable" is true when none is missing. PostgreSQL is DATABASE_URL when set,
else an embedded server started once in a temporary folder. Prints one JSON object on stdout
and writes accept.json and accept.md into the out folder. Exit code 1 when a phase was not
durable or answered no 2xx at all; the throughput targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from common import (
    CpuMeter,
    CpuUse,
    DelayedProfile,
    Durability,
    check_durable,
    create_accounts,
    database,
    drop_schema,
    exit_on_sigterm,
    fresh_schema,
    git_commit,
    git_dirty,
    log,
    markdown_table,
    new_admin_key,
    run_gateway,
    run_loadgen,
    run_noop_server,
    utc_timestamp,
    write_report,
)
from smsgw.sim.loadgen import LoadReport

WARMUP_S = 2.0
CREDIT = 10**9  # per account: far more than any run can spend
# The per-account API rate limit (1,000 requests/s by default) would otherwise answer the
# one-account phase with 429s on a host fast enough to go past it: this benchmark measures
# what a node can accept, so its accounts get the highest rate the settings allow.
SETTINGS = {"api_rate": 1_000_000}
PROFILE_S = 8.0
TARGETS = {"accepts_vs_noop": 0.8, "one_vs_many": 0.9}
# With --console-clients: accepts/s with the consoles polling against the same phase without.
CONSOLE_TARGET = 0.95
CONSOLE_PATH = "/v1/ops/console"
# The no-op phase sends the same requests; the key is only there to match their size.
NOOP_KEY = "sk_" + "x" * 43


class Phase(msgspec.Struct, kw_only=True):
    name: str
    server: str  # "gateway" or "noop"
    accounts: int | None
    duration_s: float  # the measured window
    rate_per_s: float  # 2xx responses per second in the window
    requests: int
    by_status: dict[str, int]
    errors: int
    timeouts: int
    unanswered: int
    latency_ms: dict[str, float] | None  # p50, p95, p99, max of 2xx responses
    durability: Durability | None  # gateway phases only
    cpu: CpuUse  # during the load generator's run (warmup and drain included)
    # Server CPU per answered request (warmup included): unlike req/s, this barely moves when
    # other work competes for the cores, so it is the figure to compare across runs.
    server_cpu_ms_per_request: float | None
    profile: dict[str, Any] | None = None  # with --profile, the first round's phases


def to_phase(
    name: str,
    server: str,
    accounts: int | None,
    load: LoadReport,
    durability: Durability | None,
    cpu: CpuUse,
    profile: dict[str, Any] | None,
) -> Phase:
    return Phase(
        name=name,
        server=server,
        accounts=accounts,
        duration_s=load.duration_s,
        rate_per_s=load.rate_per_s,
        requests=load.requests,
        by_status=load.by_status,
        errors=load.errors,
        timeouts=load.timeouts,
        unanswered=load.unanswered,
        latency_ms=msgspec.to_builtins(load.latency_ms),
        durability=durability,
        cpu=cpu,
        server_cpu_ms_per_request=cpu_ms_per_request(cpu, load.requests + load.warmup_requests),
        profile=profile,
    )


def maybe_profile(args: argparse.Namespace, name: str, pid: int) -> DelayedProfile | None:
    """With --profile, py-spy on the server of each first-round phase, after the warmup."""
    if not args.profile or not name.endswith("#1"):
        return None
    seconds = max(1.0, min(PROFILE_S, args.duration - 1.0))
    return DelayedProfile(pid, WARMUP_S + 1.0, seconds, args.out / f"{name}.pyspy.txt")


def cpu_ms_per_request(cpu: CpuUse, requests: int) -> float | None:
    if cpu.server is None or requests <= 0:
        return None
    return round(cpu.server / 100 * cpu.wall_s * 1000 / requests, 3)


def gateway_phase(
    name: str,
    accounts: int,
    database_url: str,
    args: argparse.Namespace,
    work_dir: Path,
    console_clients: int = 0,
) -> Phase:
    schema = fresh_schema("bench_accept")
    admin_key = new_admin_key()
    ids_file = work_dir / f"{name}.ids"
    log(f"{name}: smsgw serve on schema {schema}, {accounts} account(s)")
    try:
        with run_gateway(
            database_url, schema, admin_key=admin_key, log_path=args.out / f"{name}.log"
        ) as gateway:
            keys = create_accounts(
                gateway.url, admin_key, accounts, credit=CREDIT, settings=SETTINGS
            )
            meter = CpuMeter(gateway.process.pid)
            meter.start()
            profiler = maybe_profile(args, name, gateway.process.pid)
            with console_pollers(gateway.url, admin_key, console_clients, args.out / name):
                load = run_loadgen(
                    gateway.url,
                    keys,
                    connections=args.connections,
                    duration=args.duration,
                    warmup=WARMUP_S,
                    ids_out=ids_file,
                )
            cpu = meter.stop()
            profile = profiler.finish() if profiler is not None else None
            # Checked while the gateway still runs: a 202 must mean committed already.
            durability = check_durable(database_url, schema, ids_file)
    finally:
        if not args.keep_schemas:
            try:
                drop_schema(database_url, schema)
            except Exception as exc:
                log(f"could not drop schema {schema}: {exc}")
    if durability.ids != load.accepted_ids:
        log(f"{name}: {load.accepted_ids} ids read from 202s but {durability.ids} written")
    phase = to_phase(name, "gateway", accounts, load, durability, cpu, profile)
    log(f"{name}: {phase.rate_per_s}/s {phase.by_status} missing={durability.missing}")
    return phase


@contextmanager
def console_pollers(url: str, admin_key: str, clients: int, stem: Path) -> Iterator[None]:
    """With `clients` > 0, a process of its own that polls the console's JSON as `clients`
    open ops consoles do while the block runs; what it saw goes to `<stem>.console.json`."""
    if clients <= 0:
        yield
        return
    env = {**os.environ, "SMSGW_ADMIN_KEY": admin_key}
    command = [sys.executable, __file__, "--poll-console", url, "--console-clients", str(clients)]
    with open(f"{stem}.console.json", "wb") as out:
        poller = subprocess.Popen(command, env=env, stdout=out)
        try:
            yield
        finally:
            poller.send_signal(signal.SIGTERM)
            poller.wait(timeout=30)
    log(f"console pollers: {Path(f'{stem}.console.json').read_text().strip()}")


def poll_console(url: str, clients: int) -> int:
    """`--poll-console`: `clients` loops, each on its own keep-alive connection, GET the
    console's JSON with the admin key (SMSGW_ADMIN_KEY) once a second, as the page does, until
    SIGTERM; then print what they saw as JSON."""
    import httpx
    import trio

    key = os.environ["SMSGW_ADMIN_KEY"]
    seen = {"clients": clients, "requests": 0, "ok": 0, "failed": 0, "latency_ms_max": 0.0}

    async def client_loop() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10.0) as http:
            while True:
                started = trio.current_time()
                try:
                    response = await http.get(CONSOLE_PATH)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed_ms = (trio.current_time() - started) * 1000
                seen["requests"] += 1
                seen["ok" if ok else "failed"] += 1
                seen["latency_ms_max"] = round(max(seen["latency_ms_max"], elapsed_ms), 1)
                await trio.sleep_until(started + 1.0)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    # Tabs opened a moment apart, not in lockstep.
                    nursery.start_soon(_after, i / clients, client_loop)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    began = time.monotonic()
    trio.run(run)
    seen["seconds"] = round(time.monotonic() - began, 1)
    print(json.dumps(seen), flush=True)
    return 0 if seen["failed"] == 0 else 1


async def _after(delay: float, fn: Any) -> None:
    import trio

    await trio.sleep(delay)
    await fn()


def noop_phase(args: argparse.Namespace, work_dir: Path, name: str = "noop") -> Phase:
    log(f"{name}: benchmarks/noop_server.py")
    with run_noop_server(args.out / f"{name}.log") as server:
        meter = CpuMeter(server.process.pid)
        meter.start()
        profiler = maybe_profile(args, name, server.process.pid)
        load = run_loadgen(
            server.url,
            [NOOP_KEY],
            connections=args.connections,
            duration=args.duration,
            warmup=WARMUP_S,
            # Parse and keep the ids as in the gateway phases: the same work for the generator.
            ids_out=work_dir / f"{name}.ids",
        )
        cpu = meter.stop()
        profile = profiler.finish() if profiler is not None else None
    phase = to_phase(name, "noop", None, load, None, cpu, profile)
    log(f"{name}: {phase.rate_per_s}/s {phase.by_status}")
    return phase


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator > 0 else None


def summarize(
    phases: list[Phase], args: argparse.Namespace, database_source: str
) -> dict[str, Any]:
    # Each kind ran once per round, interleaved with the others, so a burst of load from
    # elsewhere on the machine hits all kinds alike; the median of the rounds is the figure.
    rates: dict[str, list[float]] = {}
    for phase in phases:
        rates.setdefault(phase.name.split("#")[0], []).append(phase.rate_per_s)
    many = statistics.median(rates["gateway_100_accounts"])
    one = statistics.median(rates["gateway_1_account"])
    noop = statistics.median(rates["noop"])
    cpu_ms: dict[str, list[float]] = {}
    for phase in phases:
        if phase.server_cpu_ms_per_request is not None:
            cpu_ms.setdefault(phase.name.split("#")[0], []).append(phase.server_cpu_ms_per_request)
    ratio_100_vs_noop = ratio(many, noop)
    ratio_1_vs_100 = ratio(one, many)
    # Each round's gateway against the no-op run just before it: the host's speed drifts by
    # up to a third within a run here, and a round's two phases are a minute apart at most.
    by_round = [
        ratio(g, n) for g, n in zip(rates["gateway_100_accounts"], rates["noop"], strict=True)
    ]
    gateway_phases = [p for p in phases if p.durability is not None]
    console: dict[str, Any] = {}
    if "gateway_100_accounts+console" in rates:
        by_round_console = [
            ratio(c, g)
            for c, g in zip(
                rates["gateway_100_accounts+console"], rates["gateway_100_accounts"], strict=True
            )
        ]
        median_console = statistics.median(r or 0.0 for r in by_round_console)
        console = {
            "console_clients": args.console_clients,
            "ratio_console_vs_none_by_round": by_round_console,
            "ratio_console_vs_none_by_round_median": median_console,
            "console_target": CONSOLE_TARGET,
            "console_pass": median_console >= CONSOLE_TARGET,
        }
    return {
        "benchmark": "accept",
        "commit": git_commit(),
        "dirty": git_dirty(),
        "timestamp": utc_timestamp(),
        "cpu_count": os.cpu_count(),
        "database": database_source,
        "connections": args.connections,
        "warmup_s": WARMUP_S,
        "measure_s": args.duration,
        "rounds": args.rounds,
        "rates_per_round": rates,
        "phases": {p.name: msgspec.to_builtins(p) for p in phases},
        "duration_s": {p.name: p.duration_s for p in phases},
        "latency_ms": {
            p.name: None if p.latency_ms is None else {q: p.latency_ms[q] for q in ("p50", "p99")}
            for p in phases
        },
        "accepts_per_s_100_accounts": many,
        "accepts_per_s_1_account": one,
        "noop_per_s": noop,
        "ratio_100_vs_noop": ratio_100_vs_noop,
        "ratio_1_vs_100": ratio_1_vs_100,
        "ratio_100_vs_noop_by_round": by_round,
        "ratio_100_vs_noop_by_round_median": statistics.median(r or 0.0 for r in by_round),
        "server_cpu_ms_per_request": {k: statistics.median(v) for k, v in cpu_ms.items()},
        "targets": TARGETS,
        "pass": {
            "accepts_vs_noop": (ratio_100_vs_noop or 0.0) >= TARGETS["accepts_vs_noop"],
            "one_vs_many": (ratio_1_vs_100 or 0.0) >= TARGETS["one_vs_many"],
        },
        "durable": all(p.durability.durable for p in gateway_phases if p.durability),
        "missing": sum(p.durability.missing for p in gateway_phases if p.durability),
        **console,
    }


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for name, phase in result["phases"].items():
        latency = phase["latency_ms"] or {}
        durability = phase["durability"]
        cpu = phase["cpu"]
        durable = "-"
        if durability is not None:
            verdict = "yes" if durability["durable"] else "NO"
            durable = f"{verdict} ({durability['missing']} missing)"
        rows.append(
            [
                name,
                _cell(phase["accounts"]),
                phase["rate_per_s"],
                _cell(latency.get("p50")),
                _cell(latency.get("p99")),
                ", ".join(f"{status}: {n}" for status, n in phase["by_status"].items()),
                durable,
                f"{_cell(cpu['server'])} / {_cell(cpu['loadgen'])} / {_cell(cpu['machine'])}",
                _cell(phase["server_cpu_ms_per_request"]),
            ]
        )
    header = ["phase", "accounts", "2xx/s", "p50 ms", "p99 ms", "statuses", "durable"]
    header += ["CPU % server / loadgen / machine", "server CPU ms/request"]
    checks: list[list[object]] = [
        ["gateway (100 accounts) / noop, medians", result["ratio_100_vs_noop"]],
        ["gateway (1 account) / gateway (100 accounts)", result["ratio_1_vs_100"]],
    ]
    by_round = ", ".join(_cell(r) for r in result["ratio_100_vs_noop_by_round"])
    for row, (target, passed) in zip(
        checks, ((result["targets"][k], result["pass"][k]) for k in TARGETS), strict=True
    ):
        row += [f">= {target}", "pass" if passed else "FAIL"]
    dirty = " (working tree modified)" if result["dirty"] else ""
    return (
        "# Single-message accepts/s\n\n"
        f"Commit {result['commit']}{dirty}, {result['timestamp']}, {result['cpu_count']} CPUs, "
        f"PostgreSQL: {result['database']}, {result['connections']} connections, "
        f"{result['warmup_s']:g} s warmup then {result['measure_s']:g} s measured per phase. "
        "CPU is in % of one core over the load generator's run; machine counts every process."
        "\n\n"
        + markdown_table(header, rows)
        + "\n"
        + markdown_table(["ratio", "value", "target", "result"], checks)
        + f"\nGateway (100 accounts) / noop of the same round: {by_round} "
        f"(median {result['ratio_100_vs_noop_by_round_median']}).\n" + _console_line(result)
    )


def _console_line(result: dict[str, Any]) -> str:
    if "console_clients" not in result:
        return ""
    by_round = ", ".join(_cell(r) for r in result["ratio_console_vs_none_by_round"])
    verdict = "pass" if result["console_pass"] else "FAIL"
    return (
        f"\nWith {result['console_clients']} ops consoles polling / without, 100 accounts,"
        f" by round: {by_round} (median {result['ratio_console_vs_none_by_round_median']},"
        f" target >= {result['console_target']}: {verdict}).\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; figures are their medians"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports/latest"))
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each server in the first round"
    )
    parser.add_argument(
        "--keep-schemas", action="store_true", help="keep the phases' schemas afterwards"
    )
    parser.add_argument(
        "--console-clients",
        type=int,
        default=0,
        help="also run gateway_100_accounts with N ops consoles polling (the issue: 5)",
    )
    parser.add_argument("--poll-console", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.connections < 1 or args.rounds < 1 or args.console_clients < 0:
        parser.error("--duration must be > 0, --connections and --rounds >= 1")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.poll_console:
        return poll_console(args.poll_console, max(1, args.console_clients))
    exit_on_sigterm()
    with (
        tempfile.TemporaryDirectory(prefix="smsgw-bench-accept-") as tmp,
        database(Path(tmp)) as (database_url, source),
    ):
        work_dir = Path(tmp)
        phases: list[Phase] = []
        for r in range(1, args.rounds + 1):
            phases.append(noop_phase(args, work_dir, f"noop#{r}"))
            phases.append(
                gateway_phase(f"gateway_100_accounts#{r}", 100, database_url, args, work_dir)
            )
            if args.console_clients:
                name = f"gateway_100_accounts+console#{r}"
                phases.append(
                    gateway_phase(name, 100, database_url, args, work_dir, args.console_clients)
                )
            phases.append(gateway_phase(f"gateway_1_account#{r}", 1, database_url, args, work_dir))
    result = summarize(phases, args, source)
    path = write_report(args.out, "accept", result, markdown(result))
    log(f"report: {path} and {path.with_suffix('.md')}")
    print(msgspec.json.encode(result).decode(), flush=True)
    no_success = any(p.rate_per_s == 0 for p in phases)
    return 0 if result["durable"] and not no_success else 1


if __name__ == "__main__":
    sys.exit(main())
