"""What a fixed piece of CPU work costs on this machine when it follows an idle gap.

    python benchmarks/reports/2026-12-08-2cores/wake_penalty.py [--reps 400] [--rounds 2]

One process computes the same chunk (a loop of 3,000 integer steps, about 150 µs) `--reps`
times: back to back, after `time.sleep(0)` (the system call without the idle: the control), and
after sleeps of 1, 5 and 20 ms (the CPU goes idle between chunks, as a node's does between
requests at a low rate). Prints the CPU time (user + system) per chunk for each, as JSON. A
node at half the rate meets more such gaps per message: this is the per-message cost that grows
as the load falls (README.md here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def chunk(steps: int = 3_000) -> int:
    total = 0
    for i in range(steps):
        total += i * i % 7
    return total


def cpu_per_chunk_us(gap: float | None, reps: int) -> float:
    started = time.process_time()
    for _ in range(reps):
        chunk()
        if gap is not None:
            time.sleep(gap)
    return (time.process_time() - started) / reps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    gaps: dict[str, float | None] = {
        "back_to_back": None,
        "sleep_0": 0.0,
        "idle_1ms": 0.001,
        "idle_5ms": 0.005,
        "idle_20ms": 0.02,
    }
    samples: dict[str, list[float]] = {name: [] for name in gaps}
    for _ in range(args.rounds):
        for name, gap in gaps.items():
            samples[name].append(cpu_per_chunk_us(gap, args.reps))
    medians = {name: round(statistics.median(v), 1) for name, v in samples.items()}
    base = medians["back_to_back"]
    print(
        json.dumps(
            {
                "cpu_count": os.cpu_count(),
                "cpu_us_per_chunk": medians,
                "vs_back_to_back": {k: round(v / base, 2) for k, v in medians.items()},
                "samples": {k: [round(x, 1) for x in v] for k, v in samples.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
