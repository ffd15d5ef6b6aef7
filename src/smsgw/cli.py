"""The `smsgw` command: serve, migrate, accounts, simulate, bench."""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import msgspec
import trio

from smsgw.engine import numbers
from smsgw.engine.node import EngineConfig
from smsgw.logs import configure as configure_logging
from smsgw.logs import redact_url
from smsgw.sim.dlr import DlrProfile
from smsgw.sim.operator import OperatorProfile
from smsgw.storage.embedded import ChosenDatabase, choose_database, database_url, embedded_log_paths

if TYPE_CHECKING:
    from smsgw.engine.node import EngineConfig
    from smsgw.engine.routing import RoutingConfig
    from smsgw.storage.database import Database

T = TypeVar("T")


class UsageError(Exception):
    """Bad input found after parsing (no such account, say): one line on stderr, exit 2."""


# The environment each command reads, for its help.
ENV_DATABASE = (
    ("DATABASE_URL", "PostgreSQL to use; unset: an embedded server in var/pgdata"),
    ("SMSGW_DATA_DIR", "the embedded server's folder when DATABASE_URL is unset"),
    ("SMSGW_SCHEMA", "the PostgreSQL schema of the gateway's tables (default public)"),
)
ENV_LOG = (("SMSGW_LOG_FORMAT", "json: one JSON object a line (as --log-json)"),)
ENV_SERVE = (
    *ENV_DATABASE,
    ("SMSGW_ADMIN_KEY", "the admin API key; unset: one is made and printed"),
    ("SMSGW_NODE_ID", "this node's name (as --node-id)"),
    ("SMSGW_METRICS_PUBLIC", "1: GET /metrics without the admin key"),
    ("SMSGW_DLR_KEYS", "NAME=KEY,...: operators' delivery report keys (as --dlr-key)"),
    ("SMSGW_MAX_ACCOUNT_BACKLOG", "as --max-account-backlog"),
    ("SMSGW_MAX_NODE_BACKLOG", "as --max-node-backlog"),
    ("SMSGW_MAX_REQUEST_BODY_BYTES", "as --max-request-body-bytes"),
    *ENV_LOG,
)


def _env_epilog(variables: tuple[tuple[str, str], ...]) -> str:
    width = max(len(name) for name, _ in variables)
    lines = [f"  {name:<{width}}  {meaning}" for name, meaning in variables]
    return "environment:\n" + "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless it has none worth showing or its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == []
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        return version("smsgw")
    except PackageNotFoundError:
        return "unknown"


def _schema() -> str:
    """SMSGW_SCHEMA puts the gateway's tables in their own PostgreSQL schema (tests use it)."""
    return os.environ.get("SMSGW_SCHEMA", "public")


serve_log = logging.getLogger("smsgw.serve")


def _serve(args: argparse.Namespace) -> int:
    from smsgw.engine.shards import LeaseConfig
    from smsgw.runtime.server import NodeOptions, run_node

    if args.production and not os.environ.get("DATABASE_URL"):
        raise UsageError(
            "--production needs DATABASE_URL: it does not run on an embedded PostgreSQL"
            " (one process's disk, no backups, no replicas)"
        )
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers > 1 and args.no_leases:
        raise UsageError("--no-leases runs one node: use it with --workers 1")
    admin_key = os.environ.get("SMSGW_ADMIN_KEY")
    if not admin_key:
        admin_key = "adm_" + secrets.token_urlsafe(32)
        print(f"SMSGW_ADMIN_KEY is not set; this run's admin key: {admin_key}", file=sys.stderr)
    node_id = args.node_id or socket.gethostname()
    try:
        numbers.set_node_country(args.default_country)
    except ValueError as exc:
        raise UsageError(f"--default-country: {exc}") from None
    database = choose_database()
    if workers > 1:
        return _serve_workers(args, workers, node_id, admin_key, database)
    options = NodeOptions(
        database_url=database.url,
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
            if args.worker:
                serve_log.info("worker %s listening (pid %d)", node_id, os.getpid())
            else:
                _log_startup(args, node.url, 1, node_id, database, options.engine)
            # One machine-readable line, for scripts that start a node and need its address.
            print(msgspec.json.encode({"event": "listening", "url": node.url}).decode(), flush=True)

    trio.run(main)
    return 0


def _log_startup(
    args: argparse.Namespace,
    url: str,
    workers: int,
    node_id: str,
    database: ChosenDatabase,
    config: EngineConfig,
) -> None:
    """What `serve` runs, at INFO, once (by the process the user started): version, address,
    node id and workers, the database, the operators and the limits; and the warnings that
    matter (an embedded database, /metrics open)."""
    nodes = node_id if workers == 1 else f"{node_id}-0 .. {node_id}-{workers - 1}"
    serve_log.info(
        "smsgw %s serving %s: node %s (%d worker%s), production mode %s, access log %s",
        _version(),
        url,
        nodes,
        workers,
        "" if workers == 1 else "s",
        "on" if args.production else "off (callbacks to loopback hosts only)",
        "off" if args.no_access_log else "on",
        extra={
            "event": "startup",
            "version": _version(),
            "url": url,
            "node_id": node_id,
            "workers": workers,
            "production": args.production,
            "access_log": not args.no_access_log,
        },
    )
    schema = _schema()
    if database.embedded_dir is not None:
        server_log, setup_log = embedded_log_paths(database.embedded_dir)
        serve_log.info(
            "database: embedded PostgreSQL in %s, schema %s (its log: %s; start-up: %s)",
            database.embedded_dir,
            schema,
            server_log,
            setup_log,
            extra={"embedded": True, "data_dir": str(database.embedded_dir), "schema": schema},
        )
        serve_log.warning(
            "the embedded PostgreSQL is for trying smsgw out (one process's disk, no backups):"
            " set DATABASE_URL for production (serve --production refuses to start without it)"
        )
    else:
        shown = redact_url(database.url)
        serve_log.info(
            "database: %s, schema %s",
            shown,
            schema,
            extra={"embedded": False, "database": shown, "schema": schema},
        )
    operators = _operators_summary(args)
    serve_log.info("operators: %s", "; ".join(operators), extra={"operators": operators})
    limits = {
        "window": config.window,
        "express_reserve_share": config.express_reserve_share,
        "light_reserve_share": config.light_reserve_share,
        "attempt_timeout_s": config.retry.attempt_timeout,
        "recipient_limit_per_hour": config.recipient_limit_per_hour,
        "account_backlog": config.admission.account_backlog,
        "node_backlog": config.admission.node_backlog,
        "request_body_bytes": config.admission.request_body_bytes,
        "api_rate_per_second": config.api_rate_per_second,
        "api_burst": config.api_burst,
        "lease_ttl_s": args.lease_ttl,
    }
    serve_log.info(
        "limits: %s in flight (express reserve %s, light reserve %s), attempt timeout %s s,"
        " %s messages to one number an hour, bulk backlog %s per account and %s per node,"
        " request bodies %s MiB at once,"
        " API ceiling %s requests a second per account on a node (bursts %s), lease ttl %s s",
        f"{config.window:,}",
        f"{config.express_reserve_share:.0%}",
        f"{config.light_reserve_share:.0%}",
        f"{config.retry.attempt_timeout:g}",
        f"{config.recipient_limit_per_hour:,}",
        f"{config.admission.account_backlog:,}",
        f"{config.admission.node_backlog:,}",
        f"{config.admission.request_body_bytes / (1 << 20):,.4g}",
        f"{config.api_rate_per_second:,.0f}",
        f"{config.api_burst:,}",
        f"{args.lease_ttl:g}",
        extra={"limits": limits},
    )
    serve_log.info(
        "prices: %s a segment, %s an express one (accounts may have their own)",
        config.price_per_segment,
        config.price_per_segment + config.express_surcharge,
        extra={
            "prices": {
                "per_segment": config.price_per_segment,
                "express_surcharge": config.express_surcharge,
            }
        },
    )
    if os.environ.get("SMSGW_METRICS_PUBLIC", "") == "1":
        serve_log.warning("GET /metrics answers without the admin key (SMSGW_METRICS_PUBLIC=1)")


def _operators_summary(args: argparse.Namespace) -> list[str]:
    """Each operator as the log may show it: URLs without passwords or query strings."""
    from smsgw.runtime.server import split_operator_url

    routing = f", routing from {args.routing[0]}" if args.routing is not None else ""
    if args.operator_url:
        shown = []
        for value in args.operator_url:
            name, url = split_operator_url(value)
            shown.append(f"{name} {redact_url(url)}" if name else redact_url(url))
        return [s + routing for s in shown]
    p = _operator_profile(args.operator_latency_ms, args.operator_name, args.operator_errors)
    reports = f", delivery reports {args.sim_dlr}" if args.sim_dlr else ""
    return [
        f"{p.name} (simulated in-process: latency {p.latency_ms_median:g} ms median,"
        f" {p.latency_ms_p99:g} ms p99; failures {p.p_temporary:.0%} temporary,"
        f" {p.p_permanent:.0%} permanent{reports}){routing}"
    ]


def _serve_workers(
    args: argparse.Namespace,
    workers: int,
    node_id: str,
    admin_key: str,
    database: ChosenDatabase,
) -> int:
    """`--workers N`: N nodes on one port, each its own process (smsgw/workers.py)."""
    from smsgw.runtime.workers import serve_workers

    # One database and one admin key for all: resolved here (an embedded PostgreSQL starts
    # once, in this process) and handed down.
    env = {**os.environ, "DATABASE_URL": database.url, "SMSGW_ADMIN_KEY": admin_key}
    worker_args = ["--worker", "--lease-ttl", str(args.lease_ttl)]
    worker_args += ["--operator-name", args.operator_name]
    if args.no_access_log:
        worker_args.append("--no-access-log")
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
    worker_args += ["--price-per-segment", str(args.price_per_segment)]
    worker_args += ["--express-surcharge", str(args.express_surcharge)]
    worker_args += ["--default-country", args.default_country]
    for flag, value in (
        ("--operator-errors", args.operator_errors),
        ("--window", args.window),
        ("--express-reserve-share", args.express_reserve_share),
        ("--light-reserve-share", args.light_reserve_share),
        ("--max-account-backlog", args.max_account_backlog),
        ("--max-node-backlog", args.max_node_backlog),
        ("--max-request-body-bytes", args.max_request_body_bytes),
    ):
        if value is not None:
            worker_args += [flag, str(value)]
    if args.scheduler_fifo:
        worker_args.append("--scheduler-fifo")
    top_args = ["-v"] if args.verbose else []
    config = _engine_config(args)
    trio.run(
        partial(
            serve_workers,
            workers,
            args.host,
            args.port,
            node_id,
            worker_args,
            env,
            top_args,
            on_listening=lambda url: _log_startup(args, url, workers, node_id, database, config),
        )
    )
    return 0


def _operator_url(value: str) -> str:
    """argparse type for [NAME=]URL: checked here, kept as given (server.default_providers
    splits it)."""
    from smsgw.operators.smpp.config import parse_smpp_url
    from smsgw.runtime.server import split_operator_url

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


def _price(value: str) -> int:
    """A price flag (or its environment variable): a whole number of the smallest unit."""
    try:
        price = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 0 <= price <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{price} is not between 0 and 1,000,000")
    return price


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings `serve` takes flags for; the rest keep EngineConfig's defaults."""
    changes: dict[str, object] = {
        "recipient_limit_per_hour": args.recipient_limit_per_hour,
        "production": args.production,
        "price_per_segment": args.price_per_segment,
        "express_surcharge": args.express_surcharge,
    }
    if args.window is not None:
        changes["window"] = args.window
    if args.express_reserve_share is not None:
        changes["express_reserve_share"] = args.express_reserve_share
    if args.light_reserve_share is not None:
        changes["light_reserve_share"] = args.light_reserve_share
    if args.scheduler_fifo:
        changes["scheduler_fifo"] = True
    bounds: dict[str, object] = {}
    if args.max_account_backlog is not None:
        bounds["account_backlog"] = args.max_account_backlog
    if args.max_node_backlog is not None:
        bounds["node_backlog"] = args.max_node_backlog
    if args.max_request_body_bytes is not None:
        bounds["request_body_bytes"] = args.max_request_body_bytes
    if bounds:
        changes["admission"] = msgspec.structs.replace(EngineConfig().admission, **bounds)
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
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: want a whole number >= 1")
    return number


def _body_budget(value: str) -> int:
    """argparse type for --max-request-body-bytes: at least the largest body a route takes,
    which would otherwise never fit."""
    from smsgw.http.context import MAX_BATCH_BODY_BYTES

    number = _positive_int(value)
    if number < MAX_BATCH_BODY_BYTES:
        raise argparse.ArgumentTypeError(
            f"{value!r}: want at least {MAX_BATCH_BODY_BYTES} (the largest request body)"
        )
    return number


def _credit_amount(value: str) -> int:
    """argparse type for credit: a whole number from 0 to 2^63 - 1."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number < 2**63:
        raise argparse.ArgumentTypeError(f"{value!r}: want a whole number from 0 to 2^63 - 1")
    return number


def _top_up(value: str) -> int:
    number = _credit_amount(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"{value!r}: want a whole number > 0")
    return number


def _account_id(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 0 < number < 2**63:
        raise argparse.ArgumentTypeError(f"{value!r}: want an account id (a whole number > 0)")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r}: want a number > 0")
    return number


def _migrate(args: argparse.Namespace) -> int:
    import trio_asyncio

    from smsgw.storage.database import Database
    from smsgw.storage.pg import migrate

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


def _with_database(work: Callable[[Database], Awaitable[T]]) -> T:
    """Run `work` on the gateway's database (DATABASE_URL or the embedded server, schema
    SMSGW_SCHEMA), migrated first, as `serve` would."""
    import trio_asyncio

    from smsgw.storage.database import Database
    from smsgw.storage.pg import migrate

    async def main() -> T:
        async with trio_asyncio.open_loop():
            db = await Database.open(database_url(), schema=_schema())
            try:
                await migrate(db)
                return await work(db)
            finally:
                await db.close()

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        leaf = _single(group)
        raise leaf  # noqa: B904 -- its own __cause__ kept (`from None` would clear it)


def _single(error: BaseException) -> BaseException:
    """The one exception inside nested one-exception groups (trio's nurseries wrap what
    they raise); `error` itself otherwise."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _print_json(value: Any) -> None:
    print(msgspec.json.encode(value).decode())


def _accounts_create(args: argparse.Namespace) -> int:
    from smsgw.http.context import hash_key, new_api_key
    from smsgw.storage.accounts import create_account

    api_key = new_api_key()
    account = _with_database(
        lambda db: create_account(db, args.name, args.credit, hash_key(api_key))
    )
    _print_json({"id": account["id"], "name": account["name"], "api_key": api_key} | account)
    return 0


def _accounts_list(args: argparse.Namespace) -> int:
    from smsgw.storage.accounts import list_accounts

    for account in _with_database(lambda db: list_accounts(db, limit=args.limit)):
        _print_json(account)
    return 0


def _accounts_show(args: argparse.Namespace) -> int:
    from smsgw.storage.accounts import show_account

    account = _with_database(lambda db: show_account(db, args.id))
    if account is None:
        raise UsageError(f"no account {args.id}")
    _print_json(account)
    return 0


def _accounts_topup(args: argparse.Namespace) -> int:
    from smsgw.engine.credit import TopUpTooLarge
    from smsgw.storage.accounts import topup

    try:
        balance = _with_database(lambda db: topup(db, args.id, args.amount))
    except Exception as error:
        # The store raises it out of its commit (which stored nothing), as the cause.
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, TopUpTooLarge):
            cause = cause.__cause__
        if cause is None:
            raise
        raise UsageError(
            f"account {args.id}'s credit cannot hold {args.amount:,} more (2^63 - 1 in all);"
            " nothing changed"
        ) from None
    if balance is None:
        raise UsageError(f"no account {args.id}")
    _print_json({"id": args.id, "balance": balance})
    return 0


def _accounts_suspend(args: argparse.Namespace) -> int:
    from smsgw.storage.accounts import set_suspended

    suspend = args.accounts_command == "suspend"
    account = _with_database(lambda db: set_suspended(db, args.id, suspend))
    if account is None:
        raise UsageError(f"no account {args.id}")
    _print_json(account)
    return 0


def _accounts_rotate_key(args: argparse.Namespace) -> int:
    from smsgw.http.context import hash_key, new_api_key
    from smsgw.storage.accounts import replace_key

    api_key = new_api_key()
    if not _with_database(lambda db: replace_key(db, args.id, hash_key(api_key))):
        raise UsageError(f"no account {args.id}")
    _print_json({"id": args.id, "api_key": api_key})
    return 0


def _need_sim_extra(command: str) -> None:
    """A one-line UsageError when the simulator's packages are not installed (a node's own
    install leaves them out: they are the `sim` extra)."""
    import importlib.util

    missing = [m for m in ("numpy", "matplotlib", "rich") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"`smsgw {command}` needs the simulator's packages ({', '.join(missing)} missing):"
            " pip install 'smsgw[sim]' (./dev installs them)"
        )


def _simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    _need_sim_extra("simulate")
    from smsgw.simulate.run import Overrides, run

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

    _need_sim_extra("bench")

    from smsgw.simulate.bench import DEFAULT_OUT, run

    return run(args.set, Path(args.out) if args.out else DEFAULT_OUT, only=args.only)


def _add_logging(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v and --log-json: on the top level (defaults False) and on every subcommand (no
    default there, so one given before the subcommand is kept)."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log at INFO level (serve logs at INFO anyway; -v adds its DEBUG lines)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=default,
        help="log one JSON object a line, with request ids (also: SMSGW_LOG_FORMAT=json)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smsgw",
        description=__doc__,
        formatter_class=_HelpFormatter,
        epilog=_env_epilog((*ENV_SERVE,)) + "\n\n`smsgw COMMAND --help` shows a command's.",
    )
    parser.add_argument("--version", action="version", version=f"smsgw {_version()}")
    _add_logging(parser, False)
    common = argparse.ArgumentParser(add_help=False)
    _add_logging(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, env: tuple[tuple[str, str], ...], **kwargs: Any
    ) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = parent.add_parser(
            name,
            parents=[common],
            formatter_class=_HelpFormatter,
            epilog=_env_epilog((*env, *ENV_LOG)),
            description=kwargs.get("help"),
            **kwargs,
        )
        return made

    serve = command(
        sub, "serve", ENV_SERVE, help="run a gateway node (embedded PostgreSQL by default)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free)")
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
        help="name of the in-process simulated operator (stored with each message it sends;"
        " default sim)",
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
        "--default-country",
        default=os.environ.get("SMSGW_DEFAULT_COUNTRY", numbers.DEFAULT_COUNTRY),
        metavar="CC",
        help="ISO 3166 alpha-2 country whose national number forms `to` takes for accounts"
        " without a default_country of their own (default %(default)s;"
        " env SMSGW_DEFAULT_COUNTRY)",
    )
    serve.add_argument(
        "--price-per-segment",
        type=_price,
        default=os.environ.get("PRICE_PER_PART_CENTS", str(EngineConfig().price_per_segment)),
        metavar="N",
        help="what a segment costs, smallest currency unit, for accounts without a price of"
        " their own (default %(default)s; env PRICE_PER_PART_CENTS)",
    )
    serve.add_argument(
        "--express-surcharge",
        type=_price,
        default=os.environ.get("EXPRESS_SURCHARGE_CENTS", str(EngineConfig().express_surcharge)),
        metavar="N",
        help="added to each segment of an express message (default %(default)s;"
        " env EXPRESS_SURCHARGE_CENTS)",
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
        "--max-account-backlog",
        type=_positive_int,
        default=os.environ.get("SMSGW_MAX_ACCOUNT_BACKLOG"),
        metavar="N",
        help="bulk messages an account may have accepted and not yet dispatched before its"
        f" sends get 429 (default {EngineConfig().admission.account_backlog}; env"
        " SMSGW_MAX_ACCOUNT_BACKLOG)",
    )
    serve.add_argument(
        "--max-node-backlog",
        type=_positive_int,
        default=os.environ.get("SMSGW_MAX_NODE_BACKLOG"),
        metavar="N",
        help="bulk messages a node may have accepted and not yet dispatched before sends get"
        f" 503 (default {EngineConfig().admission.node_backlog}; env SMSGW_MAX_NODE_BACKLOG)",
    )
    serve.add_argument(
        "--max-request-body-bytes",
        type=_body_budget,
        default=os.environ.get("SMSGW_MAX_REQUEST_BODY_BYTES"),
        metavar="BYTES",
        help="bytes of request bodies a node holds at once; a request whose body does not fit"
        f" gets 503 unread (default {EngineConfig().admission.request_body_bytes}, at least"
        " the largest body a route takes, 4 MiB; env SMSGW_MAX_REQUEST_BODY_BYTES)",
    )
    serve.add_argument(
        "--scheduler-fifo",
        action="store_true",
        help="benchmarks only: one first-come-first-served queue instead of fair scheduling",
    )
    serve.add_argument(
        "--no-access-log",
        action="store_true",
        help="no log line per HTTP request (method, path without the query, status, time,"
        " request id); the start-up summary and warnings stay",
    )
    # A worker of `serve --workers N`: its parent logs the start-up summary, once.
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    migrate = command(sub, "migrate", ENV_DATABASE, help="apply database migrations")
    migrate.set_defaults(func=_migrate)

    accounts = command(
        sub,
        "accounts",
        ENV_DATABASE,
        help="manage accounts on the database directly (no node needed); prints JSON",
    )
    accounts_sub = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    create = command(
        accounts_sub,
        "create",
        ENV_DATABASE,
        help="create an account; prints its API key and signing secret (shown only now)",
    )
    create.add_argument("name", help="the account's name")
    create.add_argument(
        "--credit", type=_credit_amount, default=0, help="its opening credit, in price units"
    )
    create.set_defaults(func=_accounts_create)
    listing = command(
        accounts_sub, "list", ENV_DATABASE, help="the accounts by id, one JSON object a line"
    )
    listing.add_argument(
        "--limit", type=_positive_int, default=1000, help="at most this many accounts"
    )
    listing.set_defaults(func=_accounts_list)
    show = command(accounts_sub, "show", ENV_DATABASE, help="one account: balance and settings")
    show.add_argument("id", type=_account_id, help="the account's id")
    show.set_defaults(func=_accounts_show)
    topup = command(accounts_sub, "topup", ENV_DATABASE, help="add credit; prints the balance")
    topup.add_argument("id", type=_account_id, help="the account's id")
    topup.add_argument("amount", type=_top_up, help="credit to add, in price units (> 0)")
    topup.set_defaults(func=_accounts_topup)
    rotate = command(
        accounts_sub,
        "rotate-key",
        ENV_DATABASE,
        help="give the account a new API key (printed, shown only now); the old one stops"
        " working on every node at once",
    )
    rotate.add_argument("id", type=_account_id, help="the account's id")
    rotate.set_defaults(func=_accounts_rotate_key)
    for action, what in (
        ("suspend", "its sends are refused and its queued messages wait, on every node at once"),
        ("resume", "its sends are taken again and its queued messages go out"),
    ):
        change = command(accounts_sub, action, ENV_DATABASE, help=f"{action} the account: {what}")
        change.add_argument("id", type=_account_id, help="the account's id")
        change.set_defaults(func=_accounts_suspend)

    simulate = command(
        sub,
        "simulate",
        ENV_DATABASE,
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

    bench = command(
        sub, "bench", ENV_DATABASE, help="run benchmarks/ and the simulator; one report"
    )
    bench.add_argument(
        "set",
        nargs="?",
        default="quick",
        choices=["quick", "full"],
        help="which jobs: quick (minutes) or full (default quick)",
    )
    bench.add_argument("--out", help="report folder (default benchmarks/reports/latest)")
    bench.add_argument(
        "--only", nargs="*", metavar="WORD", help="run only jobs whose name contains a word"
    )
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input is one line on stderr and exit status 2, any other failure
    one line and 1 (the traceback only with -v): never a page that might hold a secret."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        # A server says what it is doing: INFO by default (the start-up summary, the access
        # log, what it changes); -v adds the gateway's DEBUG lines, not the libraries'.
        configure_logging(
            json=True if args.log_json else None,
            level=logging.INFO,
            smsgw_level=logging.DEBUG if args.verbose else None,
            access_log=not args.no_access_log,
        )
    else:
        configure_logging(
            json=True if args.log_json else None,
            level=logging.INFO if args.verbose else logging.WARNING,
        )
    name = " ".join(n for n in (args.command, getattr(args, "accounts_command", None)) if n)
    try:
        return int(args.func(args))
    except UsageError as error:
        print(f"smsgw {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as caught:
        if args.verbose:
            logging.getLogger("smsgw").exception("smsgw %s failed", name)
        leaf = _single(caught)
        first = (str(leaf).strip().splitlines() or [""])[0]
        print(f"smsgw {name}: {type(leaf).__name__}: {first}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
