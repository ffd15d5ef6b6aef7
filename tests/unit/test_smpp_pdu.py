"""SMPP PDU codec: byte-exact vectors, round trips, decode errors, and PduReader framing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.connectors.operators.smpp.pdu import (
    MAX_PDU_LENGTH,
    MAX_SEQUENCE_NUMBER,
    BindReceiver,
    BindReceiverResp,
    BindTransceiver,
    BindTransceiverResp,
    BindTransmitter,
    BindTransmitterResp,
    DataSm,
    DataSmResp,
    DeliverSm,
    DeliverSmResp,
    EnquireLink,
    EnquireLinkResp,
    FramingError,
    GenericNack,
    NetworkErrorCode,
    Pdu,
    PduError,
    PduReader,
    SubmitSm,
    SubmitSmResp,
    Tlv,
    Tlvs,
    Unbind,
    UnbindResp,
    _decode_by_layout,
    _encode_by_layout,
    address_field,
    decode,
    encode,
    next_sequence_number,
    submit_sm_frame,
    submit_sm_registered_delivery,
)
from smsgw.connectors.operators.smpp.status import CommandStatus as S

SETTINGS = settings(max_examples=200, deadline=None)


def h(layout: str) -> bytes:
    """Hex laid out like the spec's field tables: one field a line, a note after '#'."""
    return bytes.fromhex("".join(line.split("#")[0] for line in layout.splitlines()))


# --- byte-exact vectors, written by hand from the spec's field tables ------------------------

ENQUIRE_LINK = h("00000010 00000015 00000000 00000007")
ENQUIRE_LINK_RESP = h("00000010 80000015 00000000 00000007")
GENERIC_NACK = h("00000010 80000000 00000003 00000009")
BIND_TRANSMITTER = h(
    """
    0000002F 00000002 00000000 00000001     # length 47, bind_transmitter, status, sequence 1
    534D5050335445535400                    # system_id "SMPP3TEST"
    7365637265743038 00                     # password "secret08"
    5355424D49543100                        # system_type "SUBMIT1"
    34                                      # interface_version 3.4
    01 01                                   # addr_ton, addr_npi
    00                                      # address_range ""
    """
)
BIND_TRANSMITTER_RESP = h(
    """
    00000015 80000002 00000000 00000001
    534D534300                              # system_id "SMSC"
    """
)
SUBMIT_SM = h(
    """
    00000034 00000004 00000000 00000002     # length 52, submit_sm, status, sequence 2
    00                                      # service_type ""
    05 00 41434D4500                        # source: TON 5 NPI 0 "ACME"
    01 01 3439313531323334353637383900      # destination: TON 1 NPI 1 "4915123456789"
    00 00 00                                # esm_class, protocol_id, priority_flag
    00 00                                   # schedule_delivery_time "", validity_period ""
    01 00 00 00                             # registered_delivery 1, replace, coding, default
    02 6869                                 # sm_length 2, "hi"
    """
)
SUBMIT_SM_RESP = h(
    """
    00000017 80000004 00000000 00000002
    61626331323300                          # message_id "abc123"
    """
)
DELIVER_SM_RECEIPT = h(
    """
    0000003E 00000005 00000000 0000000B     # length 62, deliver_sm, status, sequence 11
    00                                      # service_type ""
    01 01 343931353100                      # source: TON 1 NPI 1 "49151"
    05 00 41434D4500                        # destination: TON 5 NPI 0 "ACME"
    04 00 00                                # esm_class: SMSC delivery receipt
    00 00                                   # schedule_delivery_time, validity_period
    00 00 00 00                             # registered_delivery, replace, coding, default
    00                                      # sm_length 0
    001E 0004 61626300                      # receipted_message_id "abc"
    0427 0001 02                            # message_state DELIVERED
    0423 0003 03 0000                       # network_error_code: GSM, 0
    """
)
THROTTLED_SUBMIT_SM_RESP = h("00000010 80000004 00000058 00000003")  # no body on error


def test_the_vectors_say_their_own_length() -> None:
    for frame in (BIND_TRANSMITTER, SUBMIT_SM, SUBMIT_SM_RESP, DELIVER_SM_RECEIPT):
        assert int.from_bytes(frame[:4], "big") == len(frame)


def test_enquire_link_and_generic_nack_byte_for_byte() -> None:
    assert encode(EnquireLink(sequence_number=7)) == ENQUIRE_LINK
    assert encode(EnquireLinkResp(sequence_number=7)) == ENQUIRE_LINK_RESP
    assert decode(ENQUIRE_LINK) == EnquireLink(sequence_number=7)
    nack = GenericNack(sequence_number=9, command_status=S.ESME_RINVCMDID)
    assert encode(nack) == GENERIC_NACK
    assert decode(GENERIC_NACK) == nack


def test_bind_transmitter_byte_for_byte() -> None:
    bind = BindTransmitter(
        sequence_number=1,
        system_id="SMPP3TEST",
        password="secret08",
        system_type="SUBMIT1",
        addr_ton=1,
        addr_npi=1,
    )
    assert encode(bind) == BIND_TRANSMITTER
    assert decode(BIND_TRANSMITTER) == bind
    resp = BindTransmitterResp(sequence_number=1, system_id="SMSC")
    assert encode(resp) == BIND_TRANSMITTER_RESP
    assert decode(BIND_TRANSMITTER_RESP) == resp


def test_submit_sm_and_its_response_byte_for_byte() -> None:
    submit = SubmitSm(
        sequence_number=2,
        source_addr_ton=5,
        source_addr="ACME",
        dest_addr_ton=1,
        dest_addr_npi=1,
        destination_addr="4915123456789",
        registered_delivery=1,
        short_message=b"hi",
    )
    assert encode(submit) == SUBMIT_SM
    assert decode(SUBMIT_SM) == submit
    assert encode(SubmitSmResp(sequence_number=2, message_id="abc123")) == SUBMIT_SM_RESP
    assert decode(SUBMIT_SM_RESP) == SubmitSmResp(sequence_number=2, message_id="abc123")


def test_deliver_sm_receipt_with_tlvs_byte_for_byte() -> None:
    deliver = DeliverSm(
        sequence_number=11,
        source_addr_ton=1,
        source_addr_npi=1,
        source_addr="49151",
        dest_addr_ton=5,
        destination_addr="ACME",
        esm_class=0x04,
        tlvs=Tlvs(
            receipted_message_id="abc", message_state=2, network_error_code=NetworkErrorCode(3, 0)
        ),
    )
    assert decode(DELIVER_SM_RECEIPT) == deliver
    assert encode(deliver) == DELIVER_SM_RECEIPT


def test_an_error_response_has_no_body_either_way() -> None:
    throttled = SubmitSmResp(sequence_number=3, command_status=S.ESME_RTHROTTLED)
    assert encode(throttled) == THROTTLED_SUBMIT_SM_RESP
    assert decode(THROTTLED_SUBMIT_SM_RESP) == throttled
    # The message_id an error response cannot carry is not sent.
    assert encode(
        SubmitSmResp(sequence_number=3, command_status=S.ESME_RTHROTTLED, message_id="x")
    ) == (THROTTLED_SUBMIT_SM_RESP)
    # A bind refused: no system_id.
    refused = h("00000010 80000009 0000000E 00000001")
    assert decode(refused) == BindTransceiverResp(
        sequence_number=1, command_status=S.ESME_RINVPASWD
    )


# --- round trips ----------------------------------------------------------------------------

_SAR = Tlvs(sar_msg_ref_num=0xBEEF, sar_total_segments=3, sar_segment_seqnum=2)
EVERY_PDU: list[Pdu] = [
    BindTransmitter(sequence_number=1, system_id="a" * 15, password="p" * 8, system_type="t"),
    BindReceiver(sequence_number=2, system_id="rx", address_range="^49.*" + "9" * 35),
    BindTransceiver(sequence_number=3, system_id="trx", addr_ton=1, addr_npi=1),
    BindTransmitterResp(sequence_number=1, system_id="SMSC"),
    BindReceiverResp(sequence_number=2, system_id="SMSC", tlvs=Tlvs(sc_interface_version=0x34)),
    BindTransceiverResp(sequence_number=3, system_id="S" * 15),
    Unbind(sequence_number=4),
    UnbindResp(sequence_number=4),
    EnquireLink(sequence_number=MAX_SEQUENCE_NUMBER),
    EnquireLinkResp(sequence_number=MAX_SEQUENCE_NUMBER),
    GenericNack(sequence_number=5, command_status=S.ESME_RINVCMDLEN),
    SubmitSm(
        sequence_number=6,
        service_type="CMT",
        source_addr="4915123456789",
        destination_addr="9" * 20,
        esm_class=0x40,
        schedule_delivery_time="240112155130004+",
        validity_period="000001000000000R",
        data_coding=8,
        short_message=bytes(range(254)),
        tlvs=_SAR,
    ),
    SubmitSm(sequence_number=7, tlvs=Tlvs(message_payload=b"\x00" * 5000)),
    SubmitSmResp(sequence_number=6, message_id="f" * 64),
    SubmitSmResp(sequence_number=7, command_status=S.ESME_RMSGQFUL),
    DeliverSm(sequence_number=8, esm_class=4, short_message=b"id:1 stat:DELIVRD"),
    DeliverSmResp(sequence_number=8),
    DeliverSmResp(sequence_number=9, command_status=S.ESME_RX_T_APPN),
    DataSm(
        sequence_number=10,
        source_addr="1" * 64,
        destination_addr="2" * 64,
        data_coding=8,
        tlvs=Tlvs(message_payload="سلام".encode("utf-16-be"), other=(Tlv(0x1401, b"\x01"),)),
    ),
    DataSmResp(sequence_number=10, message_id="m"),
]


@pytest.mark.parametrize("pdu", EVERY_PDU, ids=lambda pdu: type(pdu).__name__)
def test_every_pdu_round_trips(pdu: Pdu) -> None:
    assert decode(encode(pdu)) == pdu


def test_every_pdu_kind_is_in_the_round_trip() -> None:
    kinds = {type(pdu) for pdu in EVERY_PDU}
    assert len(kinds) == 17


def test_unknown_tlvs_are_kept_in_order() -> None:
    other = (Tlv(0x1500, b"vendor"), Tlv(0x0005, b"\x01"), Tlv(0x1501, b""))
    pdu = DeliverSm(sequence_number=1, tlvs=Tlvs(message_state=5, other=other))
    assert decode(encode(pdu)).tlvs.other == other  # type: ignore[attr-defined]


def test_a_receipted_message_id_without_its_nul_is_read() -> None:
    frame = encode(DeliverSm(sequence_number=1))
    tlv = h("001E 0003 616263")  # no terminating NUL, as some SMSCs send it
    frame = (len(frame) + len(tlv)).to_bytes(4, "big") + frame[4:] + tlv
    assert decode(frame).tlvs.receipted_message_id == "abc"  # type: ignore[attr-defined]


_cstr = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0xFF))
_octet = st.integers(0, 255)
_tlvs = st.builds(
    Tlvs,
    sar_msg_ref_num=st.none() | st.integers(0, 0xFFFF),
    sar_total_segments=st.none() | _octet,
    sar_segment_seqnum=st.none() | _octet,
    message_payload=st.none() | st.binary(max_size=300),
    receipted_message_id=st.none() | _cstr.filter(lambda s: len(s) <= 64),
    message_state=st.none() | _octet,
    network_error_code=st.none() | st.builds(NetworkErrorCode, _octet, st.integers(0, 0xFFFF)),
    sc_interface_version=st.none() | _octet,
    other=st.lists(
        st.builds(Tlv, st.integers(0x1400, 0x3FFF), st.binary(max_size=20)), max_size=3
    ).map(tuple),
)


@SETTINGS
@given(
    st.builds(
        SubmitSm,
        sequence_number=st.integers(1, MAX_SEQUENCE_NUMBER),
        service_type=_cstr.filter(lambda s: len(s) <= 5),
        source_addr_ton=_octet,
        source_addr=_cstr.filter(lambda s: len(s) <= 20),
        destination_addr=_cstr.filter(lambda s: len(s) <= 20),
        esm_class=_octet,
        data_coding=_octet,
        validity_period=_cstr.filter(lambda s: len(s) <= 16),
        short_message=st.binary(max_size=254),
        tlvs=_tlvs,
    )
)
def test_any_submit_sm_round_trips(pdu: SubmitSm) -> None:
    assert decode(encode(pdu)) == pdu


# --- what encode refuses --------------------------------------------------------------------


@pytest.mark.parametrize(
    "pdu",
    [
        BindTransmitter(sequence_number=1, system_id="a" * 16),  # 15 characters and the NUL
        BindTransmitter(sequence_number=1, password="p" * 9),
        SubmitSm(sequence_number=1, destination_addr="1" * 21),
        SubmitSm(sequence_number=1, source_addr="Ünïcødé€"),  # not Latin-1
        SubmitSm(sequence_number=1, source_addr="a\0b"),
        SubmitSm(sequence_number=1, esm_class=256),
        SubmitSm(sequence_number=1, short_message=b"x" * 255),
        SubmitSm(sequence_number=1, tlvs=Tlvs(sar_msg_ref_num=0x10000)),
        DeliverSm(sequence_number=1, tlvs=Tlvs(network_error_code=NetworkErrorCode(3, 0x10000))),
        SubmitSm(sequence_number=1, tlvs=Tlvs(message_payload=b"x" * 0x10000)),
        EnquireLink(sequence_number=2**32),
    ],
)
def test_encode_refuses_a_field_out_of_range(pdu: Pdu) -> None:
    with pytest.raises(ValueError):
        encode(pdu)


# --- what decode refuses, and the status to answer with --------------------------------------


def _with_body(command_id: int, body: bytes, sequence_number: int = 42) -> bytes:
    header = (16 + len(body), command_id, 0, sequence_number)
    return b"".join(n.to_bytes(4, "big") for n in header) + body


_SUBMIT_BODY = SUBMIT_SM[16:]


@pytest.mark.parametrize(
    ("frame", "status"),
    [
        (_with_body(0x00000003, b""), S.ESME_RINVCMDID),  # query_sm: not spoken here
        (_with_body(0x12345678, b""), S.ESME_RINVCMDID),
        (_with_body(0x00000015, b"\x00"), S.ESME_RINVCMDLEN),  # enquire_link has no body
        (_with_body(0x00000004, _SUBMIT_BODY[:10]), S.ESME_RINVCMDLEN),  # cut in a field
        (_with_body(0x00000004, _SUBMIT_BODY[:-1]), S.ESME_RINVMSGLEN),  # sm_length too long
        (_with_body(0x00000004, b"\x00\x05\x00" + b"A" * 30 + b"\x00"), S.ESME_RINVSRCADR),
        (_with_body(0x00000004, b"CMTCMTCMT\x00"), S.ESME_RINVSERTYP),
        (_with_body(0x00000004, _SUBMIT_BODY + h("0424")), S.ESME_RINVOPTPARSTREAM),
        (_with_body(0x00000004, _SUBMIT_BODY + h("0424 0010 00")), S.ESME_RINVOPTPARSTREAM),
        (_with_body(0x00000004, _SUBMIT_BODY + h("0427 0002 0001")), S.ESME_RINVPARLEN),
        (_with_body(0x00000002, b"x" * 20 + b"\x00"), S.ESME_RINVSYSID),
    ],
)
def test_decode_errors_carry_the_status_and_sequence_number(frame: bytes, status: int) -> None:
    with pytest.raises(PduError) as caught:
        decode(frame)
    assert caught.value.status == status
    assert caught.value.sequence_number == 42
    assert caught.value.command_id == int.from_bytes(frame[4:8], "big")


def test_decode_refuses_a_frame_whose_length_disagrees() -> None:
    with pytest.raises(PduError) as caught:
        decode(ENQUIRE_LINK + b"\x00")
    assert caught.value.status == S.ESME_RINVCMDLEN
    with pytest.raises(PduError):
        decode(ENQUIRE_LINK[:12])


# --- PduReader ------------------------------------------------------------------------------


def test_reader_waits_for_a_whole_frame_fed_an_octet_at_a_time() -> None:
    reader = PduReader()
    got: list[Pdu] = []
    for i in range(len(SUBMIT_SM)):
        reader.feed(SUBMIT_SM[i : i + 1])
        got.extend(reader)
        assert got == [] or i == len(SUBMIT_SM) - 1
    assert got == [decode(SUBMIT_SM)]
    assert reader.buffered == 0


def test_reader_cuts_concatenated_frames() -> None:
    reader = PduReader()
    reader.feed(ENQUIRE_LINK + SUBMIT_SM + DELIVER_SM_RECEIPT + ENQUIRE_LINK_RESP[:9])
    assert [type(pdu) for pdu in reader] == [EnquireLink, SubmitSm, DeliverSm]
    assert reader.buffered == 9
    reader.feed(ENQUIRE_LINK_RESP[9:])
    assert reader.next_pdu() == EnquireLinkResp(sequence_number=7)
    assert reader.next_pdu() is None


@SETTINGS
@given(
    st.lists(st.sampled_from(EVERY_PDU), min_size=1, max_size=12),
    st.lists(st.integers(1, 400), min_size=1, max_size=50),
)
def test_reader_returns_the_same_pdus_however_the_stream_is_cut(
    pdus: list[Pdu], cuts: list[int]
) -> None:
    stream = b"".join(encode(pdu) for pdu in pdus)
    reader = PduReader()
    got: list[Pdu] = []
    pos = 0
    for size in cuts * (len(stream) // sum(cuts) + 1):
        reader.feed(stream[pos : pos + size])
        pos += size
        got.extend(reader)
        if pos >= len(stream):
            break
    assert got == pdus


def test_reader_skips_a_malformed_frame_and_goes_on() -> None:
    unknown = _with_body(0x00000102, b"\x00" * 4, sequence_number=5)  # alert_notification
    reader = PduReader()
    reader.feed(ENQUIRE_LINK + unknown + ENQUIRE_LINK_RESP)
    assert reader.next_pdu() == EnquireLink(sequence_number=7)
    with pytest.raises(PduError) as caught:
        reader.next_pdu()
    assert not isinstance(caught.value, FramingError)
    assert (caught.value.status, caught.value.sequence_number) == (S.ESME_RINVCMDID, 5)
    assert reader.next_pdu() == EnquireLinkResp(sequence_number=7)


@pytest.mark.parametrize(
    ("length", "sequence_number"), [(MAX_PDU_LENGTH + 1, 7), (0xFFFFFFFF, 7), (8, None), (0, None)]
)
def test_reader_refuses_an_absurd_command_length_for_good(
    length: int, sequence_number: int | None
) -> None:
    reader = PduReader()
    reader.feed(length.to_bytes(4, "big") + ENQUIRE_LINK[4:] + ENQUIRE_LINK)
    with pytest.raises(FramingError) as caught:
        reader.next_pdu()
    assert caught.value.status == S.ESME_RINVCMDLEN
    assert caught.value.sequence_number == sequence_number
    assert "command_length" in str(caught.value)
    with pytest.raises(FramingError):  # the frame boundaries are lost: no PDU after it
        reader.next_pdu()


def test_reader_takes_a_largest_pdu_without_error() -> None:
    big = SubmitSm(sequence_number=1, tlvs=Tlvs(message_payload=b"x" * 0xFFFF))
    reader = PduReader()
    reader.feed(encode(big))
    assert reader.next_pdu() == big


def test_sequence_numbers_wrap_within_the_spec_range() -> None:
    assert next_sequence_number(0) == 1
    assert next_sequence_number(1) == 2
    assert next_sequence_number(MAX_SEQUENCE_NUMBER - 1) == MAX_SEQUENCE_NUMBER
    assert next_sequence_number(MAX_SEQUENCE_NUMBER) == 1


# --- the fast paths read and write what the layouts do -----------------------------------------

_any_short_message = st.one_of(
    *(
        st.builds(
            cls,
            sequence_number=st.integers(0, 0xFFFFFFFF),
            command_status=st.sampled_from([0, 0, 0x58, 0xFFFFFFFF]),
            service_type=_cstr.filter(lambda s: len(s) <= 6),
            source_addr_ton=st.integers(0, 256),
            source_addr_npi=_octet,
            source_addr=_cstr.filter(lambda s: len(s) <= 21) | st.just("Ü€\0"),
            dest_addr_npi=_octet,
            destination_addr=_cstr.filter(lambda s: len(s) <= 21),
            esm_class=_octet,
            priority_flag=_octet,
            schedule_delivery_time=_cstr.filter(lambda s: len(s) <= 17),
            validity_period=_cstr.filter(lambda s: len(s) <= 17),
            registered_delivery=_octet,
            data_coding=_octet,
            sm_default_msg_id=_octet,
            short_message=st.binary(max_size=256),
            tlvs=st.just(Tlvs()) | _tlvs,
        )
        for cls in (SubmitSm, DeliverSm)
    )
)
_any_message_id_resp = st.one_of(
    *(
        st.builds(
            cls,
            sequence_number=st.integers(0, 0xFFFFFFFF),
            command_status=st.sampled_from([0, 0, 0x58]),
            message_id=_cstr.filter(lambda s: len(s) <= 65) | st.just("€"),
            tlvs=st.just(Tlvs()) | _tlvs,
        )
        for cls in (SubmitSmResp, DeliverSmResp, DataSmResp)
    )
)


def _outcome(call: Callable[[], object]) -> object:
    """What a call returns, or the error it raises, in a form to compare."""
    try:
        return call()
    except PduError as exc:
        return (type(exc), exc.status, exc.sequence_number, exc.command_id, str(exc))
    except ValueError as exc:
        return (ValueError, str(exc))


@SETTINGS
@given(_any_short_message | _any_message_id_resp)
def test_fast_encoding_writes_what_the_layout_writes(pdu: Pdu) -> None:
    assert _outcome(lambda: encode(pdu)) == _outcome(lambda: _encode_by_layout(pdu))


def _damaged(pdu: Pdu, damage: list[tuple[int, int]], cut: int) -> bytes | None:
    """`pdu`'s frame with the octets at `damage` overwritten and `cut` octets off its end
    (its length field made to match); None when the layout cannot encode it."""
    try:
        frame = bytearray(_encode_by_layout(pdu))
    except ValueError:
        return None
    for at, octet in damage:
        if at < len(frame):
            frame[at] = octet
    del frame[max(16, len(frame) - cut) :]
    frame[:4] = len(frame).to_bytes(4, "big")
    return bytes(frame)


@SETTINGS
@given(
    _any_short_message | _any_message_id_resp,
    st.lists(st.tuples(st.integers(16, 400), st.integers(0, 255)), max_size=3),
    st.integers(0, 30),
)
def test_fast_decoding_reads_what_the_layout_reads(
    pdu: Pdu, damage: list[tuple[int, int]], cut: int
) -> None:
    """Whole, damaged or cut short, a frame decodes as the layout reads it, or fails alike."""
    whole = _damaged(pdu, damage, cut)
    if whole is None:
        return
    cls = type(pdu)
    by_layout = _outcome(
        lambda: _decode_by_layout(cls, whole, pdu.command_status, pdu.sequence_number)
    )
    assert _outcome(lambda: decode(whole)) == by_layout


@SETTINGS
@given(
    _any_short_message,
    st.lists(st.tuples(st.integers(16, 400), st.integers(0, 255)), max_size=3),
    st.integers(0, 30),
)
def test_registered_delivery_is_peeked_only_from_a_submit_sm_that_decodes_without_tlvs(
    pdu: Pdu, damage: list[tuple[int, int]], cut: int
) -> None:
    frame = _damaged(pdu, damage, cut)
    if frame is None:
        return
    peeked = submit_sm_registered_delivery(frame)
    decoded = _outcome(lambda: decode(frame))
    if isinstance(decoded, SubmitSm | DeliverSm) and decoded.tlvs == Tlvs():
        assert peeked == decoded.registered_delivery
    else:
        assert peeked is None


@SETTINGS
@given(
    st.tuples(_octet, _octet, _cstr.filter(lambda s: len(s) <= 20)),
    st.tuples(_octet, _octet, _cstr.filter(lambda s: len(s) <= 20)),
    _octet,
    st.integers(0, 1),
    _octet,
    st.binary(max_size=254),
    st.just(Tlvs()) | _tlvs,
)
def test_a_part_s_frame_is_its_submit_sm_encoded(
    source: tuple[int, int, str],
    destination: tuple[int, int, str],
    esm_class: int,
    registered_delivery: int,
    data_coding: int,
    short_message: bytes,
    tlvs: Tlvs,
) -> None:
    frame = submit_sm_frame(
        address_field("source_addr", *source),
        address_field("destination_addr", *destination),
        esm_class=esm_class,
        registered_delivery=registered_delivery,
        data_coding=data_coding,
        short_message=short_message,
        tlvs=tlvs,
    )
    assert frame == encode(
        SubmitSm(
            sequence_number=0,
            source_addr_ton=source[0],
            source_addr_npi=source[1],
            source_addr=source[2],
            dest_addr_ton=destination[0],
            dest_addr_npi=destination[1],
            destination_addr=destination[2],
            esm_class=esm_class,
            registered_delivery=registered_delivery,
            data_coding=data_coding,
            short_message=short_message,
            tlvs=tlvs,
        )
    )


@pytest.mark.parametrize(
    ("source", "short_message"),
    [((5, 0, "x" * 21), b""), ((5, 0, "€"), b""), ((256, 0, "x"), b""), ((5, 0, "x"), b"x" * 255)],
)
def test_a_part_s_frame_is_refused_as_encode_refuses_it(
    source: tuple[int, int, str], short_message: bytes
) -> None:
    with pytest.raises(ValueError) as caught:
        encode(
            SubmitSm(
                sequence_number=0,
                source_addr_ton=source[0],
                source_addr_npi=source[1],
                source_addr=source[2],
                short_message=short_message,
            )
        )
    with pytest.raises(ValueError) as fast:
        submit_sm_frame(
            address_field("source_addr", *source),
            address_field("destination_addr", 0, 0, ""),
            esm_class=0,
            registered_delivery=0,
            data_coding=0,
            short_message=short_message,
        )
    assert str(fast.value) == str(caught.value)
