"""serve's operator flags: NAME=URL, the routing file, the attempt timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from smsgw.cli import build_parser
from smsgw.cli.serve_options import engine_config
from smsgw.runtime.server import default_providers, split_operator_url


def test_operator_urls_may_be_named_and_bare_ones_still_work() -> None:
    assert split_operator_url("A=http://127.0.0.1:9000") == ("A", "http://127.0.0.1:9000")
    assert split_operator_url("http://127.0.0.1:9000/x?a=b") == (
        None,
        "http://127.0.0.1:9000/x?a=b",
    )
    names = [
        p.name for p, _ in default_providers((), ("A=http://127.0.0.1:1", "http://127.0.0.1:2"))
    ]
    assert names == ["A", "http:127.0.0.1:2"]


def test_the_routing_file_and_attempt_timeout_reach_the_engine(tmp_path: Path) -> None:
    routing = tmp_path / "routing.json"
    routing.write_text(
        '{"operators": [{"name": "A", "window": 50, "max_per_second": 100}],'
        ' "routes": [{"prefix": "+44", "operators": ["A"]}], "breaker": {"cool_down_s": 1}}'
    )
    args = build_parser().parse_args(
        [
            "serve",
            "--operator-url",
            "A=http://127.0.0.1:1",
            "--routing",
            str(routing),
            "--attempt-timeout",
            "2.5",
        ]
    )
    config = engine_config(args)
    assert config.routing.operators[0].window == 50
    assert config.routing.breaker.cool_down_s == 1
    assert config.retry.attempt_timeout == 2.5


@pytest.mark.parametrize(
    "body",
    [
        '{"operators": [{"name": "A", "wieght": 2}]}',  # a misspelt field
        '{"breaker": {"failure_ratio": 2}}',  # not a ratio
        "not json",
    ],
)
def test_a_bad_routing_file_is_a_usage_error(tmp_path: Path, body: str) -> None:
    routing = tmp_path / "routing.json"
    routing.write_text(body)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--routing", str(routing)])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--operator-url", "A=ftp://x"])
