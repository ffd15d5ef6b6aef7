"""The `smsgw` command line: --version, logging flags anywhere, help with defaults and the
environment, bad input in one line with exit status 2."""

from __future__ import annotations

import pytest

from smsgw.cli import build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("smsgw ")


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "--log-json", "accounts", "list"],
        ["accounts", "-v", "--log-json", "list"],
        ["accounts", "list", "-v", "--log-json"],
    ],
)
def test_logging_flags_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.log_json) == (True, True)
    assert build_parser().parse_args(["accounts", "list"]).verbose is False


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["serve", "--help"], ["(default: 127.0.0.1)", "(default: 8080)", "SMSGW_ADMIN_KEY"]),
        (["accounts", "create", "--help"], ["(default: 0)", "DATABASE_URL", "SMSGW_SCHEMA"]),
        (["--help"], ["SMSGW_DLR_KEYS", "SMSGW_NODE_ID", "SMSGW_DATA_DIR", "SMSGW_LOG_FORMAT"]),
        (["bench", "--help"], ["default quick"]),
    ],
)
def test_help_shows_defaults_and_environment(
    argv: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in shown:
        assert text in out


@pytest.mark.parametrize(
    "argv",
    [
        ["accounts", "create", "x", "--credit", "-5"],
        ["accounts", "create", "x", "--credit", "lots"],
        ["accounts", "topup", "1", "0"],
        ["accounts", "show", "abc"],
        ["accounts", "rotate-key"],
        ["serve", "--port", "x"],
        ["serve", "--workers", "0"],
        ["nonsense"],
    ],
)
def test_bad_input_is_one_line_and_status_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err, err
    assert "Traceback" not in err
