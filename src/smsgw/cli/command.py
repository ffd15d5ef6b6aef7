"""The `smsgw` command: serve, migrate, accounts, simulate, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from smsgw.cli import database, serve, simulate
from smsgw.cli.common import (
    ENV_SERVE,
    HelpFormatter,
    Parser,
    Subcommands,
    UsageError,
    env_epilog,
    single,
    smsgw_version,
)
from smsgw.logs import configure as configure_logging


def _add_logging(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v and --log-json: on the top level (defaults False) and on every subcommand (no
    default there, so one given before the subcommand is kept)."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log at INFO level (serve logs at INFO anyway; -v adds its DEBUG lines)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=default,
        help="log one JSON object a line, with request ids (also: SMSGW_LOG_FORMAT=json)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `smsgw` parser: the top-level flags and every command under it."""
    parser = Parser(
        prog="smsgw",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog=env_epilog((*ENV_SERVE,)) + "\n\n`smsgw COMMAND --help` shows a command's.",
    )
    parser.add_argument("--version", action="version", version=f"smsgw {smsgw_version()}")
    _add_logging(parser, False)
    common = argparse.ArgumentParser(add_help=False)
    _add_logging(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = Subcommands(common)
    serve.add_command(sub, command)
    database.add_commands(sub, command)
    simulate.add_commands(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input is one line on stderr and exit status 2, any other failure
    one line and 1 (the traceback only with -v): never a page that might hold a secret."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        # A server says what it is doing: INFO by default (the start-up summary, the access
        # log, what it changes); -v adds the gateway's DEBUG lines, not the libraries'.
        configure_logging(
            json=True if args.log_json else None,
            level=logging.INFO,
            smsgw_level=logging.DEBUG if args.verbose else None,
            access_log=not args.no_access_log,
        )
    else:
        configure_logging(
            json=True if args.log_json else None,
            level=logging.INFO if args.verbose else logging.WARNING,
        )
    name = " ".join(n for n in (args.command, getattr(args, "accounts_command", None)) if n)
    try:
        return int(args.func(args))
    except UsageError as error:
        print(f"smsgw {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as caught:
        if args.verbose:
            logging.getLogger("smsgw").exception("smsgw %s failed", name)
        leaf = single(caught)
        first = (str(leaf).strip().splitlines() or [""])[0]
        print(f"smsgw {name}: {type(leaf).__name__}: {first}", file=sys.stderr)
        return 1
