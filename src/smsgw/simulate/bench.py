"""`smsgw bench`: run the scripts in benchmarks/ and the simulator, and collect one report.

Each benchmark script prints one JSON object and writes NAME.json and NAME.md into the report
folder; simulator runs write a folder of their own (report.json, report.md, PNGs). This
collects them into summary.json and summary.md in the same folder. `quick` is CI's set (about
six minutes on two cores); `full` runs every benchmark at its default size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

REPO_ROOT = Path(__file__).resolve().parents[3]
BENCHMARKS = REPO_ROOT / "benchmarks"
DEFAULT_OUT = BENCHMARKS / "reports" / "latest"


class Job(msgspec.Struct, frozen=True):
    """One benchmark run: `argv` after the interpreter; `report` is the JSON it writes,
    relative to the out folder; `timeout_s` bounds it."""

    name: str
    argv: tuple[str, ...]
    report: str
    timeout_s: float


def _script(name: str, *args: str) -> tuple[str, ...]:
    return (str(BENCHMARKS / f"{name}.py"), *args)


def _simulate(name: str, *args: str) -> tuple[str, ...]:
    return ("-m", "smsgw.cli", "simulate", name, "--no-progress", *args)


def jobs(kind: str, out: Path) -> list[Job]:
    o = str(out)
    if kind == "quick":
        return [
            Job("simulate day (virtual, 1%)",
                _simulate("day", "--scale", "0.01", "--out", f"{o}/simulate-day"),
                "simulate-day/report.json", 180),
            Job("simulate production-test (wall, 20%)",
                _simulate("production-test", "--scale", "0.2", "--out",
                          f"{o}/simulate-production-test"),
                "simulate-production-test/report.json", 180),
            Job("accept", _script("accept", "--duration", "5", "--rounds", "1", "--out", o),
                "accept.json", 150),
            Job("throughput", _script("throughput", "--quick", "--phases",
                                      "copy,batch_accepts,sustained", "--out", o),
                "throughput.json", 240),
            Job("chaos (3 cycles)", _script("chaos", "--cycles", "3", "--out", o),
                "chaos.json", 300),
        ]  # fmt: skip
    if kind == "full":
        return [
            Job("simulate day (virtual, full)", _simulate("day", "--out", f"{o}/simulate-day"),
                "simulate-day/report.json", 3600),
            Job("simulate whale", _simulate("whale", "--out", f"{o}/simulate-whale"),
                "simulate-whale/report.json", 1800),
            Job("simulate outage", _simulate("outage", "--out", f"{o}/simulate-outage"),
                "simulate-outage/report.json", 1800),
            Job("simulate production-test",
                _simulate("production-test", "--out", f"{o}/simulate-production-test"),
                "simulate-production-test/report.json", 900),
            Job("accept", _script("accept", "--out", o), "accept.json", 900),
            Job("throughput", _script("throughput", "--out", o), "throughput.json", 1800),
            Job("reports", _script("reports", "--out", o), "reports.json", 3600),
            Job("chaos", _script("chaos", "--cycles", "50", "--out", o), "chaos.json", 2400),
            Job("overload", _script("overload", "--out", o), "overload.json", 900),
            Job("scheduled", _script("scheduled", "--out", o), "scheduled.json", 900),
        ]  # fmt: skip
    raise ValueError(f"unknown benchmark set {kind!r}: quick or full")


class Outcome(msgspec.Struct):
    name: str
    exit_code: int | None  # None: timed out
    wall_s: float
    report: str | None  # the JSON file, relative to the out folder, when it was written
    passed: bool | None = None  # a simulator run's verdict


def run(kind: str, out: Path = DEFAULT_OUT, *, only: list[str] | None = None) -> int:
    """Run the set, write summary.json and summary.md, print the Markdown; 1 when a job
    failed (exit code, timeout, or a simulator run that did not pass), else 0."""
    out.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    for job in jobs(kind, out):
        if only and not any(word in job.name for word in only):
            continue
        print(f"== bench: {job.name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        code: int | None
        try:
            done = subprocess.run(
                [sys.executable, *job.argv],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                timeout=job.timeout_s,
            )
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = None
        path = out / job.report
        outcome = Outcome(
            job.name,
            code,
            round(time.monotonic() - started, 1),
            job.report if path.exists() and path.stat().st_mtime >= time.time() - 7200 else None,
        )
        if outcome.report is not None and job.report.startswith("simulate-"):
            outcome.passed = bool(json.loads(path.read_text()).get("passed"))
        outcomes.append(outcome)
    markdown = summarize(outcomes, out, kind)
    print(markdown)
    failed = [o for o in outcomes if o.exit_code != 0 or o.passed is False]
    return 1 if failed else 0


def summarize(outcomes: list[Outcome], out: Path, kind: str) -> str:
    """summary.json (every job's JSON, by name) and summary.md (a table, then each job's
    Markdown) in `out`; returns the Markdown."""
    collected: dict[str, Any] = {}
    for o in outcomes:
        if o.report is not None:
            collected[o.name] = json.loads((out / o.report).read_text())
    summary = {
        "set": kind,
        "cpu_count": os.cpu_count(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "jobs": msgspec.to_builtins(outcomes),
        "reports": collected,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# smsgw bench ({kind}), {os.cpu_count()} cores, {summary['finished_at']}",
        "",
        "| job | result | wall | report |",
        "| --- | --- | --- | --- |",
    ]
    for o in outcomes:
        if o.exit_code is None:
            result = "timed out"
        elif o.passed is not None:
            result = "PASS" if o.passed else "FAIL"
        else:
            result = "ok" if o.exit_code == 0 else f"exit {o.exit_code}"
        lines.append(f"| {o.name} | {result} | {o.wall_s:.0f} s | {o.report or '-'} |")
    for o in outcomes:
        if o.report is None:
            continue
        md = out / o.report.replace(".json", ".md")
        if md.exists():
            text = md.read_text()
            # Nested reports' headings go one level down; image links stay relative to them.
            folder = Path(o.report).parent
            if str(folder) != ".":
                text = text.replace("](", f"]({folder}/").replace(f"]({folder}/http", "](http")
            lines += ["", "---", "", text.replace("\n# ", "\n## ").replace("# ", "## ", 1)]
    markdown = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(markdown)
    return markdown
