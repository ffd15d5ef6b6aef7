"""An HTTP load generator for loopback benchmarks: keep-alive connections on trio and h11.

Run it as a process (`python -m smsgw.sim.loadgen --help`) so it has a core of its own, or call
`run_load` in-process. It prints one JSON `LoadReport` on stdout.

Two ways to shape the load: one message per request (POST /v1/messages) or `batch` messages per
request (POST /v1/messages/batch); and closed loop (each connection sends its next request as
soon as the last is answered: the most the server takes) or open loop at `rate` messages per
second (requests leave on a fixed schedule shared by all connections, so a sustained run
offers the same load whatever the server does, as long as enough connections are free).

Speed matters more than generality here: the gateway it measures does about 1,000 requests per
second per core, so the generator must stay far below a core at that rate. Each connection is
one trio task that sends requests one after another on a raw socket. h11 does the HTTP/1.1
framing and parsing; its request events are built once per (API key, body length) and reused,
which spares it re-validating the same headers on every request.

This module runs a load and is its command line; `loadgen_config` holds the config and the
report, `loadgen_wire` the connections.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import msgspec
import trio

from smsgw.sim.loadgen_config import (
    BATCH_PATH,
    SINGLE_PATH,
    LatencyHistogram,
    LatencySummary,
    LoadConfig,
    LoadReport,
    loopback_target,
)
from smsgw.sim.loadgen_wire import RunState, drive_connection

# The load generator's public names, wherever they are defined (loadgen_config: the config
# and the report; loadgen_wire: the connections).
__all__ = [
    "LatencyHistogram",
    "LatencySummary",
    "LoadConfig",
    "LoadReport",
    "loopback_target",
    "main",
    "run_load",
]


async def run_load(
    config: LoadConfig, *, on_accepted: Callable[[str], None] | None = None
) -> LoadReport:
    """Put load on `config.url` and report what happened.

    `on_accepted` is called with the "id" of every 202 response, warmup included (for
    durability checks). Returns within duration + drain seconds: requests still in flight then
    are cancelled and reported as `unanswered`. If the caller cancels, every connection is
    closed and no report is made.
    """
    host, port, host_header = loopback_target(config.url)
    run = RunState(config, host_header, on_accepted)
    started = run.started = trio.current_time()
    run.measure_from = started + config.warmup
    run.stop_issuing_at = started + config.duration
    with trio.move_on_at(run.stop_issuing_at + config.drain):
        async with trio.open_nursery() as nursery:
            for _ in range(config.connections):
                nursery.start_soon(drive_connection, run, host, port)
    finished = trio.current_time()
    window = max(finished - run.measure_from, 0.0)
    # Offered load is over the time the run issued (to its last request), not the drain.
    issue_window = max(min(run.stop_issuing_at, finished) - run.measure_from, 0.0)
    if config.count is not None and run.issued >= config.count:
        issue_window = max(run.last_issue_at - run.measure_from, 0.0)
    successes = sum(n for status, n in run.by_status.items() if 200 <= status < 300)
    return LoadReport(
        requests=run.requests,
        by_status={str(status): run.by_status[status] for status in sorted(run.by_status)},
        errors=run.errors,
        timeouts=run.timeouts,
        unanswered=run.in_flight,
        duration_s=round(window, 3),
        rate_per_s=round(successes / window, 1) if window > 0.0 else 0.0,
        latency_ms=run.latency.summary_ms(),
        connections=config.connections,
        cpu_count=os.cpu_count(),
        warmup_requests=run.warmup_requests,
        accepted_ids=run.accepted_ids,
        bad_ids=run.bad_ids,
        batch=config.batch,
        items=run.items,
        items_rejected=run.items_rejected,
        items_per_s=round(run.items / window, 1) if window > 0.0 else 0.0,
        offered_items=run.offered_items,
        offered_rate_per_s=(
            round(run.offered_items / issue_window, 1) if issue_window > 0.0 else 0.0
        ),
        target_rate_per_s=config.rate,
        latency_cdf_ms=run.latency.cdf_ms(),
        retry_after=dict(sorted(run.retry_after.items())),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smsgw.sim.loadgen",
        description="Load a loopback HTTP endpoint; print one JSON report on stdout.",
    )
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT (loopback only)")
    parser.add_argument("--keys", help="JSON file: a list of API keys")
    parser.add_argument("--no-auth", action="store_true", help="send no Authorization header")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, required=True, help="seconds, at most 3600")
    parser.add_argument("--count", type=int, help="stop after this many requests")
    parser.add_argument("--path", help=f"default {SINGLE_PATH}, or {BATCH_PATH} with --batch")
    parser.add_argument(
        "--batch", type=int, help='messages per request, POSTed as {"messages": [...]}'
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="open loop: offer this many messages/s in all, paced across the connections",
    )
    parser.add_argument("--method", choices=("POST", "GET"), default="POST")
    parser.add_argument("--express-share", type=float, default=0.0)
    parser.add_argument("--zipf", type=float, default=0.0, help="0 = uniform (round robin)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds not measured")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--drain", type=float, default=2.0, help="grace for requests in flight")
    parser.add_argument(
        "--ids-out",
        help="write the id of every accepted message here (batch items too), one a line",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    keys: tuple[str, ...] = ()
    if args.no_auth:
        if args.keys is not None:
            parser.error("--keys and --no-auth exclude each other")
    elif args.keys is None:
        parser.error("--keys is required unless --no-auth is given")
    else:
        try:
            with open(args.keys, "rb") as file:
                keys = tuple(msgspec.json.decode(file.read(), type=list[str]))
        except (OSError, msgspec.DecodeError) as error:
            parser.error(f"--keys {args.keys}: {error}")
        if not keys:
            parser.error(f"--keys {args.keys}: no keys")
    try:
        config = LoadConfig(
            url=args.url,
            duration=args.duration,
            keys=keys,
            count=args.count,
            connections=args.connections,
            path=args.path,
            batch=args.batch,
            rate=args.rate,
            method=args.method,
            express_share=args.express_share,
            zipf=args.zipf,
            seed=args.seed,
            warmup=args.warmup,
            timeout=args.timeout,
            drain=args.drain,
        )
    except ValueError as error:
        parser.error(str(error))
    if args.ids_out is None:
        report = trio.run(run_load, config)
    else:
        # Buffered synchronous writes: a flush every 1 MiB stalls the loop far less than
        # handing each id to a worker thread would.
        with open(args.ids_out, "w", buffering=1 << 20) as ids_file:

            def write_id(message_id: str) -> None:
                ids_file.write(message_id + "\n")

            report = trio.run(lambda: run_load(config, on_accepted=write_id))
    sys.stdout.buffer.write(msgspec.json.encode(report) + b"\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
