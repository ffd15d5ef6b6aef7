"""The flags of `smsgw serve`: their types (checked while parsing, so a bad value is a usage
error), and the engine settings and simulated operator they describe."""

from __future__ import annotations

import argparse
import math
import os
from typing import TYPE_CHECKING

import msgspec

from smsgw.cli.common import positive_int
from smsgw.engine import numbers
from smsgw.engine.node import EngineConfig
from smsgw.engine.upkeep import UpkeepConfig
from smsgw.sim.dlr import DlrProfile
from smsgw.sim.operator import OperatorProfile

if TYPE_CHECKING:
    from smsgw.engine.routing import RoutingConfig


def add_arguments(serve: argparse.ArgumentParser) -> None:
    """Every flag of `serve`, with its help."""
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
        type=positive_int,
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
        help="segments in flight to operators at once (operators count PDUs, one a segment;"
        f" default {EngineConfig().window})",
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
        type=positive_int,
        default=os.environ.get("SMSGW_MAX_ACCOUNT_BACKLOG"),
        metavar="N",
        help="bulk messages an account may have accepted and not yet dispatched before its"
        f" sends get 429 (default {EngineConfig().admission.account_backlog}; env"
        " SMSGW_MAX_ACCOUNT_BACKLOG)",
    )
    serve.add_argument(
        "--max-node-backlog",
        type=positive_int,
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
        "--retention-days",
        type=positive_int,
        default=os.environ.get("SMSGW_RETENTION_DAYS", str(UpkeepConfig().retention_days)),
        metavar="N",
        help="messages are kept this many whole UTC days, then dropped a day at a time (a day"
        " still holding a queued or scheduled message is kept); the credit ledger is kept"
        " (default %(default)s; env SMSGW_RETENTION_DAYS)",
    )
    serve.add_argument(
        "--redact-after-days",
        type=_days,
        default=os.environ.get("SMSGW_REDACT_AFTER_DAYS", "0"),
        metavar="N",
        help="the text of a final message is emptied this many days after it was accepted;"
        " prices, statuses and segments are kept (default %(default)s: never; env"
        " SMSGW_REDACT_AFTER_DAYS)",
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


def _operator_url(value: str) -> str:
    """argparse type for [NAME=]URL: checked here, kept as given (server.default_providers
    splits it)."""
    from smsgw.connectors.operators.smpp.config import parse_smpp_url
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


def dlr_keys(given: list[str], env: str) -> tuple[tuple[str, str], ...]:
    """NAME=KEY pairs from --dlr-key (repeatable) and SMSGW_DLR_KEYS (comma-separated)."""
    pairs = [*given, *(p.strip() for p in env.split(",") if p.strip())]
    return tuple(_dlr_key(p) for p in pairs)


def _dlr_key(value: str) -> tuple[str, str]:
    name, sep, key = value.partition("=")
    if not sep or not name or not key:
        raise SystemExit(f"a DLR key must be NAME=KEY, not {value.split('=')[0]!r}=...")
    return name, key


def sim_dlr(value: str | None) -> DlrProfile | None:
    """RATIO,MEDIAN_MS,P99_MS: the in-process simulated operators' delivery reports."""
    if value is None:
        return None
    ratio, median, p99 = (float(part) for part in value.split(","))
    return DlrProfile(delivered_ratio=ratio, delay_ms_median=median, delay_ms_p99=p99)


def _sim_dlr_arg(value: str) -> str:
    try:
        sim_dlr(value)
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


def engine_config(args: argparse.Namespace) -> EngineConfig:
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


def operator_profile(
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
        operator_profile(None, "sim", value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{value!r}: want TEMPORARY,PERMANENT probabilities ({error})"
        ) from None
    return value


def _latency_ms(value: str) -> str:
    """argparse type for MEDIAN,P99: checked here, so a bad value is a usage error."""
    try:
        operator_profile(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{value!r}: want MEDIAN,P99 in ms ({error})") from None
    return value


def _body_budget(value: str) -> int:
    """argparse type for --max-request-body-bytes: at least the largest body a route takes,
    which would otherwise never fit."""
    from smsgw.http.context import MAX_BATCH_BODY_BYTES

    number = positive_int(value)
    if number < MAX_BATCH_BODY_BYTES:
        raise argparse.ArgumentTypeError(
            f"{value!r}: want at least {MAX_BATCH_BODY_BYTES} (the largest request body)"
        )
    return number


def _days(value: str) -> int:
    """argparse type for a whole number of days >= 0."""
    try:
        days = int(value)
    except ValueError:
        days = -1
    if days < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: want a whole number of days >= 0")
    return days


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r}: want a number > 0")
    return number
