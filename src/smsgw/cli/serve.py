"""`smsgw serve`: one node in this process, or `--workers N` node processes on one port; and
what it logs as it starts."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import msgspec
import trio

from smsgw.cli.common import ENV_SERVE, Subcommands, UsageError, database_schema, smsgw_version
from smsgw.cli.serve_options import (
    add_arguments,
    dlr_keys,
    engine_config,
    operator_profile,
    sim_dlr,
)
from smsgw.engine import numbers
from smsgw.engine.node import EngineConfig
from smsgw.engine.upkeep import UpkeepConfig
from smsgw.logs import redact_url
from smsgw.storage.embedded import ChosenDatabase, choose_database, embedded_log_paths

serve_log = logging.getLogger("smsgw.serve")


def add_command(sub: Any, command: Subcommands) -> None:
    """`serve` under `sub`."""
    serve = command(
        sub, "serve", ENV_SERVE, help="run a gateway node (embedded PostgreSQL by default)"
    )
    add_arguments(serve)
    serve.set_defaults(func=_serve)


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
        schema=database_schema(),
        operators=(
            operator_profile(args.operator_latency_ms, args.operator_name, args.operator_errors),
        ),
        operator_urls=tuple(args.operator_url),
        metrics_public=os.environ.get("SMSGW_METRICS_PUBLIC", "") == "1",
        node_id=node_id,
        leases=LeaseConfig(ttl=args.lease_ttl, tick=min(0.5, args.lease_ttl / 6)),
        reuse_port=args.reuse_port,
        cluster=not args.no_leases,
        dlr_keys=dlr_keys(args.dlr_key, os.environ.get("SMSGW_DLR_KEYS", "")),
        engine=engine_config(args),
        operator_dlr=sim_dlr(args.sim_dlr),
        upkeep=UpkeepConfig(
            retention_days=args.retention_days, redact_after_days=args.redact_after_days
        ),
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
        smsgw_version(),
        url,
        nodes,
        workers,
        "" if workers == 1 else "s",
        "on" if args.production else "off (callbacks to loopback hosts only)",
        "off" if args.no_access_log else "on",
        extra={
            "event": "startup",
            "version": smsgw_version(),
            "url": url,
            "node_id": node_id,
            "workers": workers,
            "production": args.production,
            "access_log": not args.no_access_log,
        },
    )
    schema = database_schema()
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
    p = operator_profile(args.operator_latency_ms, args.operator_name, args.operator_errors)
    reports = f", delivery reports {args.sim_dlr}" if args.sim_dlr else ""
    return [
        f"{p.name} (simulated in-process: latency {p.latency_ms_median:g} ms median,"
        f" {p.latency_ms_p99:g} ms p99; failures {p.p_temporary:.0%} temporary,"
        f" {p.p_permanent:.0%} permanent{reports}){routing}"
    ]


def _operator_shares(values: Sequence[str], workers: int) -> list[list[str]]:
    """Each worker's `--operator-url` arguments: an SMPP operator's binds dealt out among the
    workers (`share_binds`: the URL's binds and tps are the operator's for the whole gateway,
    not for each process); other operators as given."""
    from smsgw.connectors.operators.smpp.config import parse_smpp_url, share_binds
    from smsgw.runtime.server import split_operator_url

    shares: list[list[str]] = [[] for _ in range(workers)]
    for value in values:
        name, url = split_operator_url(value)
        if not url.startswith("smpp://"):
            for args in shares:
                args += ["--operator-url", value]
            continue
        try:
            binds = parse_smpp_url(url).binds
            dealt = [share_binds(url, i, workers) for i in range(workers)]
        except ValueError as exc:
            raise UsageError(f"--operator-url {redact_url(url)}: {exc}") from None
        for args, share in zip(shares, dealt, strict=True):
            args += ["--operator-url", share.url if name is None else f"{name}={share.url}"]
        if binds < workers:
            serve_log.warning(
                "%s: binds=%d for %d workers: each binds once (%d sessions in all) at %g PDUs"
                " a second: give it at least %d binds, or run fewer workers",
                name or redact_url(url),
                binds,
                workers,
                workers,
                dealt[0].tps,
                workers,
            )
    return shares


def _serve_workers(
    args: argparse.Namespace,
    workers: int,
    node_id: str,
    admin_key: str,
    database: ChosenDatabase,
) -> int:
    """`--workers N`: N nodes on one port, each its own process (smsgw/runtime/workers.py)."""
    from smsgw.runtime.workers import serve_workers

    # One database and one admin key for all: resolved here (an embedded PostgreSQL starts
    # once, in this process) and handed down.
    env = {**os.environ, "DATABASE_URL": database.url, "SMSGW_ADMIN_KEY": admin_key}
    worker_args = ["--worker", "--lease-ttl", str(args.lease_ttl)]
    worker_args += ["--operator-name", args.operator_name]
    if args.no_access_log:
        worker_args.append("--no-access-log")
    operator_args = _operator_shares(args.operator_url, workers)
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
    config = engine_config(args)
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
            each=operator_args.__getitem__,
        )
    )
    return 0
