"""What clients write into URLs: query and path parameters, parsed strictly at the edge.

Python's own parsers are generous in ways an API must not be: `str.isdigit` takes a
superscript two, which `int()` then refuses, and `int()` takes Arabic-Indic and full-width
digits, and raises past 4,300 digits; `datetime.fromisoformat` takes week dates and basic
format, and gives datetimes (`0001-01-01T00:00:00+23:59`) whose UTC time is not a datetime at
all, so converting them for PostgreSQL raises. Every
parser here takes ASCII only, bounds the length, and answers a 422 problem naming the
parameter; what it returns the store can take as it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone

from werkzeug.datastructures import MultiDict
from werkzeug.routing import IntegerConverter

from smsgw.http.problems import ProblemError

# Nine digits at most: every number a query takes is far smaller, and int() stays cheap.
_WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")
# RFC 3339 section 5.6 date-time, with its note's lower-case `t`/`z` and space separator.
# Fractions past microseconds (PostgreSQL's precision) are cut, not rounded; up to nine.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
# A UUID in hex, either case, with or without its four hyphens: what asyncpg's uuid codec takes
# too. (uuid.UUID also takes braces, `urn:uuid:`, `_` and any Unicode digit; asyncpg does not.)
_MESSAGE_ID = re.compile(
    r"[0-9a-fA-F]{8}(-?)[0-9a-fA-F]{4}\1[0-9a-fA-F]{4}\1[0-9a-fA-F]{4}\1[0-9a-fA-F]{12}"
)


class AsciiIntegerConverter(IntegerConverter):
    """werkzeug's `<int:...>`, ASCII digits only: its regex is `\\d+`, which in Python matches
    every Unicode digit, so Arabic-Indic "12" in `/v1/accounts/{id}/topups` reached account 12."""

    regex = r"[0-9]+"
    signed_regex = r"-?[0-9]+"


def query_params(args: MultiDict[str, str], allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters, each at most once; an unknown one is a 422 (a typo such as
    `created_after` must not silently return everything)."""
    allowed = set(allowed)
    params: dict[str, str] = {}
    for name, values in args.lists():
        if name not in allowed:
            raise ProblemError(
                422,
                "invalid_field",
                f"unknown query parameter `{name}`; this route takes "
                + ", ".join(f"`{a}`" for a in sorted(allowed)),
                field=name,
            )
        if len(values) > 1:
            raise ProblemError(422, "invalid_field", f"`{name}` given twice", field=name)
        params[name] = values[0]
    return params


def whole_number(params: dict[str, str], name: str, *, low: int, high: int, default: int) -> int:
    """`name` as an integer in [low, high] written in ASCII digits; `default` when absent."""
    value = params.get(name)
    if value is None:
        return default
    number = int(value) if _WHOLE_NUMBER.fullmatch(value) else None
    if number is None or not low <= number <= high:
        raise ProblemError(
            422,
            "invalid_field",
            f"`{name}` must be a whole number from {low} to {high}, in ASCII digits",
            field=name,
        )
    return number


def text(params: dict[str, str], name: str, *, max_length: int) -> str | None:
    """`name` as 1 to `max_length` characters, none of them U+0000 (PostgreSQL text cannot
    hold it, and a query that sends it fails whole)."""
    value = params.get(name)
    if value is None:
        return None
    if not 1 <= len(value) <= max_length or "\x00" in value:
        raise ProblemError(
            422,
            "invalid_field",
            f"`{name}` must be 1 to {max_length} characters, without U+0000",
            field=name,
        )
    return value


def timestamp(params: dict[str, str], name: str) -> datetime | None:
    """`name` as an RFC 3339 timestamp with an offset; None when absent. 422 unless it is one,
    and unless its UTC time is a datetime (years 1 to 9999), which PostgreSQL then takes."""
    value = params.get(name)
    if value is None:
        return None
    at = parse_rfc3339(value)
    if at is None:
        raise ProblemError(
            422,
            "invalid_field",
            f"`{name}` must be an RFC 3339 timestamp with an offset, such as"
            " 2025-01-31T00:00:00Z (in a query string, write + as %2B)",
            field=name,
        )
    try:
        at.astimezone(UTC)
    except OverflowError:
        raise ProblemError(
            422,
            "invalid_field",
            f"`{name}` is {value}, which in UTC is outside the years 1 to 9999",
            field=name,
        ) from None
    return at


def parse_rfc3339(value: str) -> datetime | None:
    """The datetime `value` writes in RFC 3339's date-time form, or None. Its UTC time may
    still be out of range: `timestamp` checks that."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    offset = timedelta(0)
    if sign is not None:
        if int(off_h) > 23 or int(off_m) > 59:
            return None
        offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "").ljust(6, "0")[:6]),
            tzinfo=UTC if not offset else timezone(offset),
        )
    except ValueError:  # month 13, February 30, hour 24, second 60 (a leap second)
        return None


def time_range(
    params: dict[str, str], start: str, end: str
) -> tuple[datetime | None, datetime | None]:
    """[start, end) from two timestamp parameters, either absent; 422 when start > end."""
    lo, hi = timestamp(params, start), timestamp(params, end)
    if lo is not None and hi is not None and lo > hi:
        raise ProblemError(422, "invalid_field", f"`{start}` is after `{end}`", field=start)
    return lo, hi


def aliased(params: dict[str, str], name: str, old: str) -> str:
    """Which of `name` and its deprecated alias `old` the query uses (`name` when neither);
    422 when it gives both."""
    if old not in params:
        return name
    if name in params:
        raise ProblemError(
            422,
            "invalid_field",
            f"`{old}` is the deprecated name of `{name}`: give one of them",
            field=old,
        )
    return old


def is_message_id(value: str) -> bool:
    """Whether `value` is a message id: a UUID as the API writes it, or without hyphens."""
    return _MESSAGE_ID.fullmatch(value) is not None
