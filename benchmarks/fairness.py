"""Fairness: light accounts' wait while one account floods, under deficit round robin, a
plain FIFO queue, and no flood; and Jain's index of throughput across backlogged accounts.

Two runs:

- **virtual** (seeded, no clock): the pure SchedulerState at an operator capacity of
  `--capacity` messages a second. One account pushes `--flood` messages at t = 0; `--light`
  accounts send one message a second each (random phases) for `--seconds`. Dispatch pops one
  message every 1/capacity s. A light message's wait is dispatch time minus arrival; the
  operator's latency (`--operator-ms`) is added for accept-to-operator. Runs until every light
  message is dispatched (under FIFO that is after the whole flood).
- **wall** (`--wall`, a real `smsgw serve` on 127.0.0.1 with the simulated operator): the same
  shape, smaller (the machine is shared): one account posts `--wall-flood` messages in
  batches, then `--wall-light` accounts send one message a second each for
  `--wall-seconds`, from a separate process. Operators are at capacity: a window of
  `--wall-window` at `--wall-operator-ms` per batch. Waits are read from PostgreSQL
  (`updated_at - created_at` of the light accounts' sent messages: accept to the operator's
  answer). Phases: this scheduler, `serve --scheduler-fifo`, and no flood; drr and no_flood
  run `--wall-rounds` times each, alternating, and their figures are the medians (fifo runs
  once), the ratio the median of each round's drr p99 over its neighbouring no_flood p99.

Jain's index: `--jain-accounts` accounts, each with a deep backlog of messages of one size (1
to 10 segments, seeded), served by the pure scheduler for `--jain-pops` messages while all
stay backlogged; throughput is segments served per account. 1.0 is perfectly even.

Prints one JSON object; writes benchmarks/reports/latest/fairness.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from smsgw.engine.mailboxes import FifoState, SchedulerState
from smsgw.engine.messages import OutboundSms

T0 = 1_700_000_000.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sms(n: int, account_id: int, at: float, segments: int = 1) -> OutboundSms:
    return OutboundSms(
        id=f"{n:08x}-0000-7000-8000-000000000000",
        account_id=account_id,
        to="+4915100000000",
        sender="bench",
        text="x",
        segments=segments,
        price=5,
        express=False,
        created_at=T0 + at,
    )


# --- virtual time ------------------------------------------------------------------------------


def virtual_run(
    *, policy: str, flood: int, light: int, seconds: int, capacity: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    state = FifoState() if policy == "fifo" else SchedulerState(quantum=10)
    n = 0
    for _ in range(flood):
        state.push(sms(n, 0, 0.0))
        n += 1
    arrivals: list[tuple[float, int]] = []
    for account in range(1, light + 1):
        phase = rng.random()
        arrivals += [(phase + k, account) for k in range(seconds)]
    arrivals.sort()
    arrived_at: dict[str, float] = {}
    waits: list[float] = []
    i = 0
    slot = 0
    started = time.perf_counter()
    while len(waits) < len(arrivals):
        now = slot / capacity
        while i < len(arrivals) and arrivals[i][0] <= now:
            at, account = arrivals[i]
            message = sms(n, account, at)
            arrived_at[message.id] = at
            state.push(message)
            n += 1
            i += 1
        entry = state.pop_bulk(now)
        if entry is not None and entry[1] in arrived_at:
            waits.append(now - arrived_at.pop(entry[1]))
        slot += 1
    return {
        "policy": policy,
        "flood": flood,
        "light_messages": len(waits),
        "wait_p50_ms": round(1000 * percentile(waits, 0.50), 3),
        "wait_p99_ms": round(1000 * percentile(waits, 0.99), 3),
        "wait_max_ms": round(1000 * max(waits), 3),
        "wait_mean_ms": round(1000 * statistics.fmean(waits), 3),
        "virtual_seconds": round(slot / capacity, 3),
        "cpu_seconds": round(time.perf_counter() - started, 2),
    }


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def jain_run(*, accounts: int, pops: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    sizes = {a: rng.randint(1, 10) for a in range(accounts)}
    per_account = pops  # deep enough that nobody runs dry
    state = SchedulerState(quantum=10)
    n = 0
    # Arrivals interleaved, as many accounts' traffic would be.
    for k in range(per_account):
        for a in range(accounts):
            state.push(sms(n, a, k * 1e-6, sizes[a]))
            n += 1
    owner = {f"{m:08x}-0000-7000-8000-000000000000": m % accounts for m in range(n)}
    served = dict.fromkeys(range(accounts), 0)
    for _ in range(pops):
        entry = state.pop_bulk(0.0)
        assert entry is not None
        served[owner[entry[1]]] += entry[2]
    segments = [float(v) for v in served.values()]
    by_messages = [served[a] / sizes[a] for a in range(accounts)]
    return {
        "accounts": accounts,
        "pops": pops,
        "jain_segments": round(jain(segments), 5),
        "jain_messages": round(jain(by_messages), 5),
        "segments_min": min(segments),
        "segments_max": max(segments),
    }


# --- wall clock --------------------------------------------------------------------------------

LIGHT_CLIENT = r"""
import random, sys, time, httpx, trio
url, keys, seconds = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
accepted = [0]

async def account(client, key, phase, rng):
    await trio.sleep(phase)
    start = trio.current_time()
    k = 0
    while trio.current_time() - start < seconds:
        body = {"to": f"+4479{rng.randrange(10**8):08d}", "text": "light"}
        r = await client.post("/v1/messages", json=body,
                              headers={"Authorization": f"Bearer {key}"})
        if r.status_code == 202:
            accepted[0] += 1
        else:
            print(r.status_code, r.text[:200], file=sys.stderr)
        k += 1
        await trio.sleep_until(start + k)

async def main():
    rng = random.Random(1)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(account, client, key, rng.random(), random.Random(key))
    print(accepted[0])

trio.run(main)
"""


def flood(url: str, key: str, count: int) -> float:
    """Post `count` messages from one account in batches of 1,000; returns the seconds."""
    started = time.monotonic()
    rng = random.Random(7)
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        for start in range(0, count, 1_000):
            items = [
                {"to": f"+4479{rng.randrange(10**8):08d}", "text": "flood"}
                for _ in range(min(1_000, count - start))
            ]
            while True:
                r = c.post("/v1/messages/batch", json={"messages": items})
                if r.status_code == 202:
                    break
                time.sleep(0.2)  # 503: the writer is full; come back
    return time.monotonic() - started


def light_rows(url: str, schema: str, sql: str, light_ids: list[int]) -> list[asyncpg.Record]:
    """`sql` (with $1, the light accounts' ids) on the phase's schema."""

    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"SET search_path TO {schema}")
            return await conn.fetch(sql, light_ids)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def light_waits(url: str, schema: str, light_ids: list[int]) -> list[float]:
    sql = (
        "SELECT extract(epoch FROM updated_at - created_at)::float8 AS w FROM messages"
        " WHERE account_id = ANY($1::bigint[]) AND status = 'sent'"
    )
    return [r["w"] for r in light_rows(url, schema, sql, light_ids)]


def light_statuses(url: str, schema: str, light_ids: list[int]) -> dict[str, int]:
    sql = (
        "SELECT status, count(*) AS n FROM messages"
        " WHERE account_id = ANY($1::bigint[]) GROUP BY status"
    )
    return {r["status"]: r["n"] for r in light_rows(url, schema, sql, light_ids)}


def wall_phase(args: argparse.Namespace, url: str, name: str, flood_count: int) -> dict[str, Any]:
    schema = common.fresh_schema("fair")
    admin_key = common.new_admin_key()
    env = common.gateway_env(url, schema, admin_key)
    command = [
        *common.gateway_command(),
        "--window",
        str(args.wall_window),
        "--operator-latency-ms",
        f"{args.wall_operator_ms},{args.wall_operator_ms}",
        "--recipient-limit-per-hour",
        "1000000",
        "--operator-errors",
        "0,0",
    ]
    if name == "fifo":
        command.append("--scheduler-fifo")
    log_path = Path(tempfile.gettempdir()) / f"smsgw-fairness-{name}.log"
    try:
        with common.run_server(command, log_path=log_path, env=env) as server:
            headers = {"Authorization": f"Bearer {admin_key}"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
                accounts = [
                    c.post("/v1/accounts", json={"name": f"l{i}", "credit": 10**9}).json()
                    for i in range(args.wall_light + 1)
                ]
            heavy, light = accounts[0], accounts[1:]
            flood_s = flood(server.url, heavy["api_key"], flood_count) if flood_count else 0.0
            common.log(f"{name}: flood of {flood_count} accepted in {flood_s:.1f} s")
            client = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    LIGHT_CLIENT,
                    server.url,
                    ",".join(a["api_key"] for a in light),
                    str(args.wall_seconds),
                ],
                timeout=args.wall_seconds + 60,
                capture_output=True,
                text=True,
            )
            if client.returncode:
                raise RuntimeError(client.stderr[-2000:])
            # Let the light messages finish (under FIFO: behind the flood), bounded.
            deadline = time.monotonic() + args.wall_drain_s
            expected = int(client.stdout.strip() or 0)
            while time.monotonic() < deadline:
                waits = light_waits(url, schema, [a["id"] for a in light])
                if len(waits) >= expected:
                    break
                time.sleep(1.0)
            waits = light_waits(url, schema, [a["id"] for a in light])
            statuses = light_statuses(url, schema, [a["id"] for a in light])
    finally:
        common.drop_schema(url, schema)
    return {
        "phase": name,
        "flood": flood_count,
        "flood_accept_seconds": round(flood_s, 2),
        "light_sent": len(waits),
        "light_accepted": expected,
        "light_statuses": statuses,  # every light message by status: all `sent` in the end
        "wait_p50_ms": round(1000 * percentile(waits, 0.50), 1),
        "wait_p99_ms": round(1000 * percentile(waits, 0.99), 1),
        "operator_ms": args.wall_operator_ms,
        "stderr_of_light_client": client.stderr[-500:],
    }


def summarize_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A phase's rounds: its figures are the medians over them, each round kept as well."""
    first = runs[0]
    return {
        **first,
        "wait_p50_ms": statistics.median(r["wait_p50_ms"] for r in runs),
        "wait_p99_ms": statistics.median(r["wait_p99_ms"] for r in runs),
        "light_sent": sum(r["light_sent"] for r in runs),
        "light_accepted": sum(r["light_accepted"] for r in runs),
        "stderr_of_light_client": "".join(r["stderr_of_light_client"] for r in runs)[-500:],
        "rounds": [
            {k: r[k] for k in ("wait_p50_ms", "wait_p99_ms", "light_sent", "flood_accept_seconds")}
            for r in runs
        ],
    }


def main() -> None:
    common.exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=1_000_000)
    parser.add_argument("--light", type=int, default=1_000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--capacity", type=float, default=2_000.0)
    parser.add_argument("--operator-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jain-accounts", type=int, default=100)
    parser.add_argument("--jain-pops", type=int, default=50_000)
    parser.add_argument("--wall", action="store_true", help="also run against a real server")
    parser.add_argument("--wall-flood", type=int, default=100_000)
    parser.add_argument("--wall-light", type=int, default=200)
    parser.add_argument("--wall-seconds", type=int, default=20)
    parser.add_argument("--wall-window", type=int, default=100)
    parser.add_argument("--wall-operator-ms", type=float, default=50.0)
    parser.add_argument("--wall-drain-s", type=float, default=120.0)
    parser.add_argument(
        "--wall-phases",
        default="drr,fifo,no_flood",
        help="comma-separated subset of drr,fifo,no_flood (the ratio needs drr and no_flood)",
    )
    parser.add_argument(
        "--wall-rounds",
        type=int,
        default=3,
        help="drr and no_flood runs each (figures: medians; the ratio: the median of each"
        " round's drr p99 over its no_flood p99); this host's speed drifts between runs",
    )
    parser.add_argument("--out", type=Path, default=common.BENCHMARKS_DIR / "reports" / "latest")
    args = parser.parse_args()
    if not 1 <= args.wall_rounds <= 9:
        parser.error("--wall-rounds: 1 to 9")

    virtual = {}
    for name, policy, count in (
        ("drr", "drr", args.flood),
        ("fifo", "fifo", args.flood),
        ("no_flood", "drr", 0),
    ):
        common.log(f"virtual: {name}")
        run = virtual_run(
            policy=policy,
            flood=count,
            light=args.light,
            seconds=args.seconds,
            capacity=args.capacity,
            seed=args.seed,
        )
        run["accept_to_operator_p50_ms"] = round(run["wait_p50_ms"] + args.operator_ms, 3)
        run["accept_to_operator_p99_ms"] = round(run["wait_p99_ms"] + args.operator_ms, 3)
        virtual[name] = run
    jain_result = jain_run(accounts=args.jain_accounts, pops=args.jain_pops, seed=args.seed)
    base = virtual["no_flood"]["accept_to_operator_p99_ms"]
    result: dict[str, Any] = {
        "benchmark": "fairness",
        "commit": common.git_commit(),
        "dirty": common.git_dirty(),
        "at": common.utc_timestamp(),
        "cores": os.cpu_count(),
        "virtual": virtual,
        "virtual_p99_ratio_drr_to_no_flood": round(
            virtual["drr"]["accept_to_operator_p99_ms"] / base, 3
        ),
        "virtual_p99_ratio_fifo_to_no_flood": round(
            virtual["fifo"]["accept_to_operator_p99_ms"] / base, 3
        ),
        "jain": jain_result,
    }
    if args.wall:
        with (
            tempfile.TemporaryDirectory(prefix="smsgw-fairness-") as work,
            common.database(Path(work)) as (url, source),
        ):
            phases = args.wall_phases.split(",")
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in phases}
            for r in range(args.wall_rounds):
                # fifo once (it is slow and only has to grow); drr and no_flood every round,
                # in alternating order, so that a drift of the host's speed favours neither.
                order = [n for n in ("drr", "fifo", "no_flood") if n in phases]
                order = order if r % 2 == 0 else order[::-1]
                for name in order:
                    if name == "fifo" and rounds["fifo"]:
                        continue
                    common.log(f"wall: {name}, round {r + 1} of {args.wall_rounds}")
                    count = 0 if name == "no_flood" else args.wall_flood
                    rounds[name].append(wall_phase(args, url, name, count))
            result["wall"] = {name: summarize_rounds(runs) for name, runs in rounds.items()}
            result["wall_database"] = source
            if "drr" in rounds and "no_flood" in rounds:
                # Each round's drr against the no_flood run next to it, then the median.
                paired = [
                    round(d["wait_p99_ms"] / n["wait_p99_ms"], 3)
                    for d, n in zip(rounds["drr"], rounds["no_flood"], strict=True)
                ]
                result["wall_p99_ratios_by_round"] = paired
                result["wall_p99_ratio_drr_to_no_flood"] = statistics.median(paired)
    print(json.dumps(result, indent=2))
    rows = [
        [name, r["flood"], r["wait_p50_ms"], r["wait_p99_ms"], r.get("accept_to_operator_p99_ms")]
        for name, r in virtual.items()
    ]
    markdown = "# Fairness\n\nVirtual time (queue wait, ms):\n\n" + common.markdown_table(
        ["policy", "flood", "p50", "p99", "accept→operator p99"], rows
    )
    markdown += f"\nJain's index (segments): {jain_result['jain_segments']}\n"
    if "wall" in result:
        markdown += "\nWall clock (accept → operator answer, ms):\n\n" + common.markdown_table(
            ["phase", "flood", "p50", "p99", "sent"],
            [
                [n, r["flood"], r["wait_p50_ms"], r["wait_p99_ms"], r["light_sent"]]
                for n, r in result["wall"].items()
            ],
        )
    common.write_report(args.out, "fairness", result, markdown)


if __name__ == "__main__":
    main()
