"""The virtual-time simulator: the same seed gives the same report, credit reconciles, and the
report folder holds readable files."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from smsgw.engine.ports import SHARDS
from smsgw.simulate import report as sim_report
from smsgw.simulate.report import SimReport
from smsgw.simulate.scenarios import SCENARIOS, Scenario, scenario
from smsgw.simulate.virtual import VirtualRun, run_virtual

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_day(seed: int | None = None) -> Scenario:
    """`day` at 1/1,000 (100,000 messages, 50 accounts), arrivals every 500 s: the
    whole shape (diurnal curve, Zipf, express, three operators, the midday outage) in seconds."""
    return scenario("day", scale=0.001, seed=seed)


@pytest.fixture(scope="module")
def day_report() -> SimReport:
    return run_virtual(tiny_day(), live=False)


def test_same_seed_same_report(day_report: SimReport) -> None:
    again = run_virtual(tiny_day(), live=False)
    assert again.deterministic() == day_report.deterministic()


def test_another_seed_another_report(day_report: SimReport) -> None:
    other = run_virtual(tiny_day(seed=2), live=False)
    assert other.seed == 2
    assert other.deterministic() != day_report.deterministic()


def test_every_message_accounted_for_and_credit_exact(day_report: SimReport) -> None:
    totals = day_report.totals
    assert day_report.offered == 100_000 == totals["offered"]
    refused = sum(v for k, v in totals.items() if k.startswith("refused"))
    assert totals["accepted"] + refused == totals["offered"]
    assert totals["sent"] + totals["failed"] == totals["accepted"]
    assert totals["lost"] == 0 and totals["not_final"] == 0
    credit = day_report.credit
    assert credit.ok and credit.held == 0
    assert credit.topped_up == credit.captured + credit.balance
    assert {t.metric: t.passed for t in day_report.targets}["credit_mismatches"]


def test_the_outage_shows_in_operator_health(day_report: SimReport) -> None:
    """op-b fails every attempt from 12:00 to 12:30: its buckets there have no `sent`."""
    noon = [
        b for b in day_report.timeline if b.t_s >= 12 * 3600 and b.t_s + day_report.bucket_s
        <= 12.5 * 3600
    ]  # fmt: skip
    attempts = [b.operators.get("op-b", {}) for b in noon]
    assert sum(sum(a.values()) for a in attempts) > 0
    assert all(a.get("sent", 0) == 0 for a in attempts)
    # The report says when it was, for the plots to shade it.
    outages = [(o.operator, o.start_s, o.end_s) for o in day_report.outages]
    assert outages == [("op-b", 12 * 3600.0, 12.5 * 3600.0)]


def test_report_folder(day_report: SimReport, tmp_path: Path) -> None:
    paths = sim_report.write(day_report, tmp_path)
    names = {p.name for p in paths}
    assert {"report.json", "report.md", "throughput.png", "latency_cdf.png", "fairness.png",
            "operators.png"} <= names  # fmt: skip
    decoded = msgspec.json.decode((tmp_path / "report.json").read_bytes(), type=SimReport)

    def as_json(r: SimReport) -> object:
        return json.loads(msgspec.json.encode(r.deterministic()))

    assert as_json(decoded) == as_json(day_report)
    markdown = (tmp_path / "report.md").read_text()
    assert "## Targets" in markdown and "![throughput](throughput.png)" in markdown
    import matplotlib.image

    for name in names - {"report.json", "report.md"}:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        pixels = matplotlib.image.imread(tmp_path / name)
        height, width = pixels.shape[:2]
        assert width >= 600 and height >= 300
        assert pixels.std() > 0.01  # not a blank canvas
    # The outage is shaded light red on the plots over time.
    for name in ("throughput.png", "operators.png"):
        rgb = matplotlib.image.imread(tmp_path / name)[..., :3]
        red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        shaded = (red > 0.97) & (green > 0.85) & (green < 0.95) & (abs(green - blue) < 0.02)
        assert shaded.sum() > 1_000, name


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_scales_and_keeps_its_shape(name: str) -> None:
    base = SCENARIOS[name]
    small = scenario(name, scale=0.01, seed=5)
    assert small.seed == 5 and small.scale == pytest.approx(0.01)
    assert small.messages == max(1, round(base.messages * 0.01))
    assert small.duration_s == base.duration_s and small.express_share == base.express_share
    assert sum(small.zipf_weights()) == pytest.approx(1.0)
    total = small.expected_load(0.0, small.duration_s)
    assert total == pytest.approx(small.messages_without_whale)


def test_the_virtual_node_runs_the_leased_path() -> None:
    """The simulated node leases its shards as `serve`'s do: every message it dispatches was
    routed under a lease and admitted before its send (none fenced off: it never loses one)."""
    run = VirtualRun(scenario("day", scale=0.0002), live=False)
    report = run.run()
    assert run.engine is not None and run.engine.leases is not None
    counts = run.engine.leases.counts
    assert len(run.engine.leases.owned) == 0  # released at the end of the run
    assert counts["acquired"] == SHARDS and counts["routed"] > 0 and report.totals["sent"] > 0
    assert counts["not_owned"] == 0 and counts["fenced_at_send"] == 0
