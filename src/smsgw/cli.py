"""The `smsgw` command: serve, migrate, accounts, simulate, bench."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
from functools import partial
from typing import TYPE_CHECKING

import msgspec
import trio

from smsgw.engine.node import EngineConfig
from smsgw.logs import configure as configure_logging
from smsgw.sim.dlr import DlrProfile
from smsgw.sim.operator import OperatorProfile
from smsgw.storage.embedded import database_url

if TYPE_CHECKING:
    from smsgw.engine.node import EngineConfig
    from smsgw.engine.routing import RoutingConfig


def _schema() -> str:
    """SMSGW_SCHEMA puts the gateway's tables in their own PostgreSQL schema (tests use it)."""
    return os.environ.get("SMSGW_SCHEMA", "public")


def _serve(args: argparse.Namespace) -> int:
    from smsgw.engine.shards import LeaseConfig
    from smsgw.server import NodeOptions, run_node

    admin_key = os.environ.get("SMSGW_ADMIN_KEY")
    if not admin_key:
        admin_key = "adm_" + secrets.token_urlsafe(32)
        print(f"SMSGW_ADMIN_KEY is not set; this run's admin key: {admin_key}", file=sys.stderr)
    node_id = args.node_id or socket.gethostname()
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers > 1:
        if args.no_leases:
            print("--no-leases runs one node: use it with --workers 1", file=sys.stderr)
            return 2
        return _serve_workers(args, workers, node_id, admin_key)
    options = NodeOptions(
        database_url=database_url(),
        admin_key=admin_key,
        host=args.host,
        port=args.port,
        schema=_schema(),
        operators=(
            _operator_profile(args.operator_latency_ms, args.operator_name, args.operator_errors),
        ),
        operator_urls=tuple(args.operator_url),
        metrics_public=os.environ.get("SMSGW_METRICS_PUBLIC", "") == "1",
        node_id=node_id,
        leases=LeaseConfig(ttl=args.lease_ttl, tick=min(0.5, args.lease_ttl / 6)),
        reuse_port=args.reuse_port,
        cluster=not args.no_leases,
        dlr_keys=_dlr_keys(args.dlr_key, os.environ.get("SMSGW_DLR_KEYS", "")),
        engine=_engine_config(args),
        operator_dlr=_sim_dlr(args.sim_dlr),
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            node = await nursery.start(partial(run_node, options))
            # One machine-readable line, for scripts that start a node and need its address.
            print(msgspec.json.encode({"event": "listening", "url": node.url}).decode(), flush=True)

    trio.run(main)
    return 0


def _serve_workers(args: argparse.Namespace, workers: int, node_id: str, admin_key: str) -> int:
    """`--workers N`: N nodes on one port, each its own process (smsgw/workers.py)."""
    from smsgw.workers import serve_workers

    # One database and one admin key for all: resolved here (an embedded PostgreSQL starts
    # once, in this process) and handed down.
    env = {**os.environ, "DATABASE_URL": database_url(), "SMSGW_ADMIN_KEY": admin_key}
    worker_args = ["--lease-ttl", str(args.lease_ttl), "--operator-name", args.operator_name]
    for url in args.operator_url:
        worker_args += ["--operator-url", url]
    if args.routing is not None:
        worker_args += ["--routing", args.routing[0]]
    if args.attempt_timeout is not None:
        worker_args += ["--attempt-timeout", str(args.attempt_timeout)]
    if args.operator_latency_ms:
        worker_args += ["--operator-latency-ms", args.operator_latency_ms]
    if args.log_json:
        worker_args.append("--log-json")
    for pair in args.dlr_key:
        worker_args += ["--dlr-key", pair]
    if args.sim_dlr:
        worker_args += ["--sim-dlr", args.sim_dlr]
        if not any(p.partition("=")[0] == args.operator_name for p in args.dlr_key):
            # One key for the simulated operator on every worker: its reports reach whichever
            # worker the shared port hands them to.
            pairs = [
                env.get("SMSGW_DLR_KEYS", ""),
                f"{args.operator_name}={secrets.token_urlsafe(32)}",
            ]
            env["SMSGW_DLR_KEYS"] = ",".join(p for p in pairs if p)
    if args.production:
        worker_args.append("--production")
    worker_args += ["--recipient-limit-per-hour", str(args.recipient_limit_per_hour)]
    for flag, value in (
        ("--operator-errors", args.operator_errors),
        ("--window", args.window),
        ("--express-reserve-share", args.express_reserve_share),
        ("--light-reserve-share", args.light_reserve_share),
    ):
        if value is not None:
            worker_args += [flag, str(value)]
    if args.scheduler_fifo:
        worker_args.append("--scheduler-fifo")
    top_args = ["-v"] if args.verbose else []
    trio.run(
        partial(serve_workers, workers, args.host, args.port, node_id, worker_args, env, top_args)
    )
    return 0


def _operator_url(value: str) -> str:
    """argparse type for [NAME=]URL: checked here, kept as given (server.default_providers
    splits it)."""
    from smsgw.operators.smpp.client import parse_smpp_url
    from smsgw.server import split_operator_url

    name, url = split_operator_url(value)
    if name != "" and url.startswith("smpp://"):
        try:
            parse_smpp_url(url)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None
        return value
    if name == "" or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"{value!r}: want [NAME=]http(s)://HOST:PORT or [NAME=]smpp://ID:PASSWORD@HOST:PORT"
        )
    return value


def _routing_file(path: str) -> tuple[str, RoutingConfig]:
    """argparse type for --routing: the file read and checked now, a usage error if bad."""
    from smsgw.engine.routing import RoutingConfig

    try:
        with open(path, "rb") as file:
            return path, msgspec.json.decode(file.read(), type=RoutingConfig)
    except (OSError, msgspec.DecodeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{path}: {error}") from None


def _dlr_keys(given: list[str], env: str) -> tuple[tuple[str, str], ...]:
    """NAME=KEY pairs from --dlr-key (repeatable) and SMSGW_DLR_KEYS (comma-separated)."""
    pairs = [*given, *(p.strip() for p in env.split(",") if p.strip())]
    return tuple(_dlr_key(p) for p in pairs)


def _dlr_key(value: str) -> tuple[str, str]:
    name, sep, key = value.partition("=")
    if not sep or not name or not key:
        raise SystemExit(f"a DLR key must be NAME=KEY, not {value.split('=')[0]!r}=...")
    return name, key


def _sim_dlr(value: str | None) -> DlrProfile | None:
    """RATIO,MEDIAN_MS,P99_MS: the in-process simulated operators' delivery reports."""
    if value is None:
        return None
    ratio, median, p99 = (float(part) for part in value.split(","))
    return DlrProfile(delivered_ratio=ratio, delay_ms_median=median, delay_ms_p99=p99)


def _sim_dlr_arg(value: str) -> str:
    try:
        _sim_dlr(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{value!r}: want DELIVERED_RATIO,MEDIAN_MS,P99_MS ({error})"
        ) from None
    return value


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings `serve` takes flags for; the rest keep EngineConfig's defaults."""
    changes: dict[str, object] = {
        "recipient_limit_per_hour": args.recipient_limit_per_hour,
        "production": args.production,
    }
    if args.window is not None:
        changes["window"] = args.window
    if args.express_reserve_share is not None:
        changes["express_reserve_share"] = args.express_reserve_share
    if args.light_reserve_share is not None:
        changes["light_reserve_share"] = args.light_reserve_share
    if args.scheduler_fifo:
        changes["scheduler_fifo"] = True
    if args.routing is not None:
        changes["routing"] = args.routing[1]
    config = msgspec.structs.replace(EngineConfig(), **changes)
    if args.attempt_timeout is not None:
        retry = msgspec.structs.replace(config.retry, attempt_timeout=args.attempt_timeout)
        config = msgspec.structs.replace(config, retry=retry)
    return config


def _operator_profile(
    latency: str | None, name: str = "sim", errors: str | None = None
) -> OperatorProfile:
    """The in-process simulated operator's profile; `latency` is "MEDIAN,P99" in ms, `errors`
    "TEMPORARY,PERMANENT" probabilities."""
    profile = OperatorProfile(name=name)
    if latency is not None:
        median, p99 = (float(part) for part in latency.split(","))
        profile = msgspec.structs.replace(profile, latency_ms_median=median, latency_ms_p99=p99)
    if errors is not None:
        temporary, permanent = (float(part) for part in errors.split(","))
        profile = msgspec.structs.replace(profile, p_temporary=temporary, p_permanent=permanent)
    return profile


def _error_rates(value: str) -> str:
    """argparse type for TEMPORARY,PERMANENT probabilities."""
    try:
        _operator_profile(None, "sim", value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{value!r}: want TEMPORARY,PERMANENT probabilities ({error})"
        ) from None
    return value


def _latency_ms(value: str) -> str:
    """argparse type for MEDIAN,P99: checked here, so a bad value is a usage error."""
    try:
        _operator_profile(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{value!r}: want MEDIAN,P99 in ms ({error})") from None
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: want a whole number >= 1")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r}: want a number > 0")
    return number


def _migrate(args: argparse.Namespace) -> int:
    import trio_asyncio

    from smsgw.storage.pg import Database, migrate

    async def main() -> None:
        async with trio_asyncio.open_loop():
            db = await Database.open(database_url(), schema=_schema())
            try:
                applied = await migrate(db)
            finally:
                await db.close()
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))

    trio.run(main)
    return 0


def _accounts_create(args: argparse.Namespace) -> int:
    import trio_asyncio

    from smsgw.engine.ports import WriteGroup
    from smsgw.http.context import hash_key, new_api_key
    from smsgw.storage.pg import Database, PgStore, migrate

    async def main() -> None:
        api_key = new_api_key()
        async with trio_asyncio.open_loop():
            db = await Database.open(database_url(), schema=_schema())
            try:
                await migrate(db)
                group = WriteGroup()
                group.creates.append((args.name, args.credit, hash_key(api_key)))
                account = (await PgStore(db).commit_group(group)).creates[0]
            finally:
                await db.close()
        out = {"id": account.id, "name": account.name, "api_key": api_key}
        out |= {"balance": account.balance, "signing_secret": account.signing_secret}
        print(msgspec.json.encode(out).decode())

    trio.run(main)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smsgw.sim.simulate import Overrides, run

    overrides = Overrides(
        accounts=args.accounts,
        messages=args.messages,
        connections=args.connections,
        credit=args.credit,
        express_share=args.express_share,
        final_timeout=args.timeout,
    )
    report, _ = run(
        args.scenario,
        mode=args.mode,
        scale=args.scale,
        seed=args.seed,
        out=Path(args.out) if args.out else None,
        live=not args.no_progress,
        overrides=overrides,
    )
    return 0 if report.passed else 1


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smsgw.bench import DEFAULT_OUT, run

    return run(args.set, Path(args.out) if args.out else DEFAULT_OUT, only=args.only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smsgw", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a gateway node (embedded PostgreSQL by default)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--operator-url",
        action="append",
        default=[],
        type=_operator_url,
        metavar="[NAME=]URL",
        help="an operator (repeatable), named NAME: http(s)://HOST:PORT speaks the HTTP batch"
        " protocol (default name http:HOST:PORT), smpp://SYSTEM_ID:PASSWORD@HOST:PORT?binds=2&"
        "window=10&tps=500 SMPP 3.4 (default name smpp:SYSTEM_ID@HOST:PORT); default:"
        " in-process simulated operators",
    )
    serve.add_argument(
        "--routing",
        type=_routing_file,
        metavar="FILE",
        help="JSON: operator weights, windows and throughput caps, route overrides by account"
        " or prefix, the circuit breakers' policy (see docs/architecture.md, Operators)",
    )
    serve.add_argument(
        "--attempt-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="how long one attempt (a batch) may wait for an operator's answer (default 10)",
    )
    serve.add_argument(
        "--operator-latency-ms",
        type=_latency_ms,
        metavar="MEDIAN,P99",
        help="latency of the in-process simulated operator (default 20,80)",
    )
    serve.add_argument(
        "--operator-name",
        default="sim",
        help="name of the in-process simulated operator (stored with each message it sends)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="node processes serving this port (SO_REUSEPORT), each a whole node; default:"
        " one per core",
    )
    serve.add_argument(
        "--node-id",
        default=os.environ.get("SMSGW_NODE_ID", ""),
        metavar="ID",
        help="this node's unique name among the nodes sharing DATABASE_URL (default: the host"
        " name; with --workers N, ID-0 .. ID-N-1); also SMSGW_NODE_ID",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, so several `serve` processes can share the port",
    )
    serve.add_argument(
        "--no-leases",
        action="store_true",
        help="run alone, without shard leases: dispatch every queued message found (never run"
        " two such nodes on one database; for measuring what the leases cost a lone node)",
    )
    serve.add_argument(
        "--lease-ttl",
        type=_positive_float,
        default=3.0,
        metavar="SECONDS",
        help="shard lease time to live: a dead node's shards are taken over this long after"
        " its last renewal (default 3)",
    )
    serve.add_argument(
        "--dlr-key",
        action="append",
        default=[],
        metavar="NAME=KEY",
        help="operator NAME may POST delivery reports to /v1/dlr/NAME with this bearer key"
        " (repeatable; also SMSGW_DLR_KEYS=NAME=KEY,...; keep keys out of shell history)",
    )
    serve.add_argument(
        "--sim-dlr",
        type=_sim_dlr_arg,
        metavar="DELIVERED_RATIO,MEDIAN_MS,P99_MS",
        help="the in-process simulated operator sends delayed delivery reports to this node"
        " (e.g. 0.95,500,3000)",
    )
    serve.add_argument(
        "--production",
        action="store_true",
        help="production mode: status callback URLs may name public hosts, never private,"
        " loopback or metadata addresses (default: loopback hosts only)",
    )
    serve.add_argument(
        "--operator-errors",
        type=_error_rates,
        metavar="TEMPORARY,PERMANENT",
        help="error probabilities of the in-process simulated operator (default 0.03,0.02)",
    )
    serve.add_argument(
        "--recipient-limit-per-hour",
        type=int,
        default=EngineConfig().recipient_limit_per_hour,
        metavar="N",
        help="messages an account may send to one number in an hour (default %(default)s;"
        " an account's own setting overrides it)",
    )
    serve.add_argument(
        "--window",
        type=int,
        metavar="N",
        help=f"messages in flight to operators at once (default {EngineConfig().window})",
    )
    serve.add_argument(
        "--express-reserve-share",
        type=float,
        metavar="SHARE",
        help="share of the window only express messages may use (default"
        f" {EngineConfig().express_reserve_share})",
    )
    serve.add_argument(
        "--light-reserve-share",
        type=float,
        metavar="SHARE",
        help="share of the bulk window kept for accounts with little backlog while they send"
        f" (default {EngineConfig().light_reserve_share}; 0: none)",
    )
    serve.add_argument(
        "--scheduler-fifo",
        action="store_true",
        help="benchmarks only: one first-come-first-served queue instead of fair scheduling",
    )
    serve.add_argument(
        "--log-json",
        action="store_true",
        help="log one JSON object a line, with request ids (also: SMSGW_LOG_FORMAT=json)",
    )
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=_migrate)

    accounts = sub.add_parser("accounts", help="manage accounts")
    accounts_sub = accounts.add_subparsers(dest="accounts_command", required=True)
    create = accounts_sub.add_parser("create", help="create an account and print its API key")
    create.add_argument("name")
    create.add_argument("--credit", type=int, default=0)
    create.set_defaults(func=_accounts_create)

    simulate = sub.add_parser(
        "simulate",
        help="run a load scenario (virtual time, or a real node on the wall clock) and report",
    )
    simulate.add_argument(
        "scenario",
        nargs="?",
        default="smoke",
        choices=["smoke", "production-test", "day", "whale", "outage"],
        help="default smoke",
    )
    simulate.add_argument("--mode", choices=["virtual", "wall"], help="default: the scenario's")
    simulate.add_argument("--scale", type=float, default=1.0, help="messages and accounts x")
    simulate.add_argument("--seed", type=int, help="default: the scenario's")
    simulate.add_argument("--out", help="report folder (default var/reports/SCENARIO-TIME)")
    simulate.add_argument("--no-progress", action="store_true", help="no progress display")
    simulate.add_argument("--accounts", type=int, help="override the scenario's accounts")
    simulate.add_argument("--messages", type=int, help="override the scenario's messages")
    simulate.add_argument("--connections", type=int, help="wall clock: concurrent clients")
    simulate.add_argument("--credit", type=int, help="credit per account (default: from need)")
    simulate.add_argument("--express-share", type=float, help="override the express share")
    simulate.add_argument(
        "--timeout", type=float, help="wall clock: seconds to wait for final states (300)"
    )
    simulate.set_defaults(func=_simulate)

    bench = sub.add_parser("bench", help="run benchmarks/ and the simulator; one report")
    bench.add_argument("set", nargs="?", default="quick", choices=["quick", "full"])
    bench.add_argument("--out", help="report folder (default benchmarks/reports/latest)")
    bench.add_argument("--only", nargs="*", help="run only jobs whose name contains a word")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        json=True if getattr(args, "log_json", False) else None,
        level=logging.INFO if args.verbose else logging.WARNING,
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
