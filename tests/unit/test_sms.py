"""SMS rules: segment counting (GSM-7 and UCS-2), recipient and sender validation, pricing."""

from __future__ import annotations

import math
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.engine.sms import is_gsm7, price, recipient_problem, segments, sender_problem

SETTINGS = settings(max_examples=200, deadline=None)

PERSIAN = "س"
EMOJI = "😀"  # outside the BMP: a surrogate pair, two UTF-16 code units
GSM_BASIC = string.ascii_letters + string.digits + " .,!?@£$¥èé\n"
GSM_EXTENSION = "^{}\\[~]|€"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("a", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),
        ("€" * 81, 2),
        ("[" * 80, 1),
        ("[" * 81, 2),
        ("a" * 159 + "€", 2),  # 161 septets
        (PERSIAN * 70, 1),
        (PERSIAN * 71, 2),
        (PERSIAN * 134, 2),
        (PERSIAN * 135, 3),
        ("a" * 69 + PERSIAN, 1),  # one non-GSM character makes the whole text UCS-2
        ("a" * 70 + PERSIAN, 2),
        (EMOJI * 35, 1),  # 70 code units
        (EMOJI * 36, 2),  # 72 code units
    ],
)
def test_segments(text: str, expected: int) -> None:
    assert segments(text) == expected


def test_a_part_never_splits_an_escape_from_its_character() -> None:
    # 152 + 2 + 152 = 306 septets would fit two parts of 153 only by splitting the '€'.
    assert segments("a" * 152 + "€" + "a" * 152) == 3
    # 76 '€' fill 152 of a part's 153 septets: the 77th starts the next part.
    assert segments("€" * 152) == 2
    assert segments("€" * 153) == 3


def test_a_part_never_splits_a_surrogate_pair() -> None:
    # 66 + 2 + 66 = 134 code units would fit two parts of 67 only by splitting the emoji.
    assert segments(PERSIAN * 66 + EMOJI + PERSIAN * 66) == 3
    # 33 emoji fill 66 of a part's 67 code units.
    assert segments(EMOJI * 66) == 2
    assert segments(EMOJI * 67) == 3


def test_is_gsm7() -> None:
    assert is_gsm7("Hello, world! @£$ €[]")
    assert is_gsm7("")
    assert not is_gsm7(PERSIAN)
    assert not is_gsm7("hello " + EMOJI)


any_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(GSM_BASIC),
        st.sampled_from(GSM_EXTENSION),
        st.sampled_from("سلام"),
        st.sampled_from([EMOJI, "🚀", "𝄞"]),
        st.characters(codec="utf-8"),
    ),
    max_size=400,
)


@SETTINGS
@given(any_text)
def test_segments_never_drop_as_text_grows(text: str) -> None:
    counts = [segments(text[:i]) for i in range(len(text) + 1)]
    assert counts == sorted(counts)
    assert (counts[-1] == 0) == (text == "")


@SETTINGS
@given(st.text(alphabet=GSM_BASIC, min_size=161, max_size=1_600))
def test_gsm_text_beyond_one_sms_takes_ceil_n_over_153(text: str) -> None:
    assert segments(text) == math.ceil(len(text) / 153)


@SETTINGS
@given(st.text(alphabet=GSM_BASIC, min_size=1, max_size=160))
def test_gsm_text_up_to_160_is_one_sms(text: str) -> None:
    assert segments(text) == 1


@SETTINGS
@given(st.text(alphabet="سلامبه", min_size=71, max_size=700))
def test_ucs2_text_beyond_one_sms_takes_ceil_n_over_67(text: str) -> None:
    assert segments(text) == math.ceil(len(text) / 67)


@SETTINGS
@given(any_text)
def test_every_part_fits_its_budget(text: str) -> None:
    # A lower bound no packing can beat: the units divided by a part's capacity.
    gsm = is_gsm7(text)
    units = sum(
        (2 if c in GSM_EXTENSION or c == "\f" else 1) if gsm else (2 if ord(c) > 0xFFFF else 1)
        for c in text
    )
    single, part = (160, 153) if gsm else (70, 67)
    n = segments(text)
    if units == 0:
        assert n == 0
    elif units <= single:
        assert n == 1
    else:
        assert n >= math.ceil(units / part)
        # Greedy packing wastes at most one unit per part (a two-unit character that does not
        # fit in the last unit).
        assert n <= math.ceil(units / (part - 1))


@pytest.mark.parametrize("to", ["+4915123456789", "+12025550123", "+4412345", "+123456789012345"])
def test_valid_recipients(to: str) -> None:
    assert recipient_problem(to) is None


@pytest.mark.parametrize(
    "to",
    [
        "12345",
        "+0123",
        "+0123456789",
        "+49 151",
        "+49 15123456789",
        "+1234567890123456",  # 16 digits: one more than E.164 allows
        "+123456",  # 6 digits: too short
        "",
        "+",
        "+49-151-23456789",
        "+١٢٣٤٥٦٧٨٩",  # Arabic-Indic digits are not ASCII digits
    ],
)
def test_invalid_recipients(to: str) -> None:
    problem = recipient_problem(to)
    assert isinstance(problem, str)
    assert "E.164" in problem


def test_a_trailing_newline_is_not_a_valid_recipient() -> None:
    assert recipient_problem("+4915123456789\n") is not None


@pytest.mark.parametrize(
    "sender",
    ["ACME", "ABCDEFGHIJK", "Acme Ltd.", "a_b-c", "123456789012345", "+4915123456789", "1"],
)
def test_valid_senders(sender: str) -> None:
    assert sender_problem(sender) is None


@pytest.mark.parametrize(
    "sender", ["ABCDEFGHIJKL", "1234567890123456", "", "ACME!", "Ünïcode", "A\tB", "+"]
)
def test_invalid_senders(sender: str) -> None:
    problem = sender_problem(sender)
    assert isinstance(problem, str)
    assert problem


def test_a_trailing_newline_is_not_a_valid_sender() -> None:
    assert sender_problem("ACME\n") is not None


@SETTINGS
@given(
    st.integers(min_value=0, max_value=20),
    st.booleans(),
    st.integers(min_value=0, max_value=1_000),
    st.integers(min_value=0, max_value=1_000),
)
def test_price_is_segments_times_the_lane_price(
    count: int, express: bool, normal_price: int, express_price: int
) -> None:
    charged = price(count, express=express, normal_price=normal_price, express_price=express_price)
    assert charged == count * (express_price if express else normal_price)


def test_price_examples() -> None:
    assert price(3, express=False, normal_price=5, express_price=12) == 15
    assert price(3, express=True, normal_price=5, express_price=12) == 36
    assert price(0, express=True, normal_price=5, express_price=12) == 0
