"""What every command of `smsgw` shares: usage errors, the look of help (defaults, the
environment each command reads), the version, the schema, and a few argument types."""

from __future__ import annotations

import argparse
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

import msgspec


class UsageError(Exception):
    """Bad input found after parsing (no such account, say): one line on stderr, exit 2."""


# The environment each command reads, for its help.
ENV_DATABASE = (
    ("DATABASE_URL", "PostgreSQL to use; unset: an embedded server in var/pgdata"),
    ("SMSGW_DATA_DIR", "the embedded server's folder when DATABASE_URL is unset"),
    ("SMSGW_SCHEMA", "the PostgreSQL schema of the gateway's tables (default public)"),
)
ENV_LOG = (("SMSGW_LOG_FORMAT", "json: one JSON object a line (as --log-json)"),)
ENV_SERVE = (
    *ENV_DATABASE,
    ("SMSGW_ADMIN_KEY", "the admin API key; unset: one is made and printed"),
    ("SMSGW_NODE_ID", "this node's name (as --node-id)"),
    ("SMSGW_METRICS_PUBLIC", "1: GET /metrics without the admin key"),
    ("SMSGW_DLR_KEYS", "NAME=KEY,...: operators' delivery report keys (as --dlr-key)"),
    ("SMSGW_MAX_ACCOUNT_BACKLOG", "as --max-account-backlog"),
    ("SMSGW_MAX_NODE_BACKLOG", "as --max-node-backlog"),
    ("SMSGW_MAX_REQUEST_BODY_BYTES", "as --max-request-body-bytes"),
    *ENV_LOG,
)


def env_epilog(variables: tuple[tuple[str, str], ...]) -> str:
    """The help's closing lines: each environment variable and what it means."""
    width = max(len(name) for name, _ in variables)
    lines = [f"  {name:<{width}}  {meaning}" for name, meaning in variables]
    return "environment:\n" + "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless it has none worth showing or its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == []
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Subcommands:
    """Makes the commands under a parser: each takes -v and --log-json (from `common`), shows
    its options' defaults, and lists the environment it reads at the end of its help."""

    def __init__(self, common: argparse.ArgumentParser) -> None:
        self._common = common

    def __call__(
        self, parent: Any, name: str, env: tuple[tuple[str, str], ...], **kwargs: Any
    ) -> argparse.ArgumentParser:
        """A new command `name` under `parent` (an `add_subparsers` result); `kwargs` go to
        `add_parser`, its help also as its description."""
        made: argparse.ArgumentParser = parent.add_parser(
            name,
            parents=[self._common],
            formatter_class=HelpFormatter,
            epilog=env_epilog((*env, *ENV_LOG)),
            description=kwargs.get("help"),
            **kwargs,
        )
        return made


def smsgw_version() -> str:
    """The installed package's version, "unknown" when it runs from a source tree alone."""
    try:
        return version("smsgw")
    except PackageNotFoundError:
        return "unknown"


def database_schema() -> str:
    """SMSGW_SCHEMA puts the gateway's tables in their own PostgreSQL schema (tests use it)."""
    return os.environ.get("SMSGW_SCHEMA", "public")


def single(error: BaseException) -> BaseException:
    """The one exception inside nested one-exception groups (trio's nurseries wrap what
    they raise); `error` itself otherwise."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def print_json(value: Any) -> None:
    """`value` as one line of JSON on stdout."""
    print(msgspec.json.encode(value).decode())


def positive_int(value: str) -> int:
    """argparse type for a whole number >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: want a whole number >= 1")
    return number
