"""The edge's decoders under Hypothesis: whatever the client sends, a valid value or a 4xx.

The JSON body decoder (every request Struct, and the batch's two-pass decoding) and the query
and path parameter parsers either return a value the rest of the program can use as it is, or
raise the ProblemError that becomes a 4xx problem+json answer. Any other exception (msgspec's
UnicodeDecodeError or RecursionError, int()'s ValueError, an OverflowError converting a time
to UTC) would be a 500, and fails these tests.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Literal, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from smsgw.engine.ports import MessageQuery
from smsgw.http.context import decode
from smsgw.http.params import is_message_id, parse_rfc3339, query_decoder, time_range
from smsgw.http.problems import ProblemError
from smsgw.http.routes.batch import decode_batch
from smsgw.http.routes.reports import ListQuery, decode_cursor, encode_cursor, message_query
from smsgw.http.schemas import (
    AccountPatchIn,
    AccountSettingsIn,
    BatchIn,
    BatchItemsIn,
    CreateAccountIn,
    DeliveryReportsIn,
    SendIn,
    TopUpIn,
)

T = TypeVar("T")
BODIES = (SendIn, BatchIn, CreateAccountIn, TopUpIn, AccountPatchIn, AccountSettingsIn)
BODIES += (DeliveryReportsIn,)
# Field names of the request bodies, so that generated objects get past "unknown field".
FIELDS = sorted(
    {f for kind in (*BODIES, BatchItemsIn) for f in kind.__struct_fields__}
    | {"operator_message_id", "status", "error"}
)
# Digits and signs that Python's parsers treat generously.
ODD_DIGITS = "\N{SUPERSCRIPT TWO}\N{ARABIC-INDIC DIGIT THREE}\N{FULLWIDTH DIGIT ONE}_+- .e"
TIME_CHARS = "0123456789-:.+TtZz W" + ODD_DIGITS
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refused_with_4xx(call: Callable[[], T]) -> T | ProblemError:
    """`call()`'s value, or the ProblemError it raised, which must be a 4xx with a detail.
    Any other exception propagates and fails the test."""
    try:
        return call()
    except ProblemError as exc:
        assert 400 <= exc.status < 500, exc.status
        assert exc.detail and exc.code
        return exc


# --- JSON bodies ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["+4915123456789", "hi", "\x00", "http://127.0.0.1/cb", "delivered"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=25,
)


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """Arrays or objects nested up to 50,000 deep, somewhere a body may hold them."""
    depth = draw(st.sampled_from([1, 5, 900, 990, 1_000, 1_100, 5_000, 50_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"to":', b"}"), (b'[{"a":', b"}]")]))
    core = draw(st.sampled_from([b"", b"1", b'"x"', b"[]"]))
    if opener.endswith(b":") and not core:
        core = b"null"
    deep = opener * depth + core + closer * depth
    hole = draw(
        st.sampled_from(
            [
                b"%s",
                b'{"messages": %s}',
                b'{"messages": [%s]}',
                b'{"messages": [{"to": "+4915123456789", "text": "ok"}, %s]}',
                b'{"to": "+4915123456789", "text": %s}',
                b'{"reports": [%s]}',
                b'{"messages": [], "atomic": %s}',
            ]
        )
    )
    return hole.replace(b"%s", deep)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """A JSON body, then up to three changes: bytes that may not be UTF-8 put anywhere (in a
    key, a string, between tokens), a cut, or deep nesting."""
    body = draw(nested()) if draw(st.booleans()) else msgspec.json.encode(draw(json_values))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(body)))
        change = draw(st.sampled_from(["bytes", "cut", "utf8"]))
        if change == "bytes":
            body = body[:at] + draw(st.binary(min_size=1, max_size=4)) + body[at:]
        elif change == "utf8":  # lone continuation bytes, a surrogate, an overlong NUL, 0xff
            odd = draw(st.sampled_from([b"\x80", b"\xed\xa0\x80", b"\xc0\x80", b"\xff", b"\xe9"]))
            body = body[:at] + odd + body[at:]
        else:
            body = body[:at]
    return body


any_body = hostile_bodies() | st.binary(max_size=300)


@FUZZ
@given(body=any_body, kind=st.sampled_from(BODIES))
@example(body=b'{"to": "+4915123456789", "text": "caf\xe9"}', kind=SendIn)
@example(body=b'{"t\xffo": "+4915123456789", "text": "hi"}', kind=SendIn)
@example(body=b"[" * 50_000 + b"]" * 50_000, kind=BatchIn)
@example(body=b'{"messages": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}", kind=BatchIn)
def test_a_body_decodes_as_its_kind_or_is_refused_with_a_4xx(body: bytes, kind: type) -> None:
    value = refused_with_4xx(lambda: decode(body, kind))
    if isinstance(value, ProblemError):
        assert value.status in (400, 422)
    else:
        assert isinstance(value, kind)


@FUZZ
@given(body=any_body)
@example(body=b'{"messages": [{"to": "+4915123456789", "text": "caf\xe9"}]}')
@example(body=b'{"messages": [{"to": "+4915123456789", "text": "ok"}, {"te\xffxt": 1}]}')
@example(body=b'{"messages": [{"to": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}")
def test_a_batch_and_each_of_its_items_decode_or_are_refused_with_a_4xx(body: bytes) -> None:
    batch = refused_with_4xx(lambda: decode_batch(body))
    if isinstance(batch, ProblemError):
        return
    assert isinstance(batch, BatchItemsIn | BatchIn)
    for item in batch.messages:
        if isinstance(item, msgspec.Raw):
            value = refused_with_4xx(lambda: decode(item, SendIn))  # noqa: B023  # called here
            assert isinstance(value, SendIn | ProblemError)
        else:
            assert isinstance(item, SendIn)


@pytest.mark.parametrize(
    ("body", "decoded"),
    [
        (b'{"to": "+4915123456789", "text": "caf\xe9"}', lambda b: decode(b, SendIn)),
        (b'{"to": "+4915123456789", "te\xffxt": "hi"}', lambda b: decode(b, SendIn)),
        # A wrong field before the bad byte: still a 400, the body is not JSON.
        (b'{"nope": 1, "text": "\xff"}', lambda b: decode(b, SendIn)),
        (b'{"messages": [{"to": "+4915123456789", "te\xffxt": "hi"}]}', decode_batch),
        (b'{"messages": [{"to": "+4915123456789", "text": "ok"}, {"x": "\xff"}]}', decode_batch),
    ],
)
def test_a_body_that_is_not_utf8_is_a_400_saying_where(
    body: bytes, decoded: Callable[[bytes], object]
) -> None:
    with pytest.raises(ProblemError) as refused:
        decoded(body)
    assert (refused.value.status, refused.value.code) == (400, "malformed_json")
    first_bad = next(i for i, b in enumerate(body) if b >= 0x80)
    assert f"UTF-8, and byte {first_bad} is not" in refused.value.detail


@given(
    st.builds(
        SendIn,
        to=st.just("+4915123456789"),
        text=st.text(min_size=1, max_size=50),
        client_ref=st.none() | st.text(min_size=1, max_size=10),
        express=st.booleans(),
    )
)
def test_well_formed_bodies_still_decode_to_what_was_sent(message: SendIn) -> None:
    body = msgspec.json.encode(message)
    if "\x00" in message.text or "\x00" in (message.client_ref or ""):
        return  # refused with 422 by design (test_input_edges)
    assert decode(body, SendIn) == message
    batch = decode_batch(msgspec.json.encode({"messages": [message], "atomic": True}))
    assert isinstance(batch, BatchItemsIn)
    assert batch.messages == [message] and batch.atomic


# --- query and path parameters ----------------------------------------------------------------


def assert_422_naming(problem: object, name: str) -> None:
    assert isinstance(problem, ProblemError)
    assert problem.status == 422 and problem.extra["field"] == name, problem.detail


class Query(msgspec.Struct):
    """A query of each kind of parameter the routes take."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=1_000)] = 100
    from_: Annotated[datetime, msgspec.Meta(tz=True)] | None = msgspec.field(
        default=None, name="from"
    )
    to: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    client_ref: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] | None = None
    express: bool | None = None
    group_by: Literal["day", "status"] = "day"


decode_query = query_decoder(Query)


def query(**params: str) -> Query:
    return decode_query(MultiDict(params))


@given(st.text(max_size=12) | st.text(alphabet="0123456789" + ODD_DIGITS, max_size=12))
@example("\N{SUPERSCRIPT TWO}")
@example("1" * 5_000)
@example("0" * 9 + "1")
def test_a_whole_number_is_ascii_digits_in_range_or_422(value: str) -> None:
    got = refused_with_4xx(lambda: query(limit=value).limit)
    if isinstance(got, ProblemError):
        assert_422_naming(got, "limit")
        return
    assert value.isascii() and value.isdigit() and int(value) == got
    assert 1 <= got <= 1_000


@given(st.integers(1, 1_000), st.integers(0, 3))
def test_every_whole_number_in_range_is_taken(number: int, zeros: int) -> None:
    written = "0" * zeros + str(number)
    assert query(limit=written).limit == number
    assert query().limit == 100


def assert_usable_time(at: datetime) -> None:
    """What the store needs of a time: an offset, and a UTC time that is a datetime (years 1
    to 9999, well inside PostgreSQL's 4713 BC to 294276 AD)."""
    assert at.tzinfo is not None and at.utcoffset() is not None
    in_utc = at.astimezone(UTC)
    assert 1 <= in_utc.year <= 9999


@given(st.text(alphabet=TIME_CHARS, max_size=40) | st.text(max_size=40))
@example("0001-01-01T00:00:00+23:59")
@example("9999-12-31T23:59:59-23:59")
@example("2025-W05-1T00:00:00Z")
@example("2025-02-29T00:00:00Z")
@example("2025-01-31T24:00:00Z")
@example("2016-12-31T23:59:60Z")
@example("2025-01-31T00:00:00+00:60")
def test_a_timestamp_is_usable_or_422(value: str) -> None:
    got = refused_with_4xx(lambda: query(**{"from": value}).from_)
    if isinstance(got, ProblemError):
        assert_422_naming(got, "from")
        return
    assert isinstance(got, datetime)
    assert_usable_time(got)
    assert value.isascii()


@given(
    local=st.datetimes(),
    offset_minutes=st.integers(-(24 * 60 - 1), 24 * 60 - 1),
    fraction=st.text(alphabet="0123456789", min_size=0, max_size=9),
    separator=st.sampled_from("Tt "),
)
@example(local=datetime(1, 1, 1), offset_minutes=23 * 60 + 59, fraction="", separator="T")
@example(local=datetime(9999, 12, 31, 23, 59, 59), offset_minutes=-1, fraction="9", separator="T")
def test_rfc3339_is_read_exactly_where_its_utc_time_fits(
    local: datetime, offset_minutes: int, fraction: str, separator: str
) -> None:
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    written = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}{separator}"
        f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}"
        + (f".{fraction}" if fraction else "")
        + (f"{sign}{hours:02d}:{minutes:02d}" if offset_minutes else "Z")
    )
    meant = local.replace(
        microsecond=int(fraction.ljust(6, "0")[:6]),
        tzinfo=timezone(timedelta(minutes=offset_minutes)),
    )
    assert parse_rfc3339(written) == meant
    try:
        meant.astimezone(UTC)
    except OverflowError:
        assert_422_naming(refused_with_4xx(lambda: query(to=written)), "to")
    else:
        assert query(to=written).to == meant


@given(st.text(alphabet=TIME_CHARS, max_size=30), st.text(alphabet=TIME_CHARS, max_size=30))
@example("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00Z")
@example("2025-01-02T00:00:00Z", "2025-01-01T00:00:00Z")
def test_a_time_range_is_ordered_or_422(start: str, end: str) -> None:
    def ordered() -> tuple[datetime | None, datetime | None]:
        got = query(**{"from": start, "to": end})
        return time_range("from", got.from_, "to", got.to)

    got = refused_with_4xx(ordered)
    if isinstance(got, ProblemError):
        assert got.status == 422 and got.extra["field"] in ("from", "to")
        return
    lo, hi = got
    assert lo is not None and hi is not None and lo <= hi


@given(st.text(max_size=120))
@example("a\x00b")
def test_text_is_bounded_and_free_of_nul_or_422(value: str) -> None:
    got = refused_with_4xx(lambda: query(client_ref=value).client_ref)
    if isinstance(got, ProblemError):
        assert_422_naming(got, "client_ref")
        return
    assert got == value and 1 <= len(value) <= 100 and "\x00" not in value


@given(st.text(max_size=40) | st.text(alphabet="ABCDEFabcdef0123456789-_=" + ODD_DIGITS))
@example("\N{ARABIC-INDIC DIGIT THREE}" * 32)
@example("/" * 32)
@example(base64.urlsafe_b64encode(b"\x7f" + b"\xff" * 23).decode().rstrip("="))
def test_a_cursor_is_a_position_or_422(value: str) -> None:
    got = refused_with_4xx(lambda: decode_cursor(value))
    if isinstance(got, ProblemError):
        assert_422_naming(got, "cursor")
        return
    at, message_id = got
    assert_usable_time(at)
    assert is_message_id(message_id)


@given(st.datetimes(timezones=st.just(UTC)), st.uuids())
def test_a_cursor_round_trips(at: datetime, message_id: uuid.UUID) -> None:
    assert decode_cursor(encode_cursor(at, str(message_id))) == (at, str(message_id))


LIST_PARAMS = ("limit", "cursor", "status", "to", "client_ref", "express", "created_from")
LIST_PARAMS += ("created_to",)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(LIST_PARAMS),
        st.text(max_size=30)
        | st.text(alphabet=TIME_CHARS, max_size=30)
        | st.sampled_from(["true", "sent", "+4915123456789", "2025-01-01T00:00:00Z", "10"]),
    )
)
def test_the_list_query_is_usable_or_422(params: dict[str, str]) -> None:
    got = refused_with_4xx(lambda: message_query(query_decoder(ListQuery)(MultiDict(params))))
    if isinstance(got, ProblemError):
        assert got.status == 422 and got.extra["field"] in LIST_PARAMS
        return
    assert isinstance(got, MessageQuery)
    assert 1 <= got.limit <= 1_000
    for at in (got.created_from, got.created_to):
        if at is not None:
            assert_usable_time(at)


class Texts(msgspec.Struct, omit_defaults=True):
    client_ref: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None


@given(
    st.lists(
        st.tuples(st.sampled_from(["client_ref", "from", "to"]) | st.text(max_size=12), st.text()),
        max_size=6,
    )
)
def test_query_parameters_are_known_and_single_or_422(pairs: list[tuple[str, str]]) -> None:
    got = refused_with_4xx(lambda: query_decoder(Texts)(MultiDict(pairs)))
    if isinstance(got, ProblemError):
        assert got.status == 422
        return
    given = dict(pairs)
    assert len(given) == len(pairs) and set(given) <= {"client_ref", "from", "to"}
    assert msgspec.to_builtins(got) == given


@given(st.text(max_size=8))
@example("true")
@example("false")
@example("status")
def test_true_false_and_words_are_taken_as_written_or_422(value: str) -> None:
    got = refused_with_4xx(lambda: query(express=value).express)
    if isinstance(got, ProblemError):
        assert_422_naming(got, "express")
    else:
        assert got is (value == "true") and value in ("true", "false")
    word = refused_with_4xx(lambda: query(group_by=value).group_by)
    if isinstance(word, ProblemError):
        assert_422_naming(word, "group_by")
        assert word.detail == "`group_by` must be day or status"
    else:
        assert word == value in ("day", "status")


@given(st.uuids(), st.booleans(), st.booleans())
def test_message_ids_are_hex_uuids(message_id: uuid.UUID, upper: bool, hyphens: bool) -> None:
    written = str(message_id) if hyphens else message_id.hex
    assert is_message_id(written.upper() if upper else written)
    for odd in (
        "\N{ARABIC-INDIC DIGIT ONE}" * 32,
        "0_" + "0" * 30,
        "{" + "0" * 32 + "}",
        "urn:uuid:" + "0" * 32,
        str(message_id)[:-1],
    ):
        assert not is_message_id(odd)
