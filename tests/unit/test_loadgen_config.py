"""The load generator's config, its URL check and its latency histogram: no sockets (its runs
against servers on 127.0.0.1 are in tests/integration/test_loadgen.py)."""

from __future__ import annotations

from typing import Any

import pytest

from smsgw.sim.loadgen import LatencyHistogram, LoadConfig, loopback_target, main


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000",
        "http://example.com:8000",
        "http://0.0.0.0:8000",
        "https://127.0.0.1:8000",
        "http://user:pw@127.0.0.1:8000",
        "http://127.0.0.1:8000/v1/messages",
    ],
)
def test_anything_but_a_loopback_http_url_is_refused(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError):
        LoadConfig(url=url, duration=1.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["--url", url, "--no-auth", "--duration", "1"])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", 8000),
        ("http://127.1.2.3:80/", "127.1.2.3", 80),
        ("http://localhost", "localhost", 80),
        ("http://[::1]:9000", "::1", 9000),
    ],
)
def test_loopback_urls_are_accepted(url: str, host: str, port: int) -> None:
    assert loopback_target(url)[:2] == (host, port)


@pytest.mark.parametrize(
    "fields",
    [
        {"duration": 0.0},
        {"duration": 3601.0},
        {"duration": 1.0, "warmup": 1.0},
        {"duration": 1.0, "count": 0},
        {"duration": 1.0, "connections": 0},
        {"duration": 1.0, "keys": ("has space",)},
        {"duration": 1.0, "express_share": 1.5},
        {"duration": 1.0, "path": "no-slash"},
        {"duration": 1.0, "batch": 0},
        {"duration": 1.0, "batch": 10_001},
        {"duration": 1.0, "batch": 10, "method": "GET"},
        {"duration": 1.0, "rate": 0.0},
        {"duration": 1.0, "rate": float("nan")},
    ],
)
def test_unrunnable_configs_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LoadConfig(url="http://127.0.0.1:8000", **fields)


def test_latency_histogram_percentiles_are_within_one_percent() -> None:
    histogram = LatencyHistogram()
    for ms in range(1, 1001):
        histogram.add(ms / 1000.0)

    summary = histogram.summary_ms()

    assert summary is not None
    assert summary.p50 == pytest.approx(500.0, rel=0.01)
    assert summary.p95 == pytest.approx(950.0, rel=0.01)
    assert summary.p99 == pytest.approx(990.0, rel=0.01)
    assert summary.max == 1000.0
    assert LatencyHistogram().summary_ms() is None
