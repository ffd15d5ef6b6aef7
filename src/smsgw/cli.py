"""The `smsgw` command: serve, migrate, accounts, simulate."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from functools import partial

import msgspec
import trio

from smsgw.engine.node import EngineConfig
from smsgw.logs import configure as configure_logging
from smsgw.sim.operator import OperatorProfile
from smsgw.storage.embedded import database_url


def _schema() -> str:
    """SMSGW_SCHEMA puts the gateway's tables in their own PostgreSQL schema (tests use it)."""
    return os.environ.get("SMSGW_SCHEMA", "public")


def _serve(args: argparse.Namespace) -> int:
    from smsgw.server import NodeOptions, run_node

    admin_key = os.environ.get("SMSGW_ADMIN_KEY")
    if not admin_key:
        admin_key = "adm_" + secrets.token_urlsafe(32)
        print(f"SMSGW_ADMIN_KEY is not set; this run's admin key: {admin_key}", file=sys.stderr)
    options = NodeOptions(
        database_url=database_url(),
        admin_key=admin_key,
        host=args.host,
        port=args.port,
        schema=_schema(),
        operators=(_operator_profile(args.operator_latency_ms, args.operator_errors),),
        operator_urls=tuple(args.operator_url),
        metrics_public=os.environ.get("SMSGW_METRICS_PUBLIC", "") == "1",
        engine=_engine_config(args),
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            node = await nursery.start(partial(run_node, options))
            # One machine-readable line, for scripts that start a node and need its address.
            print(msgspec.json.encode({"event": "listening", "url": node.url}).decode(), flush=True)

    trio.run(main)
    return 0


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings `serve` takes flags for; the rest keep EngineConfig's defaults."""
    changes: dict[str, object] = {"recipient_limit_per_hour": args.recipient_limit_per_hour}
    if args.window is not None:
        changes["window"] = args.window
    if args.express_reserve_share is not None:
        changes["express_reserve_share"] = args.express_reserve_share
    if args.scheduler_fifo:
        changes["scheduler_fifo"] = True
    return msgspec.structs.replace(EngineConfig(), **changes)


def _operator_profile(latency: str | None, errors: str | None = None) -> OperatorProfile:
    """The in-process simulated operator's profile; `latency` is "MEDIAN,P99" in ms, `errors`
    "TEMPORARY,PERMANENT" probabilities."""
    profile = OperatorProfile(name="sim")
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
        _operator_profile(None, value)
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
        print(msgspec.json.encode({**out, "balance": account.balance}).decode())

    trio.run(main)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from smsgw.sim.simulate import SimulateOptions, simulate

    options = SimulateOptions(
        accounts=args.accounts,
        messages=args.messages,
        connections=args.connections,
        credit=args.credit,
        express_share=args.express_share,
        seed=args.seed,
        timeout=args.timeout,
    )
    report = trio.run(simulate, options)
    return 0 if report.ok else 1


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
        metavar="URL",
        help="an operator speaking the HTTP batch protocol (repeatable); default: in-process"
        " simulated operators",
    )
    serve.add_argument(
        "--operator-latency-ms",
        type=_latency_ms,
        metavar="MEDIAN,P99",
        help="latency of the in-process simulated operator (default 20,80)",
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
        "simulate", help="run a gateway, drive it with the load simulator, print a report"
    )
    simulate.add_argument("--accounts", type=int, default=20)
    simulate.add_argument("--messages", type=int, default=5_000)
    simulate.add_argument("--connections", type=int, default=32)
    simulate.add_argument(
        "--credit", type=int, default=0, help="credit per account (default: about 80%% of need)"
    )
    simulate.add_argument("--express-share", type=float, default=0.05)
    simulate.add_argument("--seed", type=int, default=1)
    simulate.add_argument("--timeout", type=float, default=300.0)
    simulate.set_defaults(func=_simulate)
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
