"""Simulation reports: the figures of a run, judged against targets, as JSON, Markdown and PNGs."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from smsgw.engine.histogram import LogHistogram
from smsgw.simulate.scenarios import Scenario, Target

# --- Weighted latency histogram -----------------------------------------------------------


class WaitHistogram(LogHistogram):
    """Waits in virtual time: engine.histogram's log buckets, summarized as Quantiles."""

    __slots__ = ()

    def summary(self) -> Quantiles:
        return Quantiles(
            count=self.count,
            mean_s=round(self.total_s / self.count, 6) if self.count else 0.0,
            p50_s=round(self.quantile(0.50), 6),
            p90_s=round(self.quantile(0.90), 6),
            p95_s=round(self.quantile(0.95), 6),
            p99_s=round(self.quantile(0.99), 6),
            p999_s=round(self.quantile(0.999), 6),
            max_s=round(self.max_s, 6),
        )


# --- The report -------------------------------------------------------------------------------


class Quantiles(msgspec.Struct, frozen=True):
    count: int
    mean_s: float
    p50_s: float
    p90_s: float
    p95_s: float
    p99_s: float
    p999_s: float
    max_s: float


class Bucket(msgspec.Struct):
    """One slice of the run's time: messages accepted, refused and finished in it, the backlog
    at its end, and each operator's attempts by result."""

    t_s: float
    accepted: int = 0
    refused: int = 0
    sent: int = 0
    failed: int = 0
    backlog: int = 0
    operators: dict[str, dict[str, int]] = {}


class FairnessRow(msgspec.Struct, frozen=True):
    group: str  # accounts by size, heaviest first
    accounts: int
    messages: int
    wait: Quantiles  # accept to sent


class CreditCheck(msgspec.Struct, frozen=True):
    accounts: int
    matching: int
    topped_up: int
    captured: int
    held: int
    refunded: int
    balance: int
    broken: dict[str, list[str]] = {}  # account id -> the identities it breaks (at most 20)

    @property
    def ok(self) -> bool:
        return self.matching == self.accounts and not self.broken


class TargetResult(msgspec.Struct, frozen=True):
    label: str
    metric: str
    op: str
    target: float
    value: float | None
    passed: bool


class Check(msgspec.Struct, frozen=True):
    """One step of an acceptance run's opening (health, a single send, ...)."""

    name: str
    passed: bool
    detail: str


class RunInfo(msgspec.Struct):
    """How the run went on this machine: not part of what a seed determines."""

    wall_s: float
    cpu_count: int | None
    started_at: str
    items: int = 0  # engine items (cohorts in virtual time; messages on the wall clock)
    commits: int = 0
    note: str = ""


class Outage(msgspec.Struct):
    operator: str
    start_s: float
    end_s: float


def outages_of(profiles: Sequence[Any], squeeze: float = 1.0) -> list[Outage]:
    """The scenario's operator outages as the report shows them (`squeeze`: wall-clock runs
    compress the scenario's time)."""
    return [
        Outage(p.name, start * squeeze, end * squeeze) for p in profiles for start, end in p.outages
    ]


class SimReport(msgspec.Struct):
    scenario: str
    description: str
    mode: str
    scale: float
    seed: int
    duration_s: float  # of load, in the mode's time
    offered: int  # messages the scenario offered
    totals: dict[str, int]  # accepted, refused[:reason], sent, failed[:reason], lost, not_final
    figures: dict[str, float]
    latency: dict[str, Quantiles]  # accept, accept_to_sent, express_to_sent
    cdf: dict[str, list[tuple[float, float]]]
    bucket_s: float
    timeline: list[Bucket]
    fairness: list[FairnessRow]
    operators: dict[str, dict[str, int]]  # name -> attempts by result
    credit: CreditCheck
    targets: list[TargetResult]
    passed: bool
    run: RunInfo
    checks: list[Check] = []
    # Each operator's outage windows in the run's time (seconds from its start): shaded on
    # the plots over time.
    outages: list[Outage] = []

    def deterministic(self) -> dict[str, Any]:
        """Everything a seed decides: the report without `run`."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        data.pop("run")
        return data


def judge(targets: Sequence[Target], figures: Mapping[str, float]) -> list[TargetResult]:
    results = []
    for t in targets:
        value = figures.get(t.metric)
        passed = value is not None and (value <= t.value if t.op == "<=" else value >= t.value)
        results.append(TargetResult(t.label, t.metric, t.op, t.value, value, passed))
    return results


def fairness_groups(scenario: Scenario) -> list[tuple[str, range]]:
    """Account ranks (0 = heaviest) grouped by size, for the fairness table."""
    n = scenario.accounts
    if scenario.whale is not None:
        return [("whale (1 account)", range(0, 1)), (f"light ({n - 1} accounts)", range(1, n))]
    if scenario.zipf == 0.0:
        return [(f"all ({n} accounts, equal shares)", range(0, n))]
    edges = [0, max(1, n // 100), max(2, n // 10), max(3, n // 2), n]
    labels = ["top 1%", "1-10%", "10-50%", "bottom 50%"]
    groups = []
    for label, lo, hi in zip(labels, edges, edges[1:], strict=False):
        if hi > lo:
            groups.append((f"{label} ({hi - lo} accounts)", range(lo, hi)))
    return groups


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- Writing -------------------------------------------------------------------------------


def write(report: SimReport, folder: Path) -> list[Path]:
    """report.json, report.md and the PNG plots into `folder`; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "report.json", folder / "report.md"]
    paths[0].write_bytes(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
    plots = plot(report, folder)
    paths[1].write_text(markdown(report, [p.name for p in plots]))
    return [*paths, *plots]


def _fmt_s(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _fmt_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.4g}"


def markdown(report: SimReport, images: Iterable[str] = ()) -> str:
    r = report
    verdict = "PASS" if r.passed else "FAIL"
    lines = [
        f"# smsgw simulate {r.scenario}: {verdict}",
        "",
        r.description,
        "",
        f"Mode **{r.mode}**, scale {r.scale:g}, seed {r.seed}; {r.offered:,} messages offered"
        f" over {r.duration_s:,.0f} s of {'virtual' if r.mode == 'virtual' else 'wall'} time."
        f" Ran in {r.run.wall_s:,.1f} s wall on {r.run.cpu_count} cores ({r.run.started_at}).",
    ]
    if r.run.note:
        lines += ["", r.run.note]
    lines += ["", "## Targets", "", "| target | value | result |", "| --- | --- | --- |"]
    for t in r.targets:
        lines.append(
            f"| {t.label} | {_fmt_value(t.value)} | {'PASS' if t.passed else '**FAIL**'} |"
        )
    if r.checks:
        lines += ["", "## Checks", "", "| step | result | detail |", "| --- | --- | --- |"]
        lines += [
            f"| {c.name} | {'ok' if c.passed else '**FAILED**'} | {c.detail} |" for c in r.checks
        ]
    lines += ["", "## Totals", "", "| status | messages |", "| --- | --- |"]
    lines += [f"| {k} | {v:,} |" for k, v in r.totals.items()]
    lines += [
        "",
        "## Latency",
        "",
        "| figure | count | p50 | p95 | p99 | p99.9 | max |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, q in r.latency.items():
        lines.append(
            f"| {name} | {q.count:,} | {_fmt_s(q.p50_s)} | {_fmt_s(q.p95_s)} |"
            f" {_fmt_s(q.p99_s)} | {_fmt_s(q.p999_s)} | {_fmt_s(q.max_s)} |"
        )
    if r.fairness:
        lines += [
            "",
            "## Fairness: wait (accept to sent) by account size",
            "",
            "| accounts | messages sent | p50 | p95 | p99 |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {f.group} | {f.messages:,} | {_fmt_s(f.wait.p50_s)} | {_fmt_s(f.wait.p95_s)} |"
            f" {_fmt_s(f.wait.p99_s)} |"
            for f in r.fairness
        ]
    if r.operators:
        lines += ["", "## Operators (attempts)", "", "| operator | sent | temporary | permanent |"]
        lines.append("| --- | --- | --- | --- |")
        for name, kinds in r.operators.items():
            lines.append(
                f"| {name} | {kinds.get('sent', 0):,} | {kinds.get('temporary', 0):,} |"
                f" {kinds.get('permanent', 0):,} |"
            )
    c = r.credit
    lines += [
        "",
        "## Credit reconciliation",
        "",
        f"{c.matching:,} of {c.accounts:,} accounts reconcile"
        f" ({'exact' if c.ok else 'MISMATCH'}): top-ups {c.topped_up:,} = captured"
        f" {c.captured:,} + held {c.held:,} + balance {c.balance:,}; refunded {c.refunded:,}.",
    ]
    if c.broken:
        lines += ["", "Broken: " + "; ".join(f"{a}: {', '.join(b)}" for a, b in c.broken.items())]
    images = list(images)
    if images:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(name).stem}]({name})" for name in images]
    return "\n".join(lines) + "\n"


# A value axis goes logarithmic when its largest positive value is this many times its
# smallest: one account (or one lane) that dwarfs the rest would flatten the others to zero.
LOG_SCALE_RATIO = 50.0


def _spread(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return len(positive) > 1 and max(positive) / min(positive) >= LOG_SCALE_RATIO


def _shade_outages(ax: Any, report: SimReport, unit: float) -> bool:
    """Light red bands over the operators' outages; True when there was one."""
    for outage in report.outages:
        ax.axvspan(outage.start_s / unit, outage.end_s / unit, color="red", alpha=0.08, lw=0)
    return bool(report.outages)


def _legend_outside(fig: Any, handles: list[Any], labels: list[str]) -> None:
    """The legend to the right of the axes, never over the data."""
    fig.legend(handles, labels, loc="outside right upper", frameon=False)


def plot(report: SimReport, folder: Path) -> list[Path]:
    """Throughput over time, latency CDFs, wait by account size and operator health: legends
    beside the data, log scales where one series dwarfs the rest, outages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    title = f"smsgw simulate {report.scenario} (scale {report.scale:g}, seed {report.seed})"
    span = max(report.duration_s, len(report.timeline) * report.bucket_s)
    unit, xlabel = (3600.0, "hours") if span > 2 * 3600 else (60.0, "minutes")
    if span <= 300:
        unit, xlabel = 1.0, "seconds"
    per_s = 1.0 / report.bucket_s if report.bucket_s > 0 else 1.0

    if report.timeline:
        xs = [b.t_s / unit for b in report.timeline]
        fig, ax = plt.subplots(figsize=(11, 4.5), dpi=100, layout="constrained")
        ax.plot(xs, [b.accepted * per_s for b in report.timeline], label="accepted/s", lw=1.4)
        ax.plot(xs, [b.sent * per_s for b in report.timeline], label="sent/s", lw=1.4)
        ax.plot(xs, [b.failed * per_s for b in report.timeline], label="failed/s", lw=1.0)
        if any(b.refused for b in report.timeline):
            ax.plot(
                xs, [b.refused * per_s for b in report.timeline], label="refused/s", lw=1.0,
                ls="--",
            )  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel("messages per second")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.fill_between(
            xs, [b.backlog for b in report.timeline], color="grey", alpha=0.2, label="backlog"
        )
        ax2.set_ylabel("backlog (messages)")
        ax2.set_ylim(0, max(1, *(b.backlog for b in report.timeline)) * 1.1)
        rates = [
            v * per_s for b in report.timeline for v in (b.accepted, b.sent, b.failed, b.refused)
        ]
        if _spread(rates):
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylabel("messages per second (log scale)")
        if _shade_outages(ax, report, unit):
            ax.plot([], [], color="red", alpha=0.3, lw=6, label="operator outage")
        handles = ax.get_legend_handles_labels()
        handles2 = ax2.get_legend_handles_labels()
        _legend_outside(fig, handles[0] + handles2[0], handles[1] + handles2[1])
        ax.set_title(f"Throughput over time: {title}")
        written.append(_save(fig, folder / "throughput.png"))

    if any(report.cdf.values()):
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100, layout="constrained")
        for name, points in report.cdf.items():
            if points:
                ax.step(
                    [max(p[0], 1e-5) for p in points], [p[1] for p in points], where="post",
                    label=name,
                )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log scale)")
        ax.set_ylabel("fraction of messages at or below")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3, which="both")
        _legend_outside(fig, *ax.get_legend_handles_labels())
        ax.set_title("Latency CDF")
        written.append(_save(fig, folder / "latency_cdf.png"))

    if report.fairness:
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100, layout="constrained")
        labels = [f.group for f in report.fairness]
        xs_i = list(range(len(labels)))
        width = 0.27
        for k, (name, attr) in enumerate((("p50", "p50_s"), ("p95", "p95_s"), ("p99", "p99_s"))):
            values = [getattr(f.wait, attr) for f in report.fairness]
            ax.bar([x + (k - 1) * width for x in xs_i], values, width, label=name)
        ax.set_xticks(xs_i, labels, rotation=10)
        ax.set_ylabel("wait, accept to sent (s)")
        waits = [getattr(f.wait, a) for f in report.fairness for a in ("p50_s", "p95_s", "p99_s")]
        if _spread(waits):
            ax.set_yscale("log")
            ax.set_ylabel("wait, accept to sent (s, log scale)")
        ax.grid(alpha=0.3, axis="y")
        _legend_outside(fig, *ax.get_legend_handles_labels())
        ax.set_title("Wait by account size (heaviest first)")
        written.append(_save(fig, folder / "fairness.png"))

    names = sorted({n for b in report.timeline for n in b.operators})
    if names:
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(11, 6), dpi=100, sharex=True, layout="constrained"
        )
        xs = [b.t_s / unit for b in report.timeline]
        for name in names:
            attempts = [sum(b.operators.get(name, {}).values()) for b in report.timeline]
            sent = [b.operators.get(name, {}).get("sent", 0) for b in report.timeline]
            top.plot(xs, [a * per_s for a in attempts], label=name, lw=1.2)
            bottom.plot(
                xs, [s / a if a else math.nan for s, a in zip(sent, attempts, strict=True)],
                label=name, lw=1.2,
            )  # fmt: skip
        top.set_ylabel("attempts/s")
        top.grid(alpha=0.3)
        for axis in (top, bottom):
            _shade_outages(axis, report, unit)
        if report.outages:
            top.plot([], [], color="red", alpha=0.3, lw=6, label="operator outage")
        _legend_outside(fig, *top.get_legend_handles_labels())
        top.set_title("Operator health over time")
        bottom.set_ylabel("share of attempts sent")
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xlabel(xlabel)
        bottom.grid(alpha=0.3)
        written.append(_save(fig, folder / "operators.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path


def default_folder(base: Path, scenario: str) -> Path:
    return base / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}"


# --- Live progress ----------------------------------------------------------------------------


class Live:
    """Progress while a run goes: a rich progress bar and a one-line summary when stdout is a
    terminal, else a plain line to stderr at most every `plain_every_s` seconds."""

    def __init__(self, title: str, total: int, *, plain_every_s: float = 10.0) -> None:
        self.title = title
        self.total = max(total, 1)
        self._plain_every = plain_every_s
        self._last = 0.0
        self._progress: Any = None
        self._task: Any = None
        if sys.stdout.isatty() and os.environ.get("TERM") != "dumb":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[summary]}"),
            )
            self._progress.start()
            self._task = self._progress.add_task(title, total=self.total, summary="")

    def update(self, done: int, summary: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=min(done, self.total), summary=summary)
            return
        now = time.monotonic()
        if now - self._last >= self._plain_every:
            self._last = now
            print(
                f"{self.title}: {min(done, self.total):,}/{self.total:,} {summary}",
                file=sys.stderr,
                flush=True,
            )

    def close(self, done: int | None = None, summary: str = "") -> None:
        """Stop the display, first showing `done` (the final count) when given."""
        if self._progress is not None:
            if done is not None:
                self._progress.update(self._task, completed=min(done, self.total), summary=summary)
            self._progress.stop()
            self._progress = None
