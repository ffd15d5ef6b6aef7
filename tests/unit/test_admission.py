"""Admission: bulk past a backlog bound is refused with a Retry-After from the drain rate."""

from __future__ import annotations

import pytest

from smsgw.cli import build_parser
from smsgw.cli.serve_options import engine_config
from smsgw.engine.admission import Admission, AdmissionConfig, DrainRate, Pressure, RequestBodies

CONFIG = AdmissionConfig(account_backlog=100, node_backlog=1_000, resume_share=0.9)


def admission(
    backlogs: dict[int, int], *, rate: float = 10.0, remote: dict[int, Pressure] | None = None
) -> Admission:
    return Admission(
        CONFIG,
        backlog=lambda a: backlogs.get(a, 0),
        node_backlog=lambda: sum(backlogs.values()),
        drain_rate=lambda: rate,
        remote=lambda a: (remote or {}).get(a),
    )


def test_an_account_under_its_bound_is_admitted_and_one_past_it_gets_429() -> None:
    backlogs = {1: 95}
    gate = admission(backlogs)
    assert gate.check(1, 5) is None
    refusal = gate.check(1, 6)
    assert refusal is not None and (refusal.status, refusal.code) == (429, "backlog_full")
    # 95 waiting, admitted again below 90: 5 to drain at 10/s -> 1 s.
    assert refusal.retry_after == 1
    assert gate.check(2, 1) is None  # another account is not held back by this one's flood


def test_a_refused_account_is_admitted_again_only_below_the_resume_share() -> None:
    backlogs = {1: 101}
    gate = admission(backlogs, rate=2.0)
    first = gate.check(1, 1)
    assert first is not None and first.retry_after == 6  # (101 - 90) / 2 = 5.5 -> 6
    backlogs[1] = 95  # under the bound, not yet under 90%
    assert gate.check(1, 1) is not None
    backlogs[1] = 89
    assert gate.check(1, 1) is None


def test_the_node_past_its_bound_refuses_everyone_with_503() -> None:
    backlogs = {a: 90 for a in range(1, 12)}  # 990 waiting, no account past its own bound
    gate = admission(backlogs, rate=0.0)
    refusal = gate.check(99, 20)
    assert refusal is not None and (refusal.status, refusal.code) == (503, "overloaded")
    assert refusal.retry_after == CONFIG.max_retry_s  # nothing drains: the longest wait


def test_an_account_dispatched_elsewhere_is_judged_by_its_owners_pressure() -> None:
    remote = {5: Pressure(0, {5: 7}), 6: Pressure(12, {}), 7: Pressure(0, {})}
    gate = admission({}, remote=remote)
    five, six = gate.check(5, 1), gate.check(6, 1)
    assert five is not None and (five.status, five.retry_after) == (429, 7)
    assert six is not None and (six.status, six.retry_after) == (503, 12)
    assert gate.check(7, 1) is None


def test_the_pressure_published_names_the_accounts_refused() -> None:
    backlogs = {1: 150, 2: 10}
    gate = admission(backlogs)
    assert gate.check(1, 1) is not None
    pressure = gate.pressure({1: 150, 2: 10})
    assert pressure.node_retry_s == 0 and set(pressure.accounts) == {1}


def test_drain_rate_is_the_counters_growth_over_the_window() -> None:
    now = [0.0]
    count = [0]
    rate = DrainRate(lambda: count[0], lambda: now[0], window=10.0)
    assert rate() == 0.0
    for _ in range(5):
        now[0] += 1.0
        count[0] += 200
        measured = rate()
    assert measured == 200.0


def test_request_bodies_hold_up_to_their_bound_and_count_what_does_not_fit() -> None:
    bodies = RequestBodies(100)
    assert bodies.reserve(60) and bodies.reserve(40)
    assert not bodies.reserve(1)  # full: nothing more is held
    assert (bodies.held, bodies.refused) == (100, 1)
    bodies.release(60)
    assert not bodies.reserve(61) and bodies.reserve(60)
    bodies.release(100)
    assert bodies.stats() == {
        "request_body_bytes": 0,
        "request_body_bytes_peak": 100,
        "request_body_bytes_bound": 100,
        "request_bodies_refused": 2,
    }


def test_the_admission_stats_show_the_request_bodies() -> None:
    gate = admission({})
    gate.bodies.reserve(10)
    stats = gate.stats()
    assert stats["request_body_bytes"] == 10
    assert stats["request_body_bytes_bound"] == CONFIG.request_body_bytes


def test_serve_takes_the_bounds_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMSGW_MAX_REQUEST_BODY_BYTES", str(8 << 20))
    monkeypatch.setenv("SMSGW_MAX_NODE_BACKLOG", "5000")
    args = build_parser().parse_args(["serve", "--max-account-backlog", "300"])
    admission = engine_config(args).admission
    assert (admission.account_backlog, admission.node_backlog) == (300, 5000)
    assert admission.request_body_bytes == 8 << 20


def test_a_body_budget_below_the_largest_body_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-request-body-bytes", "1000"])
    assert "at least 4194304" in capsys.readouterr().err
