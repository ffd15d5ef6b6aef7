"""Private APIs on the accept path against the public way to do the same: what each one saves.

    python benchmarks/private_apis.py [--rounds 41] [--accept-rounds 3] [--accept-duration 8]
        [--out benchmarks/reports/latest]

Five shortcuts, each timed as the private way (A) against the public one (B). The way the code
takes is imported from smsgw; the other is kept here as the code had it (IN_CODE says which):

  request_context   current_request(): the ContextVar behind quart's `request` (`_cv_request`)
                    | `request._get_current_object()`, werkzeug's documented way to hold what
                    a proxy stands for (also shown: the proxy attribute `request_ctx.request`)
  app_context       gateway(): the ContextVar behind `current_app` (`_cv_app`)
                    | `current_app.extensions` (also shown: `_get_current_object()`)
  blueprints        the request's `blueprints` cached per endpoint | quart's own
  reply             `Reply` with its waiter parked by trio.lowlevel | on a `trio.Event`; 64
                    tasks ask as `ActorRef.ask` does, one actor answers them in batches as the
                    StoreWriter answers accepts
  uuid7             the millisecond's text cached in a module global | the whole 128 bits
                    formatted on each call. Timed with the cache missing on every call (single
                    accepts come about a millisecond apart) and, aside, hitting (a batch)
  connection_cache  Database.run keeping its connection for the next run | a run that acquires
                    from asyncpg's pool and releases to it, through the same trio-asyncio bridge
                    (SELECT 1, one run after another)

A and B alternate in one process, round by round (A then B, then B then A: `--rounds` rounds),
and each figure is the median over the rounds, so contention from elsewhere on the machine
affects both alike. Time is this process's CPU time, so a wait for PostgreSQL or a pause while
another process runs is not counted.

Uses per accept request: a node runs in this process (`run_node`, a fresh schema, a simulated
operator) and takes `--count-requests` single-message accepts like the load generator's, from
64 concurrent clients, while a profile hook counts calls of current_request, gateway, the
blueprints property, Reply and uuid7. Database.run per request comes from `smsgw serve` itself in
the accept phases (the `smsgw_store_statement_seconds` counts in /metrics, before and after).

CPU per accept request: `--accept-rounds` phases of `smsgw serve` (one node, 100 accounts)
under the load generator (64 connections, 2 s warmup, `--accept-duration` s measured), as
benchmarks/accept.py's gateway_100_accounts: the server's CPU seconds over the POST /v1/messages
it answered, median of the phases.

A shortcut is worth keeping when what it saves per accept request is at least KEEP_SHARE (1%)
of that CPU, taking its most favourable reading (uuid7: the cache always hitting). PostgreSQL
is DATABASE_URL when set, else an embedded server. Prints one JSON object; writes
private_apis.json and private_apis.md into the out folder. Exit code 1 when a decision and the
way the code takes disagree.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import types
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
from quart import Blueprint
from quart_trio import QuartTrio

from common import (
    CpuMeter,
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
    utc_timestamp,
    write_report,
)
from other_ways import (
    CachedBlueprintsRequest,
    ParkedReply,
    current_request_private,
    current_request_proxy_attr,
    gateway_current_object,
    gateway_private,
    run_pooled,
    uuid7_cached,
    uuid7_ms_prefix,
)
from smsgw.engine.actor import Reply
from smsgw.engine.node import EngineConfig
from smsgw.http.context import GatewayRequest, current_request, gateway, uuid7
from smsgw.runtime.server import GC_THRESHOLDS, NodeOptions, run_node
from smsgw.sim.operator import OperatorProfile
from smsgw.storage.database import Database, asyncio_loop

KEEP_SHARE = 0.01  # keep a private API that saves at least 1% of an accept request's CPU
WARMUP_S = 2.0
CONNECTIONS = 64
ACCOUNTS = 100
CREDIT = 10**9
SETTINGS = {"api_rate": 1_000_000}  # as benchmarks/accept.py: measure the node, not the limit
# Calls (or asks, or runs) per timed block: each block takes a few milliseconds.
CALLS = 20_000
ASKERS, ASKS_EACH = 64, 40
DB_RUNS = 200
ACCEPT_ROUTE = "/v1/messages"
# Which way the code takes now, private or public (the report shows it beside the decision).
IN_CODE = {
    "request_context": "public",
    "app_context": "public",
    "blueprints": "public",
    "reply": "public",
    "uuid7": "public",
    "connection_cache": "private",
}


async def select_one(conn: Any) -> Any:
    return await conn.fetchval("SELECT 1")


cached_blueprints = CachedBlueprintsRequest.blueprints.fget
quart_blueprints = GatewayRequest.blueprints.fget  # what the code uses: quart's own


# --- timing ---------------------------------------------------------------------------------


def per_call_ns(fn: Callable[[], object], calls: int = CALLS) -> float:
    """CPU ns per call of `fn` over `calls` calls."""
    started = time.process_time_ns()
    for _ in range(calls):
        fn()
    return (time.process_time_ns() - started) / calls


def per_call_missing_ns(fn: Callable[[], object], cache: list[Any], calls: int = CALLS) -> float:
    """As per_call_ns, with `cache[0]` reset before each call (uuid7's millisecond moved on);
    for B `cache` is a list nothing reads, so both loops do the same extra store."""
    started = time.process_time_ns()
    for _ in range(calls):
        cache[0] = -1
        fn()
    return (time.process_time_ns() - started) / calls


async def per_ask_ns(make_reply: Callable[[], Any]) -> float:
    """CPU ns per ask: ASKERS tasks each ask ASKS_EACH times as `ActorRef.ask` does (put the
    message, wait for the reply under a deadline); one actor answers what is waiting in
    batches."""
    send, receive = trio.open_memory_channel[Any](math.inf)

    async def actor() -> None:
        while True:
            batch = [await receive.receive()]
            while True:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            for reply in batch:
                reply.set(1)

    async def asker() -> None:
        for _ in range(ASKS_EACH):
            reply = make_reply()
            send.send_nowait(reply)
            with trio.CancelScope(deadline=trio.current_time() + 30.0):
                await reply.wait()

    started = time.process_time_ns()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor)
        async with trio.open_nursery() as askers:
            for _ in range(ASKERS):
                askers.start_soon(asker)
        nursery.cancel_scope.cancel()
    return (time.process_time_ns() - started) / (ASKERS * ASKS_EACH)


async def per_run_ns(run: Callable[[], Awaitable[object]]) -> float:
    started = time.process_time_ns()
    for _ in range(DB_RUNS):
        await run()
    return (time.process_time_ns() - started) / DB_RUNS


class Case(msgspec.Struct):
    """One private API (`a`) against its public alternative (`b`), and how `also` variants of
    either (reported, not decided on) compare."""

    name: str
    private: str
    public: str
    a: Callable[[], Awaitable[float]]
    b: Callable[[], Awaitable[float]]
    also: dict[str, Callable[[], Awaitable[float]]] = {}


def sync(measure: Callable[[], float]) -> Callable[[], Awaitable[float]]:
    async def timed() -> float:
        return measure()

    return timed


@contextmanager
def request_context_app() -> Iterator[QuartTrio]:
    """A quart-trio app as http/app.py makes it (GatewayRequest, routes on a blueprint), to
    push a request context of POST /v1/messages in."""
    app = QuartTrio(__name__)
    # GatewayRequest's own `blueprints` is quart's; this subclass adds the cached one.
    app.request_class = CachedBlueprintsRequest
    messages = Blueprint("messages", __name__)

    @messages.post(ACCEPT_ROUTE)
    async def send_message() -> str:
        return ""

    app.register_blueprint(messages)
    app.extensions["smsgw"] = object()
    yield app


async def micro_benchmarks(
    database_url: str, schema: str, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """ns per use of each case's A, B and variants, one figure per round (the connection
    cache's in `schema`)."""
    with request_context_app() as app:
        async with (
            asyncio_loop(),
            app.test_request_context(ACCEPT_ROUTE, method="POST"),
        ):
            req = current_request()
            assert req.url_rule is not None and req is current_request_private()
            assert quart_blueprints(req) == cached_blueprints(req) == ["messages"]
            assert gateway_private() is gateway() is gateway_current_object()
            for made in (uuid7(), uuid7_cached()):
                parsed = uuid.UUID(made)
                assert (
                    str(parsed) == made and parsed.version == 7 and parsed.variant == uuid.RFC_4122
                )
            db = await Database.open(database_url, schema=schema)
            try:
                return await _rounds(_cases(req, db), rounds)
            finally:
                await db.close()


def _cases(req: GatewayRequest, db: Database) -> list[Case]:
    spare: list[Any] = [-1, ""]  # what B's loop stores into in place of uuid7's cache
    return [
        Case(
            "request_context",
            "`_cv_request.get().request`",
            "`request._get_current_object()`",
            sync(lambda: per_call_ns(current_request_private)),
            sync(lambda: per_call_ns(current_request)),
            {
                "proxy attribute `request_ctx.request`": sync(
                    lambda: per_call_ns(current_request_proxy_attr)
                )
            },
        ),
        Case(
            "app_context",
            "`_cv_app.get().app.extensions`",
            "`current_app.extensions`",
            sync(lambda: per_call_ns(gateway_private)),
            sync(lambda: per_call_ns(gateway)),
            {
                "`current_app._get_current_object().extensions`": sync(
                    lambda: per_call_ns(gateway_current_object)
                )
            },
        ),
        Case(
            "blueprints",
            "`blueprints` cached per endpoint",
            "quart's `Request.blueprints`",
            sync(lambda: per_call_ns(partial(cached_blueprints, req))),
            sync(lambda: per_call_ns(partial(quart_blueprints, req))),
        ),
        Case(
            "reply",
            "`Reply` parked with trio.lowlevel",
            "`Reply` on a trio.Event",
            lambda: per_ask_ns(ParkedReply),
            lambda: per_ask_ns(Reply),
        ),
        Case(
            "uuid7",
            "uuid7 with a global millisecond cache (missing)",
            "uuid7 formatted whole each call",
            sync(lambda: per_call_missing_ns(uuid7_cached, uuid7_ms_prefix)),
            sync(lambda: per_call_missing_ns(uuid7, spare)),
            {
                "private, cache hitting (a batch)": sync(lambda: per_call_ns(uuid7_cached)),
                "public, same loop": sync(lambda: per_call_ns(uuid7)),
            },
        ),
        Case(
            "connection_cache",
            "Database.run keeping its connection",
            "pool.acquire() and release per run",
            lambda: per_run_ns(lambda: db.run(select_one, name="select_one")),
            lambda: per_run_ns(lambda: run_pooled(db, select_one)),
        ),
    ]


async def _rounds(cases: list[Case], rounds: int) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {c.name: {} for c in cases}
    for case in cases:  # one unrecorded round each: caches, the pool's connections, imports
        for measure in (case.a, case.b, *case.also.values()):
            await measure()
    gc.collect()
    gc.freeze()
    for r in range(rounds):
        for case in cases:
            order = [("a", case.a), ("b", case.b), *case.also.items()]
            if r % 2:
                order.reverse()
            for label, measure in order:
                figures[case.name].setdefault(label, []).append(await measure())
        if r % 10 == 9:
            log(f"micro-benchmarks: {r + 1} of {rounds} rounds")
    return figures


# --- uses per accept request ----------------------------------------------------------------


def counted_code() -> dict[types.CodeType, str]:
    """The functions whose calls stand for one use of each case."""
    return {
        current_request.__code__: "request_context",
        gateway.__code__: "app_context",
        quart_blueprints.__code__: "blueprints",
        Reply.__init__.__code__: "reply",
        uuid7.__code__: "uuid7",
    }


async def count_uses(database_url: str, schema: str, requests: int) -> dict[str, Any]:
    """Run a node in this process (its tables in `schema`) and count, per single-message
    accept, the calls of each case's function (and Database.run, from the node's own
    statement counts)."""
    admin_key = new_admin_key()
    options = NodeOptions(
        database_url=database_url,
        admin_key=admin_key,
        port=0,
        schema=schema,
        operators=(OperatorProfile(name="sim", latency_ms_median=2.0, latency_ms_p99=10.0),),
        engine=EngineConfig(),
        shutdown_grace=2.0,
    )
    counts: Counter[str] = Counter()
    targets = counted_code()
    rng = random.Random(7)

    def hook(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call":
            name = targets.get(frame.f_code)
            if name is not None:
                counts[name] += 1

    def body(n: int) -> dict[str, Any]:
        # As the load generator's: a UK mobile number, a short text, bulk, a client_ref.
        to = f"+4479{rng.randrange(100_000_000):08d}"
        return {"to": to, "text": "hello", "express": False, "client_ref": f"pa-{n}"}

    async with trio.open_nursery() as nursery:
        node = await nursery.start(partial(run_node, options))
        headers = {"Authorization": f"Bearer {admin_key}"}
        async with httpx.AsyncClient(base_url=node.url, timeout=30.0) as http:
            created = await http.post(
                "/v1/accounts", json={"name": "uses", "credit": CREDIT}, headers=headers
            )
            created.raise_for_status()
            key = {"Authorization": f"Bearer {created.json()['api_key']}"}
            statuses: Counter[int] = Counter()
            sent = iter(range(requests))

            async def client() -> None:
                for n in sent:
                    answer = await http.post(ACCEPT_ROUTE, json=body(n), headers=key)
                    statuses[answer.status_code] += 1

            # A first request per client not counted (the key's lookup, the connections).
            async with trio.open_nursery() as warm:
                for n in range(CONNECTIONS):
                    warm.start_soon(_one, http, body(-1 - n), key)
            db = node.store.db
            runs_before = sum(h.count for h in db.durations.values())
            sys.setprofile(hook)
            try:
                async with trio.open_nursery() as clients:
                    for _ in range(CONNECTIONS):
                        clients.start_soon(client)
            finally:
                sys.setprofile(None)
            runs = sum(h.count for h in db.durations.values()) - runs_before
        node.stop.set()
    answered = sum(statuses.values())
    if statuses.get(202, 0) != answered:
        raise RuntimeError(f"uses: not every accept was a 202: {dict(statuses)}")
    uses = {name: round(counts[name] / answered, 3) for name in targets.values()}
    return {
        "requests": answered,
        "uses_per_request": uses,
        "database_runs_per_request_in_process": round(runs / answered, 3),
    }


async def _one(http: httpx.AsyncClient, json: Any, headers: dict[str, str]) -> None:
    (await http.post(ACCEPT_ROUTE, json=json, headers=headers)).raise_for_status()


# --- CPU per accept request, under the load generator ---------------------------------------

_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} ([0-9.e+]+)$")


def scrape(url: str, admin_key: str) -> tuple[float, float]:
    """(POST /v1/messages answered, Database.run calls) from the node's /metrics."""
    answer = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {admin_key}"})
    answer.raise_for_status()
    requests = runs = 0.0
    for line in answer.text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        if name == "smsgw_store_statement_seconds_count":
            runs += float(value)
        elif (
            name == "smsgw_http_requests_total"
            and f'route="{ACCEPT_ROUTE}"' in labels
            and 'method="POST"' in labels
        ):
            requests += float(value)
    return requests, runs


def accept_phase(
    name: str, database_url: str, args: argparse.Namespace, work_dir: Path
) -> dict[str, Any]:
    """One accept phase; the node's log goes to `work_dir` (a temporary folder)."""
    schema = fresh_schema("bench_privapi")
    admin_key = new_admin_key()
    log(f"{name}: smsgw serve on schema {schema}, {ACCOUNTS} accounts")
    try:
        with run_gateway(
            database_url, schema, admin_key=admin_key, log_path=work_dir / f"{name}.log"
        ) as node:
            keys = create_accounts(node.url, admin_key, ACCOUNTS, credit=CREDIT, settings=SETTINGS)
            requests_before, runs_before = scrape(node.url, admin_key)
            meter = CpuMeter(node.process.pid)
            meter.start()
            load = run_loadgen(
                node.url,
                keys,
                connections=CONNECTIONS,
                duration=args.accept_duration,
                warmup=WARMUP_S,
            )
            cpu = meter.stop()
            requests_after, runs_after = scrape(node.url, admin_key)
    finally:
        drop_schema(database_url, schema)
    requests = requests_after - requests_before
    if cpu.server is None or requests <= 0:
        raise RuntimeError(f"{name}: no CPU figure or no requests answered")
    cpu_us = cpu.server / 100 * cpu.wall_s * 1e6 / requests
    phase = {
        "accepts_per_s": load.rate_per_s,
        "by_status": load.by_status,
        "requests": int(requests),
        "server_cpu_percent": cpu.server,
        "machine_cpu_percent": cpu.machine,
        "server_cpu_us_per_request": round(cpu_us, 1),
        "database_runs_per_request": round((runs_after - runs_before) / requests, 4),
    }
    log(f"{name}: {phase}")
    return phase


# --- report ---------------------------------------------------------------------------------


def summarize(
    micro: dict[str, dict[str, list[float]]],
    uses: dict[str, Any],
    phases: list[dict[str, Any]],
    args: argparse.Namespace,
    source: str,
) -> dict[str, Any]:
    cpu_us = statistics.median(p["server_cpu_us_per_request"] for p in phases)
    db_runs = statistics.median(p["database_runs_per_request"] for p in phases)
    per_request = {**uses["uses_per_request"], "connection_cache": db_runs}
    cases: dict[str, Any] = {}
    for name, figures in micro.items():
        medians_us = {label: statistics.median(v) / 1000 for label, v in figures.items()}
        saved_us = medians_us["b"] - medians_us["a"]
        # The most favourable reading for the private way: uuid7's cache hitting every call.
        best_us = saved_us
        if name == "uuid7":
            hit = medians_us["private, cache hitting (a batch)"]
            best_us = max(saved_us, medians_us["public, same loop"] - hit)
        n = per_request[name]
        share = best_us * n / cpu_us
        cases[name] = {
            "a_us_per_use": round(medians_us["a"], 4),
            "b_us_per_use": round(medians_us["b"], 4),
            "others_us_per_use": {
                k: round(v, 4) for k, v in medians_us.items() if k not in ("a", "b")
            },
            "saved_us_per_use": round(saved_us, 4),
            "saved_us_per_use_best": round(best_us, 4),
            "uses_per_request": n,
            "saved_us_per_request": round(best_us * n, 3),
            "share_of_accept_cpu": round(share, 5),
            "keep": share >= KEEP_SHARE,
            "in_code": IN_CODE[name],
            "rounds_ns": {k: [round(x, 1) for x in v] for k, v in figures.items()},
        }
    return {
        "benchmark": "private_apis",
        "commit": git_commit(),
        "dirty": git_dirty(),
        "timestamp": utc_timestamp(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "database": source,
        "rounds": args.rounds,
        "keep_share": KEEP_SHARE,
        "accept_cpu_us_per_request": round(cpu_us, 1),
        "accept_phases": phases,
        "uses": uses,
        "cases": cases,
        "code_agrees": all(c["keep"] == (c["in_code"] == "private") for c in cases.values()),
    }


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for name, case in result["cases"].items():
        saved = f"{case['saved_us_per_use']:.3f}"
        if case["saved_us_per_use_best"] != case["saved_us_per_use"]:
            saved += f" ({case['saved_us_per_use_best']:.3f} hitting)"
        rows.append(
            [
                name,
                f"{case['a_us_per_use']:.3f}",
                f"{case['b_us_per_use']:.3f}",
                saved,
                case["uses_per_request"],
                f"{case['saved_us_per_request']:.2f}",
                f"{100 * case['share_of_accept_cpu']:.2f}%",
                "keep" if case["keep"] else "remove",
                case["in_code"],
            ]
        )
    header = ["private API", "private µs/use", "public µs/use", "saved µs/use"]
    header += ["uses/request", "saved µs/request", "share of accept CPU", "decision", "the code"]
    others = [
        [name, label, f"{us:.3f}"]
        for name, case in result["cases"].items()
        for label, us in case["others_us_per_use"].items()
    ]
    phases = [
        [
            i + 1,
            p["accepts_per_s"],
            p["requests"],
            p["server_cpu_us_per_request"],
            p["database_runs_per_request"],
            f"{p['server_cpu_percent']} / {p['machine_cpu_percent']}",
        ]
        for i, p in enumerate(result["accept_phases"])
    ]
    dirty = " (working tree modified)" if result["dirty"] else ""
    uses = result["uses"]
    return (
        "# Private APIs against their public alternatives\n\n"
        f"Commit {result['commit']}{dirty}, {result['timestamp']}, {result['cpu_count']} CPUs,"
        f" Python {result['python']}, PostgreSQL: {result['database']}. Private (A) and public"
        f" (B) alternate in one process over {result['rounds']} rounds; each µs figure is this"
        " process's CPU time per use, median of the rounds. Uses per request: counted in a node"
        f" in this process over {uses['requests']} single-message accepts (Database.run: from"
        " the accept phases' /metrics). A private API is kept when it saves at least"
        f" {100 * result['keep_share']:g}% of an accept request's CPU"
        f" ({result['accept_cpu_us_per_request']} µs: `smsgw serve`'s CPU over the requests"
        " it answered, median of the accept phases).\n\n"
        + markdown_table(header, rows)
        + "\nOther variants (µs/use):\n\n"
        + markdown_table(["case", "variant", "µs/use"], others)
        + f"\nDatabase.run per request in the in-process node (64 clients, lighter load):"
        f" {uses['database_runs_per_request_in_process']}.\n\n"
        "Accept phases (one node, 100 accounts, 64 connections):\n\n"
        + markdown_table(
            [
                "phase",
                "accepts/s",
                "requests",
                "server CPU µs/request",
                "Database.run/request",
                "CPU % server / machine",
            ],
            phases,
        )
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41, help="A/B rounds of each case")
    parser.add_argument("--accept-rounds", type=int, default=3, help="accept phases")
    parser.add_argument(
        "--accept-duration", type=float, default=8.0, help="measured seconds per accept phase"
    )
    parser.add_argument(
        "--count-requests", type=int, default=2_000, help="accepts the uses are counted over"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports/latest"))
    args = parser.parse_args(argv)
    if min(args.rounds, args.accept_rounds, args.count_requests) < 1 or args.accept_duration <= 0:
        parser.error("--rounds, --accept-rounds and --count-requests must be >= 1")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with (
        tempfile.TemporaryDirectory(prefix="smsgw-bench-privapi-") as tmp,
        database(Path(tmp)) as (database_url, source),
    ):
        # As `serve` runs: start-up's objects frozen, the collector's thresholds raised.
        gc.set_threshold(*GC_THRESHOLDS)
        log("counting uses per accept request")
        schema = fresh_schema("bench_privapi")
        try:
            uses = trio.run(count_uses, database_url, schema, args.count_requests)
        finally:
            drop_schema(database_url, schema)
        log(f"uses: {uses}")
        schema = fresh_schema("bench_privapi")
        try:
            micro = trio.run(micro_benchmarks, database_url, schema, args.rounds)
        finally:
            drop_schema(database_url, schema)
        phases = [
            accept_phase(f"accept#{r}", database_url, args, Path(tmp))
            for r in range(1, args.accept_rounds + 1)
        ]
    result = summarize(micro, uses, phases, args, source)
    path = write_report(args.out, "private_apis", result, markdown(result))
    log(f"report: {path} and {path.with_suffix('.md')}")
    print(msgspec.json.encode(result).decode(), flush=True)
    if not result["code_agrees"]:
        log("the code takes another way than a decision says: see the table's last columns")
    return 0 if result["code_agrees"] else 1


if __name__ == "__main__":
    sys.exit(main())
