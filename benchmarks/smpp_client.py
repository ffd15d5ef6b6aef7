"""The SMPP client's own cost: messages per second and CPU per message of one SmppOperator.

    python benchmarks/smpp_client.py [CALLERS=8] [SIZE=25] [--seconds 8] [--warmup 1]
                                     [--binds 4] [--window 50] [--tps 4000]
                                     [--receipt-delay-ms 50] [--sink-ms 50]
                                     [--smsc-port PORT] [--out benchmarks/reports/latest]

The simulated SMSC (`python -m smsgw.sim.smsc`, its default refusal rates, receipts on) runs
in a process of its own on 127.0.0.1; this process runs the operator alone, without the
engine or a database: CALLERS tasks each call `send_batch` with SIZE one-part messages again
and again, and a receipt sink takes `--sink-ms` per call (a stand-in for the commit that
records the receipts). After `--warmup` seconds, `--seconds` are measured: the calls that
ended, their latency, the receipts taken, and this process's CPU seconds (user + system)
per message, which is what the gateway's node spends on its SMPP path, and the simulated SMSC's
CPU seconds per message (on the gateway's machine, each is taken from the other).
`--smsc-port` drives an SMSC already listening there instead (one started under py-spy, say);
its CPU is read only when this user may read its process.

Prints one JSON object and writes smpp_client.json and smpp_client.md into the out folder.
Profile it with `py-spy record -r 200 -f raw -o out.raw -- python benchmarks/smpp_client.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from common import (
    LOOPBACK,
    exit_on_sigterm,
    git_commit,
    git_dirty,
    log,
    markdown_table,
    stop_process,
    utc_timestamp,
    write_report,
)
from smsgw.connectors.operators.smpp.client import SmppOperator
from smsgw.connectors.operators.smpp.config import parse_smpp_url
from smsgw.engine.messages import DeliveryReport, OutboundSms

TARGET_PER_S = 12_000  # issue 22, for the whole node on 2 cores


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def _start_smsc(args: argparse.Namespace) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, "-m", "smsgw.sim.smsc", "--host", LOOPBACK, "--port", "0"]
    command += ["--window", str(args.window), "--receipt-delay-ms", str(args.receipt_delay_ms)]
    smsc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ
    )
    assert smsc.stdout is not None
    line = smsc.stdout.readline()
    found = re.search(r":(\d+)\"", line)
    if found is None:
        stop_process(smsc, grace=2)
        raise SystemExit(f"the simulated SMSC did not start: {line!r}")
    return smsc, int(found.group(1))


def _listener_pid(port: int) -> int | None:
    """The process listening on `port` on loopback, if this user may see it."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def _process_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _measure(args: argparse.Namespace, port: int, smsc_pid: int | None) -> dict[str, Any]:
    url = f"smpp://bench:bench@{LOOPBACK}:{port}?binds={args.binds}&window={args.window}"
    config = parse_smpp_url(f"{url}&tps={args.tps}")
    receipts = 0
    measuring = False

    async def sink(name: str, reports: list[DeliveryReport]) -> None:
        nonlocal receipts
        if measuring:
            receipts += len(reports)
        await trio.sleep(args.sink_ms / 1000)

    operator = SmppOperator(config, name="bench", on_receipts=sink)
    kinds: dict[str, int] = {}
    latencies: list[float] = []

    def sms(i: int) -> OutboundSms:
        return OutboundSms(
            id=f"m{i}",
            account_id=1,
            to=f"+4479{i % 10**8:08d}",
            sender="smsgw",
            text="hello there",
            segments=1,
            price=5,
            express=False,
            created_at=0.0,
        )

    async def caller(k: int, end: float) -> None:
        i = k * 10**7
        while trio.current_time() < end:
            started = trio.current_time()
            results = await operator.send_batch([sms(i + j) for j in range(args.size)])
            i += args.size
            if measuring:
                latencies.append(trio.current_time() - started)
                for result in results:
                    kinds[result.kind] = kinds.get(result.kind, 0) + 1

    async with trio.open_nursery() as nursery:
        await nursery.start(operator.run)
        with trio.fail_after(10):
            await operator.wait_bound(args.binds)
        end = trio.current_time() + args.warmup + args.seconds
        async with trio.open_nursery() as callers:
            for k in range(args.callers):
                callers.start_soon(caller, k, end)
            await trio.sleep(args.warmup)
            measuring = True
            wall, cpu, smsc_cpu = time.monotonic(), _cpu_s(), _process_cpu_s(smsc_pid)
            await trio.sleep(args.seconds)
            measuring = False
            wall, cpu = time.monotonic() - wall, _cpu_s() - cpu
            smsc_cpu = _process_cpu_s(smsc_pid) - smsc_cpu
        stats = operator.stats()
        await operator.aclose()
    messages = sum(kinds.values())
    latencies.sort()
    p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
    return {
        "messages_per_s": round(messages / wall),
        "cpu_us_per_message": round(1e6 * cpu / messages, 1) if messages else None,
        "cpu_percent_of_core": round(100 * cpu / wall, 1),
        # The simulated SMSC near 100 means it, not the client, sets messages_per_s.
        "smsc_cpu_percent_of_core": round(100 * smsc_cpu / wall, 1) if smsc_pid else None,
        "smsc_cpu_us_per_message": (
            round(1e6 * smsc_cpu / messages, 1) if messages and smsc_pid else None
        ),
        "receipts_per_s": round(receipts / wall),
        "call_p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
        "call_p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
        "calls": len(latencies),
        "results": kinds,
        "wall_s": round(wall, 3),
        "operator": stats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("callers", type=int, nargs="?", default=8)
    parser.add_argument("size", type=int, nargs="?", default=25)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--binds", type=int, default=4)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--tps", type=float, default=4000)
    parser.add_argument("--receipt-delay-ms", type=float, default=50)
    parser.add_argument("--sink-ms", type=float, default=50)
    parser.add_argument("--smsc-port", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    exit_on_sigterm()
    if args.smsc_port is not None:
        measured = trio.run(_measure, args, args.smsc_port, _listener_pid(args.smsc_port))
    else:
        smsc, port = _start_smsc(args)
        try:
            measured = trio.run(_measure, args, port, smsc.pid)
        finally:
            stop_process(smsc, grace=5)
    result = {
        "benchmark": "smpp_client",
        "commit": git_commit(),
        "dirty": git_dirty(),
        "at": utc_timestamp(),
        "cpu_count": os.cpu_count(),
        "callers": args.callers,
        "size": args.size,
        "binds": args.binds,
        "window": args.window,
        "tps": args.tps,
        "receipt_delay_ms": args.receipt_delay_ms,
        "sink_ms": args.sink_ms,
        "target_per_s": TARGET_PER_S,
        **measured,
    }
    print(json.dumps(result))
    if args.out is not None:
        rows = [
            ["messages/s", measured["messages_per_s"]],
            ["CPU µs per message", measured["cpu_us_per_message"]],
            ["CPU, % of a core", measured["cpu_percent_of_core"]],
            ["simulated SMSC's CPU, % of a core", measured["smsc_cpu_percent_of_core"]],
            ["simulated SMSC's CPU µs per message", measured["smsc_cpu_us_per_message"]],
            ["receipts/s", measured["receipts_per_s"]],
            ["call p50 / p99 ms", f"{measured['call_p50_ms']} / {measured['call_p99_ms']}"],
        ]
        heading = (
            f"# SMPP client, {args.callers} callers x {args.size} messages, "
            f"{args.binds} binds x window {args.window}\n\n"
            f"commit {result['commit']}{' (dirty)' if result['dirty'] else ''}, {result['at']}, "
            f"{result['cpu_count']} CPUs\n\n"
        )
        path = write_report(
            args.out, "smpp_client", result, heading + markdown_table(["", ""], rows)
        )
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
