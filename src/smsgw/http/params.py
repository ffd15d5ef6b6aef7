"""What clients write into URLs: query and path parameters, parsed strictly at the edge.

Python's own parsers are generous in ways an API must not be: `str.isdigit` takes a
superscript two, which `int()` then refuses, and `int()` takes Arabic-Indic and full-width
digits, and raises past 4,300 digits; `datetime.fromisoformat` takes week dates and basic
format, and gives datetimes (`0001-01-01T00:00:00+23:59`) whose UTC time is not a datetime at
all, so converting them for PostgreSQL raises; msgspec's own lax conversion takes `1e3` for
an integer, not `002`, and rounds fractions of a second. Every parser here takes ASCII only,
bounds the length, and answers a 422 problem naming the parameter; what it returns the store
can take as it is.

A route's query parameters are a msgspec Struct, read by `QueryDecoder`: each field's type
says how its text is read (a whole number, true or false, an RFC 3339 timestamp, text, one
of a few words) and, with msgspec's constraints, which values it takes. The same types are
the parameters' schemas in the OpenAPI document (http/api.py), so the two cannot disagree.
"""

from __future__ import annotations

import base64
import binascii
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Generic, TypeVar

import msgspec
from werkzeug.datastructures import MultiDict
from werkzeug.routing import IntegerConverter

from smsgw.http.problems import ProblemError

Q = TypeVar("Q", bound=msgspec.Struct)
T = TypeVar("T")
# 19 digits at most: every bigint, and int() stays cheap.
_WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")
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


@dataclass(frozen=True)
class QueryField:
    """One field of a query Struct: its attribute, its name in the URL, its type without
    `| None` (a query gives a value or nothing), and whether it must be given."""

    attr: str
    name: str
    type: Any
    required: bool


def query_fields(kind: type[msgspec.Struct]) -> tuple[QueryField, ...]:
    """The query parameters `kind` declares, in its order."""
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    hints = typing.get_type_hints(kind, include_extras=True)
    return tuple(
        QueryField(f.name, f.encode_name, _without_none(hints[f.name]), f.required)
        for f in info.fields
    )


def _without_none(hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2:
        if args[1] is type(None):
            return args[0]
        if args[0] is type(None):
            return args[1]
    return hint


class _Reader:
    """One parameter's text as its field's value: read by the kind of its type (Python's
    generous parsers are not used), then checked by msgspec against the type's constraints;
    anything else is a 422 saying what the parameter takes."""

    __slots__ = ("attr", "expects", "name", "read", "type")

    def __init__(self, field: QueryField) -> None:
        if field.required:
            raise TypeError(f"query parameter `{field.name}`: give it a default")
        self.attr = field.attr
        self.name = field.name
        self.type = field.type
        self.read, self.expects = _kind(field.name, field.type)

    def __call__(self, text: str) -> Any:
        value = self.read(text)
        if value is not None:
            try:
                return msgspec.convert(value, self.type)
            except msgspec.ValidationError:
                pass
        raise ProblemError(
            422, "invalid_field", f"`{self.name}` must be {self.expects}", field=self.name
        )


def _kind(name: str, kind: Any) -> tuple[Callable[[str], Any], str]:
    """How a parameter of type `kind` is read from text (None: it is not one), and what it
    takes, in words for the 422."""
    info = msgspec.inspect.type_info(kind)
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    match info:
        case msgspec.inspect.IntType(gt=None, lt=None, multiple_of=None):
            return whole_number, f"a whole number{_span(info.ge, info.le)}, in ASCII digits"
        case msgspec.inspect.BoolType():
            return _BOOLEANS.get, "true or false"
        case msgspec.inspect.DateTimeType(tz=True):
            return _timestamp, (
                "an RFC 3339 timestamp with an offset whose UTC time is in the years 1 to"
                " 9999, such as 2025-01-31T00:00:00Z (in a query string, write + as %2B)"
            )
        case msgspec.inspect.StrType(pattern=None):
            return _text, _length(info.min_length, info.max_length) + ", without U+0000"
        case msgspec.inspect.LiteralType(values=values) if all(isinstance(v, str) for v in values):
            words = [str(v) for v in values]
            one_of = " or ".join(words) if len(words) <= 2 else "one of " + ", ".join(words)
            return _text, one_of
    raise TypeError(
        f"query parameter `{name}`: {kind} is none of the types a query takes (an int with"
        " ge and le, bool, datetime with tz=True, str without a pattern, a Literal of str)"
    )


def _span(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f" of at least {low}"
    return "" if high is None else f" of at most {high}"


def _length(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"{low} to {high} characters"
    if low is not None:
        return f"at least {low} characters"
    return "text" if high is None else f"at most {high} characters"


_BOOLEANS = {"true": True, "false": False}


def whole_number(text: str) -> int | None:
    """`text` as an integer when it is 1 to 19 ASCII digits (every bigint), else None."""
    return int(text) if _WHOLE_NUMBER.fullmatch(text) else None


def _timestamp(text: str) -> datetime | None:
    """`text` as an RFC 3339 timestamp whose UTC time is a datetime (years 1 to 9999), which
    PostgreSQL then takes; else None."""
    at = parse_rfc3339(text)
    if at is None:
        return None
    try:
        at.astimezone(UTC)
    except OverflowError:
        return None
    return at


def _text(text: str) -> str | None:
    # PostgreSQL text cannot hold U+0000: a query that sends it fails whole.
    return None if "\x00" in text else text


class QueryDecoder(Generic[Q]):
    """A query string's parameters as a `kind` Struct (its fields say which parameters the
    route takes, each optional): each at most once, none unknown (a typo such as
    `created_after` must not silently return everything), each a value of its field's type
    or a 422 problem naming it."""

    __slots__ = ("_kind", "_readers")

    def __init__(self, kind: type[Q]) -> None:
        self._kind = kind
        self._readers = {f.name: _Reader(f) for f in query_fields(kind)}

    def __call__(self, args: MultiDict[str, str]) -> Q:
        values: dict[str, Any] = {}
        for name, texts in args.lists():
            reader = self._readers.get(name)
            if reader is None:
                raise ProblemError(
                    422,
                    "invalid_field",
                    f"unknown query parameter `{name}`; this route takes "
                    + ", ".join(f"`{a}`" for a in sorted(self._readers)),
                    field=name,
                )
            if len(texts) > 1:
                raise ProblemError(422, "invalid_field", f"`{name}` given twice", field=name)
            values[reader.attr] = reader(texts[0])
        return self._kind(**values)


_query_decoders: dict[type, QueryDecoder[Any]] = {}


def query_decoder(kind: type[Q]) -> QueryDecoder[Q]:
    """The decoder of `kind`'s query parameters, made once per kind (so a field it cannot
    read fails when the route is declared: http/api.py)."""
    decoder = _query_decoders.get(kind)
    if decoder is None:
        decoder = _query_decoders[kind] = QueryDecoder(kind)
    return decoder


def parse_rfc3339(value: str) -> datetime | None:
    """The datetime `value` writes in RFC 3339's date-time form, or None. Its UTC time may
    still be out of range: the query decoder checks that."""
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


def aliased(name: str, value: T | None, old: str, old_value: T | None) -> tuple[str, T | None]:
    """Which of the parameter `name` and its deprecated alias `old` the query gave, and its
    value (`name` and None when neither); 422 when it gave both."""
    if old_value is None:
        return name, value
    if value is not None:
        raise ProblemError(
            422,
            "invalid_field",
            f"`{old}` is the deprecated name of `{name}`: give one of them",
            field=old,
        )
    return old, old_value


def time_range(
    start: str, low: datetime | None, end: str, high: datetime | None
) -> tuple[datetime | None, datetime | None]:
    """[low, high) from the parameters `start` and `end`, either absent; 422 when
    `start` is after `end`."""
    if low is not None and high is not None and low > high:
        raise ProblemError(422, "invalid_field", f"`{start}` is after `{end}`", field=start)
    return low, high


def is_message_id(value: str) -> bool:
    """Whether `value` is a message id: a UUID as the API writes it, or without hyphens."""
    return _MESSAGE_ID.fullmatch(value) is not None


# --- page cursors: opaque to clients, base64url without padding ------------------------------


def cursor_of(raw: bytes) -> str:
    """A `next_cursor` carrying `raw`."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def cursor_bytes(cursor: str) -> bytes | None:
    """What `cursor_of` put in `cursor`, or None when it is not base64url (the caller
    still checks the bytes are a position it wrote)."""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        return None


def invalid_cursor() -> ProblemError:
    """The 422 for a `cursor` this API did not return."""
    return ProblemError(
        422,
        "invalid_cursor",
        "`cursor` is not a cursor this API returned; pass `next_cursor` as it is",
        field="cursor",
    )
