"""Delivery receipts from deliver_sm: the text format as SMSCs really write it, and the TLVs."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.connectors.operators.smpp.pdu import DataSm, DeliverSm, NetworkErrorCode, Tlvs
from smsgw.connectors.operators.smpp.receipt import (
    Receipt,
    ReceiptState,
    _matched_fields,
    _standard_fields,
    canonical_message_id,
    parse_receipt,
    receipt_fields,
    receipt_from_pdu,
    receipt_id_candidates,
)


@pytest.mark.parametrize(
    ("text", "message_id", "state", "error"),
    [
        # The spec's own layout.
        (
            "id:0911897980 sub:001 dlvrd:000 submit date:1201121551 done date:1201121551"
            " stat:UNDELIV err:075 text:-PROFILE",
            "0911897980",
            "undelivered",
            "075",
        ),
        # 'Text:' capitalised, a hex id.
        (
            "id:7220304c sub:001 dlvrd:001 submit date:2401121551 done date:2401121552"
            " stat:DELIVRD err:000 Text:Hello wor",
            "7220304c",
            "delivered",
            "000",
        ),
        # Everything upper case.
        (
            "ID:12345 SUB:001 DLVRD:001 SUBMIT DATE:2401121551 DONE DATE:2401121552"
            " STAT:DELIVRD ERR:000 TEXT:hi",
            "12345",
            "delivered",
            "000",
        ),
        # Seconds in the dates, a dash in the id, an empty text.
        (
            "id:abc-123 sub:001 dlvrd:001 submit date:240112155130 done date:240112155245"
            " stat:DELIVRD err:0 text:",
            "abc-123",
            "delivered",
            "0",
        ),
        # No sub, dlvrd or text.
        (
            "id:55 submit date:2401121551 done date:2401121552 stat:EXPIRED err:001",
            "55",
            "expired",
            "001",
        ),
        # Extra spaces everywhere.
        (
            "id: 99887766  sub:001   dlvrd:000 submit date: 2401121551 done date:2401121600"
            "  stat: REJECTD  err: 069 text: x",
            "99887766",
            "rejected",
            "069",
        ),
        # submit_date with an underscore, a 32-hex-digit id.
        (
            "id:0f8e7d6c5b4a39281706f5e4d3c2b1a0 sub:001 dlvrd:000 submit_date:2401121551"
            " done_date:2401121552 stat:UNDELIV err:001 text:",
            "0f8e7d6c5b4a39281706f5e4d3c2b1a0",
            "undelivered",
            "001",
        ),
        # A lower case stat, and a text that looks like fields.
        (
            "id:ff00 sub:1 dlvrd:1 submit date:2401121551 done date:2401121552 stat:delivrd"
            " err:000 text:id:fake stat:REJECTD",
            "ff00",
            "delivered",
            "000",
        ),
        # The long words some SMSCs use.
        ("id:1 stat:DELIVERED err:000", "1", "delivered", "000"),
        ("id:2 stat:UNDELIVERABLE err:034", "2", "undelivered", "034"),
        # Deleted and unknown end the message as undelivered.
        ("id:3 sub:001 dlvrd:000 stat:DELETED err:000 text:", "3", "undelivered", "000"),
        ("id:4 sub:001 dlvrd:000 stat:UNKNOWN err:999 text:", "4", "undelivered", "999"),
        # Accepted and en route: not final yet.
        ("id:5 sub:001 dlvrd:000 stat:ACCEPTD err:000 text:", "5", None, "000"),
        ("id:6 sub:001 dlvrd:000 stat:ENROUTE err:000 text:", "6", None, "000"),
        # A stat this parser does not know: not final, kept as written.
        ("id:7 stat:WEIRD err:12", "7", None, "12"),
    ],
)
def test_receipt_texts(
    text: str, message_id: str, state: ReceiptState | None, error: str | None
) -> None:
    receipt = parse_receipt(text)
    assert receipt is not None
    assert (receipt.message_id, receipt.state, receipt.error) == (message_id, state, error)
    assert receipt.final == (state is not None)


def test_the_fields_of_a_receipt() -> None:
    receipt = parse_receipt(
        "id:0911897980 sub:002 dlvrd:001 submit date:1201121551 done date:120112155233"
        " stat:DELIVRD err:000 text:Hello id:x"
    )
    assert receipt == Receipt(
        message_id="0911897980",
        state="delivered",
        stat="DELIVRD",
        error="000",
        submitted=datetime(2012, 1, 12, 15, 51),
        done=datetime(2012, 1, 12, 15, 52, 33),
        submitted_parts=2,
        delivered_parts=1,
        text="Hello id:x",
    )


def test_broken_dates_and_counts_are_left_out() -> None:
    receipt = parse_receipt("id:1 sub:x dlvrd: submit date:2413991551 done date:12 stat:DELIVRD")
    assert receipt is not None
    assert receipt.submitted is None and receipt.done is None
    assert receipt.submitted_parts is None and receipt.delivered_parts is None


def test_field_names_are_normalised() -> None:
    assert receipt_fields("ID:1 Submit_Date:2401121551 DONE DATE:x Text:a b") == {
        "id": "1",
        "submitdate": "2401121551",
        "donedate": "x",
        "text": "a b",
    }


def test_no_id_is_no_receipt() -> None:
    assert parse_receipt("hello, this is a message from a phone") is None
    assert parse_receipt("stat:DELIVRD err:000") is None


def test_tlvs_win_over_the_text() -> None:
    tlvs = Tlvs(
        receipted_message_id="ABC",
        message_state=2,
        network_error_code=NetworkErrorCode(3, 0x22),
    )
    receipt = parse_receipt("id:999 stat:UNDELIV err:001 text:", tlvs)
    assert receipt is not None
    assert (receipt.message_id, receipt.state, receipt.stat) == ("ABC", "delivered", "DELIVERED")
    assert receipt.error == "001"  # the text's err is still the operator's code
    assert receipt.network_error == NetworkErrorCode(3, 0x22)


@pytest.mark.parametrize(
    ("message_state", "state"),
    [
        (1, None),  # ENROUTE
        (2, "delivered"),
        (3, "expired"),
        (4, "undelivered"),  # DELETED
        (5, "undelivered"),
        (6, None),  # ACCEPTED
        (7, "undelivered"),  # UNKNOWN
        (8, "rejected"),
        (42, None),  # not a state: not final
    ],
)
def test_message_state_alone(message_state: int, state: ReceiptState | None) -> None:
    receipt = parse_receipt("", Tlvs(receipted_message_id="m", message_state=message_state))
    assert receipt is not None
    assert receipt.state == state


def test_receipt_from_a_deliver_sm() -> None:
    text = b"id:42 sub:001 dlvrd:001 submit_date:2401121551 done_date:2401121552 stat:DELIVRD"
    pdu = DeliverSm(sequence_number=1, esm_class=0x04, short_message=text)
    receipt = receipt_from_pdu(pdu)
    assert receipt is not None
    # Read as ASCII, not GSM 03.38, where '_' would be '§' and the dates lost.
    assert (receipt.message_id, receipt.state) == ("42", "delivered")
    assert receipt.submitted == datetime(2024, 1, 12, 15, 51)


def test_receipt_in_message_payload_or_ucs2() -> None:
    text = "id:43 stat:EXPIRED err:000"
    in_payload = DeliverSm(
        sequence_number=1, esm_class=0x04, tlvs=Tlvs(message_payload=text.encode())
    )
    in_ucs2 = DeliverSm(
        sequence_number=2, esm_class=0x04, data_coding=8, short_message=text.encode("utf-16-be")
    )
    data_sm = DataSm(sequence_number=3, esm_class=0x04, tlvs=Tlvs(message_payload=text.encode()))
    for pdu in (in_payload, in_ucs2, data_sm):
        receipt = receipt_from_pdu(pdu)
        assert receipt is not None
        assert (receipt.message_id, receipt.state) == ("43", "expired")


def test_a_message_from_a_phone_is_not_a_receipt() -> None:
    mo = DeliverSm(sequence_number=1, esm_class=0x00, short_message=b"id:1 stat:DELIVRD")
    assert receipt_from_pdu(mo) is None
    # ...unless it has receipted_message_id, as SMSCs that leave esm_class at 0 send it.
    tagged = DeliverSm(sequence_number=1, tlvs=Tlvs(receipted_message_id="9", message_state=2))
    receipt = receipt_from_pdu(tagged)
    assert receipt is not None
    assert receipt.state == "delivered"


def test_message_ids_match_across_hex_and_decimal() -> None:
    # submit_sm_resp said 3039 (hex); the receipt says 12345 (decimal), and the other way round.
    assert canonical_message_id("3039") in receipt_id_candidates("12345")
    assert canonical_message_id("12345") in receipt_id_candidates("3039")
    assert canonical_message_id(" 000ABC ") == "abc"
    assert canonical_message_id("000") == "0"
    assert receipt_id_candidates("0ABC")[0] == "abc"
    assert receipt_id_candidates("abc-1") == ("abc-1",)


# --- the spec's layout, read without the regular expression -----------------------------------

STANDARD = (
    "id:7220304c sub:001 dlvrd:001 submit date:2401121551 done date:2401121552"
    " stat:DELIVRD err:000 text:Hello wor"
)


def test_the_standard_layout_is_cut_not_matched() -> None:
    fields = _standard_fields(STANDARD)
    assert fields == _matched_fields(STANDARD) == receipt_fields(STANDARD)
    assert fields is not None and fields["submitdate"] == "2401121551"
    assert _standard_fields(STANDARD.removesuffix(" text:Hello wor")) is not None


@pytest.mark.parametrize(
    "text",
    [
        STANDARD.replace("text:", "Text:"),
        STANDARD.replace("id:", "ID:"),
        STANDARD.replace("submit date", "submit_date"),
        STANDARD.replace(" sub:", "  sub:"),
        STANDARD.replace("err:000", "err: 000"),
        STANDARD.replace("err:000", "err:"),
        STANDARD.replace("stat:DELIVRD", "stat:DELIV:RD"),
        STANDARD.replace("dlvrd:001", "dlvrd:0\t01"),
        STANDARD.replace("dlvrd:001 ", ""),
        STANDARD + " stat:x",  # in the text: the text field runs to the end
        "id:1 stat:DELIVRD err:000",
        "",
    ],
)
def test_other_layouts_go_to_the_regular_expression(text: str) -> None:
    assert receipt_fields(text) == _matched_fields(text)
    if text != STANDARD + " stat:x":
        assert _standard_fields(text) is None


_value = st.text(alphabet=st.sampled_from(list("0aZ-_:  \t\xa0é")), max_size=4) | st.sampled_from(
    ["1", "DELIVRD", "sub", "text", "err:1", "date", " id", "2401121551"]
)
_separator = st.sampled_from([" ", " ", " ", " ", "  ", "\t", "_", ""])
_NAMES = ("id", "sub", "dlvrd", "submit date", "done date", "stat", "err", "text")


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(_value, min_size=8, max_size=8),
    st.lists(_separator, min_size=8, max_size=8),
    st.integers(6, 8),
)
def test_cutting_reads_what_matching_reads(
    values: list[str], separators: list[str], count: int
) -> None:
    """However a receipt's text is laid out, the fast path reads it as the regular expression
    does, or leaves it to it."""
    text = "".join(
        f"{sep}{name}:{value}"
        for name, sep, value in zip(_NAMES[:count], separators, values, strict=False)
    )
    for candidate in (text, text.lstrip(), "id:x " + text.lstrip()):
        assert receipt_fields(candidate) == _matched_fields(candidate)


def test_dates_are_read_once_per_value() -> None:
    first = parse_receipt(STANDARD)
    second = parse_receipt(STANDARD.replace("7220304c", "7220304d"))
    assert first is not None and second is not None
    assert first.submitted == second.submitted == datetime(2024, 1, 12, 15, 51)
    assert first.submitted is second.submitted
