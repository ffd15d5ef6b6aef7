"""GSM 03.38 / UCS-2 encoding, and splitting a text into the parts sent: as many as are priced."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.connectors.operators.smpp.encoding import (
    DATA_CODING_DEFAULT,
    DATA_CODING_UCS2,
    ESM_CLASS_UDHI,
    GSM7_BASIC,
    GSM7_EXTENSION,
    Method,
    Part,
    decode_short_message,
    gsm7_septets,
    gsm7_text,
    pack_septets,
    split,
    ucs2,
    ucs2_text,
    unpack_septets,
)
from smsgw.engine.sms import is_gsm7, segment_texts, segments

SETTINGS = settings(max_examples=300, deadline=None)

PERSIAN = "س"
EMOJI = "😀"  # U+1F600: the surrogate pair D83D DE00
GSM_CHARS = GSM7_BASIC.replace("\x1b", "")
EXTENSION_CHARS = "".join(GSM7_EXTENSION)


# --- GSM 03.38 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "packed"),
    [
        ("hello", "e8329bfd06"),
        ("hellohello", "e8329bfd4697d9ec37"),
        ("12345678", "31d98c56b3dd70"),  # 8 septets fill 7 octets exactly
        ("@", "00"),
    ],
)
def test_packing_vectors(text: str, packed: str) -> None:
    septets = gsm7_septets(text)
    assert pack_septets(septets).hex() == packed
    assert unpack_septets(bytes.fromhex(packed), len(septets)) == septets
    assert gsm7_text(septets) == text


def test_the_basic_table_is_03_38() -> None:
    assert len(GSM7_BASIC) == 128
    assert gsm7_septets("@£$¥") == bytes([0x00, 0x01, 0x02, 0x03])
    assert gsm7_septets("\nΔ_ ¤") == bytes([0x0A, 0x10, 0x11, 0x20, 0x24])
    assert gsm7_septets("A¡ÄÖÑÜ§¿aäöñüà") == bytes(
        [0x41, 0x40, 0x5B, 0x5C, 0x5D, 0x5E, 0x5F, 0x60, 0x61, 0x7B, 0x7C, 0x7D, 0x7E, 0x7F]
    )


def test_extension_characters_take_an_escape_and_two_septets() -> None:
    assert gsm7_septets("€") == bytes([0x1B, 0x65])
    assert gsm7_septets("[]{}") == bytes([0x1B, 0x3C, 0x1B, 0x3E, 0x1B, 0x28, 0x1B, 0x29])
    assert gsm7_septets("\\~^|\f") == bytes(
        [0x1B, 0x2F, 0x1B, 0x3D, 0x1B, 0x14, 0x1B, 0x40, 0x1B, 0x0A]
    )
    assert all(len(gsm7_septets(c)) == 2 for c in EXTENSION_CHARS)
    assert gsm7_text(gsm7_septets("a€b[c]")) == "a€b[c]"


def test_every_character_is_its_table_septet_alone_or_in_a_text() -> None:
    for septet, c in enumerate(GSM7_BASIC):
        if c != "\x1b":
            assert gsm7_septets(c) == bytes([septet])
    for c, code in GSM7_EXTENSION.items():
        assert gsm7_septets(c) == bytes([0x1B, code])
    every = GSM_CHARS + EXTENSION_CHARS
    assert gsm7_septets(every) == b"".join(gsm7_septets(c) for c in every)
    for outside in ("\x1b", "`", PERSIAN, "a" * 200 + "`"):
        with pytest.raises(KeyError):
            gsm7_septets(outside)


def test_an_escape_before_an_unknown_code_reads_as_the_basic_character() -> None:
    assert gsm7_text(bytes([0x1B, 0x41, 0x62])) == "Ab"
    assert gsm7_text(bytes([0x61, 0x1B])) == "a"


def test_the_encoder_and_the_pricing_agree_on_what_is_gsm7() -> None:
    # Every BMP character (not a lone surrogate): representable here iff sms.py says GSM-7.
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        c = chr(code)
        encodable = c in GSM_CHARS or c in GSM7_EXTENSION
        assert is_gsm7(c) == encodable, hex(code)


gsm_text = st.text(alphabet=st.sampled_from(GSM_CHARS + EXTENSION_CHARS), max_size=400)


@SETTINGS
@given(gsm_text, st.integers(0, 6))
def test_septets_round_trip_packed_and_unpacked(text: str, fill_bits: int) -> None:
    septets = gsm7_septets(text)
    assert gsm7_text(septets) == text
    packed = pack_septets(septets, fill_bits)
    expected_octets = (len(septets) * 7 + fill_bits + 7) // 8 if septets else 0
    assert len(packed) == expected_octets
    assert unpack_septets(packed, len(septets), fill_bits) == septets


def test_unpack_refuses_more_septets_than_the_octets_hold() -> None:
    with pytest.raises(ValueError):
        unpack_septets(b"\x00" * 7, 9)


# --- UCS-2 ----------------------------------------------------------------------------------


def test_ucs2_is_utf16_big_endian_with_surrogate_pairs() -> None:
    assert ucs2("سلام") == bytes.fromhex("0633 0644 0627 0645".replace(" ", ""))
    assert ucs2(EMOJI) == bytes.fromhex("d83dde00")
    assert ucs2_text(bytes.fromhex("0041d83dde00")) == "A" + EMOJI


# --- split: the parts sent ------------------------------------------------------------------


def _udh_payload(part: Part) -> bytes:
    assert part.esm_class == ESM_CLASS_UDHI
    assert part.short_message[0] == 5
    return part.short_message[6:]


def test_161_gsm_characters_are_two_parts_of_153_and_8() -> None:
    parts = split("a" * 161, "udh", ref=0x2A)
    assert len(parts) == 2 == segments("a" * 161)
    assert [part.short_message[:6].hex() for part in parts] == ["0500032a0201", "0500032a0202"]
    assert [len(_udh_payload(part)) for part in parts] == [153, 8]
    assert {part.data_coding for part in parts} == {DATA_CODING_DEFAULT}


def test_71_persian_characters_are_two_parts_of_67_and_4() -> None:
    parts = split(PERSIAN * 71, "udh", ref=7)
    assert len(parts) == 2 == segments(PERSIAN * 71)
    assert [len(_udh_payload(part)) // 2 for part in parts] == [67, 4]
    assert {part.data_coding for part in parts} == {DATA_CODING_UCS2}
    assert all(len(part.short_message) <= 140 for part in parts)


@pytest.mark.parametrize("method", ["udh", "sar", "payload"])
@pytest.mark.parametrize("text", ["a" * 160, PERSIAN * 70, EMOJI * 35, "€" * 80])
def test_a_text_that_fits_one_sms_is_one_plain_part(text: str, method: Method) -> None:
    [part] = split(text, method, ref=1)
    assert part.esm_class == 0
    assert part.tlvs.sar_msg_ref_num is None and part.tlvs.message_payload is None
    assert decode_short_message(part.short_message, part.data_coding) == text


def test_a_part_never_ends_between_an_escape_and_its_character() -> None:
    text = "a" * 152 + "€" + "b" * 10  # 152 + 2 septets: the '€' cannot fit the first part
    first, second = (_udh_payload(p) for p in split(text, "udh"))
    assert first == b"a" * 152
    assert second[:2] == bytes([0x1B, 0x65])


def test_a_part_never_cuts_a_surrogate_pair() -> None:
    text = PERSIAN * 66 + EMOJI + PERSIAN * 10  # the emoji's two units do not fit 66 + 2
    parts = split(text, "udh")
    assert len(parts) == 2
    for part in parts:
        _udh_payload(part).decode("utf-16-be")  # strict: a lone surrogate would raise
    assert _udh_payload(parts[1])[:4] == bytes.fromhex("d83dde00")


def test_sar_parts_carry_the_reference_in_tlvs() -> None:
    parts = split("x" * 400, "sar", ref=0xBEEF)
    assert [(p.tlvs.sar_segment_seqnum, p.tlvs.sar_total_segments) for p in parts] == [
        (1, 3),
        (2, 3),
        (3, 3),
    ]
    assert {p.tlvs.sar_msg_ref_num for p in parts} == {0xBEEF}
    assert [len(p.short_message) for p in parts] == [153, 153, 94]
    assert {p.esm_class for p in parts} == {0}


def test_payload_is_one_pdu_with_the_whole_text() -> None:
    text = "ü" * 200 + "€"
    [part] = split(text, "payload")
    assert part.short_message == b""
    assert part.tlvs.message_payload is not None
    assert gsm7_text(part.tlvs.message_payload) == text


def test_packed_parts_start_on_a_septet_boundary_after_the_udh() -> None:
    text = "The quick brown fox " * 10  # 200 characters
    parts = split(text, "udh", ref=3, packed=True)
    assert [len(p.short_message) for p in parts] == [140, 6 + (1 + 47 * 7 + 7) // 8]
    first = unpack_septets(parts[0].short_message[6:], 153, fill_bits=1)
    assert gsm7_text(first) == text[:153]


def test_split_refuses_what_it_cannot_send() -> None:
    with pytest.raises(ValueError):
        split("")
    with pytest.raises(ValueError):
        split("a" * 200, "udh", ref=256)
    with pytest.raises(ValueError):
        split("a" * 200, "sar", ref=0x10000)
    with pytest.raises(ValueError):
        split("a" * 153 * 256, "udh")


def test_decode_short_message_drops_the_udh() -> None:
    part = split("a" * 150 + PERSIAN * 100, "udh")[0]
    text = decode_short_message(part.short_message, part.data_coding, part.esm_class)
    assert text == "a" * 67
    assert decode_short_message(b"caf\xe9", 3) == "café"


# --- the parts sent are the segments priced -------------------------------------------------

any_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(GSM_CHARS),
        st.sampled_from(EXTENSION_CHARS),
        st.sampled_from("سلامبه"),
        st.sampled_from([EMOJI, "🚀", "𝄞"]),
        st.characters(codec="utf-8"),
    ),
    min_size=1,
    max_size=1_200,
)


@SETTINGS
@given(any_text, st.sampled_from(["udh", "sar"]))
def test_parts_sent_equal_segments_priced(text: str, method: Method) -> None:
    parts = split(text, method, ref=9)
    assert len(parts) == segments(text)
    gsm = is_gsm7(text)
    single, multi = (160, 153) if gsm else (70, 67)
    budget = single if len(parts) == 1 else multi
    texts = []
    for part in parts:
        raw = part.short_message[6:] if part.esm_class & ESM_CLASS_UDHI else part.short_message
        assert (len(raw) if gsm else len(raw) // 2) <= budget  # septets or UTF-16 code units
        # Each part decodes on its own: no escape or surrogate pair is cut in two.
        texts.append(decode_short_message(raw, part.data_coding))
    assert "".join(texts) == text


@SETTINGS
@given(any_text, st.sampled_from(["udh", "sar"]))
def test_packed_parts_fit_140_octets(text: str, method: Method) -> None:
    parts = split(text, method, ref=9, packed=True)
    assert len(parts) == segments(text)
    assert all(len(part.short_message) <= 140 for part in parts)


@SETTINGS
@given(any_text)
def test_segment_texts_are_the_text_cut_in_order(text: str) -> None:
    assert "".join(segment_texts(text)) == text


@SETTINGS
@given(any_text)
def test_payload_carries_the_whole_text_in_one_pdu(text: str) -> None:
    [part] = split(text, "payload")
    data = part.tlvs.message_payload if segments(text) > 1 else part.short_message
    assert data is not None
    assert decode_short_message(data, part.data_coding) == text
