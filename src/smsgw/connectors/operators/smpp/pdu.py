"""SMPP 3.4 PDUs: one typed Struct per PDU, `encode`, `decode`, and `PduReader` for a stream."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any, ClassVar, Final, Literal, NamedTuple

import msgspec

from smsgw.connectors.operators.smpp.status import CommandStatus

_HEADER = struct.Struct(">IIII")
HEADER_LENGTH: Final = 16
# The largest PDU PduReader accepts: a message_payload TLV can carry 65,535 octets, and the
# mandatory fields around it take a few hundred more. A command_length beyond this is not a
# PDU but a broken or hostile stream.
MAX_PDU_LENGTH: Final = 70_000
MAX_SEQUENCE_NUMBER: Final = 0x7FFFFFFF
INTERFACE_VERSION_34: Final = 0x34


class CommandId(IntEnum):
    GENERIC_NACK = 0x80000000
    BIND_RECEIVER = 0x00000001
    BIND_RECEIVER_RESP = 0x80000001
    BIND_TRANSMITTER = 0x00000002
    BIND_TRANSMITTER_RESP = 0x80000002
    SUBMIT_SM = 0x00000004
    SUBMIT_SM_RESP = 0x80000004
    DELIVER_SM = 0x00000005
    DELIVER_SM_RESP = 0x80000005
    UNBIND = 0x00000006
    UNBIND_RESP = 0x80000006
    BIND_TRANSCEIVER = 0x00000009
    BIND_TRANSCEIVER_RESP = 0x80000009
    ENQUIRE_LINK = 0x00000015
    ENQUIRE_LINK_RESP = 0x80000015
    DATA_SM = 0x00000103
    DATA_SM_RESP = 0x80000103


class Tag(IntEnum):
    """The optional parameters (TLVs) this codec reads into named fields of `Tlvs`."""

    RECEIPTED_MESSAGE_ID = 0x001E
    SAR_MSG_REF_NUM = 0x020C
    SAR_TOTAL_SEGMENTS = 0x020E
    SAR_SEGMENT_SEQNUM = 0x020F
    SC_INTERFACE_VERSION = 0x0210
    NETWORK_ERROR_CODE = 0x0423
    MESSAGE_PAYLOAD = 0x0424
    MESSAGE_STATE = 0x0427


class PduError(Exception):
    """A frame that is not a valid PDU.

    `status` is the command_status to answer with: in a generic_nack when the header is at
    fault (ESME_RINVCMDLEN, ESME_RINVCMDID), else in the request's own response.
    `sequence_number` and `command_id` are the frame's, or None when not known. The frame
    has been consumed: a PduReader goes on with the next one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        sequence_number: int | None = None,
        command_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.sequence_number = sequence_number
        self.command_id = command_id


class FramingError(PduError):
    """The stream cannot be cut into PDUs any more (an absurd command_length): answer with a
    generic_nack if you like, then close the session. PduReader raises it again if read."""


class NetworkErrorCode(msgspec.Struct, frozen=True):
    network_type: int  # 1 ANSI-136, 2 IS-95, 3 GSM, ...
    error_code: int


class Tlv(msgspec.Struct, frozen=True):
    """An optional parameter this codec has no field for, kept as it came."""

    tag: int
    value: bytes


class Tlvs(msgspec.Struct, frozen=True, kw_only=True):
    """A PDU's optional parameters: the ones named here, and `other` (any other tag, in the
    order received; encoded after the named ones)."""

    sar_msg_ref_num: int | None = None
    sar_total_segments: int | None = None
    sar_segment_seqnum: int | None = None
    message_payload: bytes | None = None
    receipted_message_id: str | None = None
    message_state: int | None = None
    network_error_code: NetworkErrorCode | None = None
    sc_interface_version: int | None = None
    other: tuple[Tlv, ...] = ()


_TlvKind = Literal["u8", "u16", "octets", "cstr", "network_error"]
_NAMED_TLVS: tuple[tuple[str, Tag, _TlvKind], ...] = (
    ("sar_msg_ref_num", Tag.SAR_MSG_REF_NUM, "u16"),
    ("sar_total_segments", Tag.SAR_TOTAL_SEGMENTS, "u8"),
    ("sar_segment_seqnum", Tag.SAR_SEGMENT_SEQNUM, "u8"),
    ("message_payload", Tag.MESSAGE_PAYLOAD, "octets"),
    ("receipted_message_id", Tag.RECEIPTED_MESSAGE_ID, "cstr"),
    ("message_state", Tag.MESSAGE_STATE, "u8"),
    ("network_error_code", Tag.NETWORK_ERROR_CODE, "network_error"),
    ("sc_interface_version", Tag.SC_INTERFACE_VERSION, "u8"),
)
_NAMED_BY_TAG = {tag: (name, kind) for name, tag, kind in _NAMED_TLVS}
_FIXED_TLV_LENGTH = {"u8": 1, "u16": 2, "network_error": 3}
_RECEIPTED_MESSAGE_ID_MAX = 65
_NO_TLVS: Final = Tlvs()


# --- PDUs -----------------------------------------------------------------------------------


class Pdu(msgspec.Struct, frozen=True, kw_only=True):
    """The header every PDU has, but command_length (`encode` computes it) and command_id
    (each subclass's class attribute)."""

    command_id: ClassVar[int]
    sequence_number: int
    command_status: int = 0


class _Bind(Pdu, frozen=True, kw_only=True):
    system_id: str = ""
    password: str = ""
    system_type: str = ""
    interface_version: int = INTERFACE_VERSION_34
    addr_ton: int = 0
    addr_npi: int = 0
    address_range: str = ""


class BindTransmitter(_Bind, frozen=True, kw_only=True):
    command_id = CommandId.BIND_TRANSMITTER


class BindReceiver(_Bind, frozen=True, kw_only=True):
    command_id = CommandId.BIND_RECEIVER


class BindTransceiver(_Bind, frozen=True, kw_only=True):
    command_id = CommandId.BIND_TRANSCEIVER


class _BindResp(Pdu, frozen=True, kw_only=True):
    system_id: str = ""
    tlvs: Tlvs = msgspec.field(default_factory=Tlvs)


class BindTransmitterResp(_BindResp, frozen=True, kw_only=True):
    command_id = CommandId.BIND_TRANSMITTER_RESP


class BindReceiverResp(_BindResp, frozen=True, kw_only=True):
    command_id = CommandId.BIND_RECEIVER_RESP


class BindTransceiverResp(_BindResp, frozen=True, kw_only=True):
    command_id = CommandId.BIND_TRANSCEIVER_RESP


class Unbind(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.UNBIND


class UnbindResp(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.UNBIND_RESP


class EnquireLink(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.ENQUIRE_LINK


class EnquireLinkResp(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.ENQUIRE_LINK_RESP


class GenericNack(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.GENERIC_NACK


class _ShortMessage(Pdu, frozen=True, kw_only=True):
    """The body submit_sm and deliver_sm share."""

    service_type: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    destination_addr: str = ""
    esm_class: int = 0
    protocol_id: int = 0
    priority_flag: int = 0
    schedule_delivery_time: str = ""
    validity_period: str = ""
    registered_delivery: int = 0
    replace_if_present_flag: int = 0
    data_coding: int = 0
    sm_default_msg_id: int = 0
    short_message: bytes = b""
    tlvs: Tlvs = msgspec.field(default_factory=Tlvs)


class SubmitSm(_ShortMessage, frozen=True, kw_only=True):
    command_id = CommandId.SUBMIT_SM


class DeliverSm(_ShortMessage, frozen=True, kw_only=True):
    command_id = CommandId.DELIVER_SM


class SubmitSmResp(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.SUBMIT_SM_RESP
    message_id: str = ""
    # Not in 3.4's submit_sm_resp, but SMPP 5.0 SMSCs add some: read rather than refused.
    tlvs: Tlvs = msgspec.field(default_factory=Tlvs)


class DeliverSmResp(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.DELIVER_SM_RESP
    message_id: str = ""  # unused in 3.4: sent as a lone NUL
    tlvs: Tlvs = msgspec.field(default_factory=Tlvs)


class DataSm(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.DATA_SM
    service_type: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    source_addr: str = ""
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    destination_addr: str = ""
    esm_class: int = 0
    registered_delivery: int = 0
    data_coding: int = 0
    tlvs: Tlvs = msgspec.field(default_factory=Tlvs)


class DataSmResp(Pdu, frozen=True, kw_only=True):
    command_id = CommandId.DATA_SM_RESP
    message_id: str = ""
    tlvs: Tlvs = msgspec.field(default_factory=Tlvs)


# --- layouts: each body's fields in wire order ---------------------------------------------


class _CString(NamedTuple):
    """A C-octet string: at most `max_octets` including its NUL; `status` when longer."""

    name: str
    max_octets: int
    status: int


class _Octet(NamedTuple):
    name: str


class _ShortMessageOctets(NamedTuple):
    """sm_length, then that many octets."""

    name: str


class _OptionalParameters(NamedTuple):
    """The TLVs to the end of the PDU, read into `Tlvs`."""

    name: str


_Field = _CString | _Octet | _ShortMessageOctets | _OptionalParameters
_S = CommandStatus
_TLVS = _OptionalParameters("tlvs")
_BIND = (
    _CString("system_id", 16, _S.ESME_RINVSYSID),
    _CString("password", 9, _S.ESME_RINVPASWD),
    _CString("system_type", 13, _S.ESME_RINVSYSTYP),
    _Octet("interface_version"),
    _Octet("addr_ton"),
    _Octet("addr_npi"),
    _CString("address_range", 41, _S.ESME_RBINDFAIL),
)
_BIND_RESP = (_CString("system_id", 16, _S.ESME_RINVSYSID), _TLVS)
_SHORT_MESSAGE = (
    _CString("service_type", 6, _S.ESME_RINVSERTYP),
    _Octet("source_addr_ton"),
    _Octet("source_addr_npi"),
    _CString("source_addr", 21, _S.ESME_RINVSRCADR),
    _Octet("dest_addr_ton"),
    _Octet("dest_addr_npi"),
    _CString("destination_addr", 21, _S.ESME_RINVDSTADR),
    _Octet("esm_class"),
    _Octet("protocol_id"),
    _Octet("priority_flag"),
    _CString("schedule_delivery_time", 17, _S.ESME_RINVSCHED),
    _CString("validity_period", 17, _S.ESME_RINVEXPIRY),
    _Octet("registered_delivery"),
    _Octet("replace_if_present_flag"),
    _Octet("data_coding"),
    _Octet("sm_default_msg_id"),
    _ShortMessageOctets("short_message"),
    _TLVS,
)
_MESSAGE_ID = (_CString("message_id", 65, _S.ESME_RINVMSGID), _TLVS)
_DATA_SM = (
    _CString("service_type", 6, _S.ESME_RINVSERTYP),
    _Octet("source_addr_ton"),
    _Octet("source_addr_npi"),
    _CString("source_addr", 65, _S.ESME_RINVSRCADR),
    _Octet("dest_addr_ton"),
    _Octet("dest_addr_npi"),
    _CString("destination_addr", 65, _S.ESME_RINVDSTADR),
    _Octet("esm_class"),
    _Octet("registered_delivery"),
    _Octet("data_coding"),
    _TLVS,
)
_LAYOUTS: dict[type[Pdu], tuple[_Field, ...]] = {
    BindTransmitter: _BIND,
    BindReceiver: _BIND,
    BindTransceiver: _BIND,
    BindTransmitterResp: _BIND_RESP,
    BindReceiverResp: _BIND_RESP,
    BindTransceiverResp: _BIND_RESP,
    Unbind: (),
    UnbindResp: (),
    EnquireLink: (),
    EnquireLinkResp: (),
    GenericNack: (),
    SubmitSm: _SHORT_MESSAGE,
    SubmitSmResp: _MESSAGE_ID,
    DeliverSm: _SHORT_MESSAGE,
    DeliverSmResp: _MESSAGE_ID,
    DataSm: _DATA_SM,
    DataSmResp: _MESSAGE_ID,
}
_BY_ID: dict[int, type[Pdu]] = {cls.command_id: cls for cls in _LAYOUTS}
# "The body portion ... is not returned if the command_status field contains a non-zero value."
_NO_BODY_ON_ERROR: frozenset[type[Pdu]] = frozenset(
    (BindTransmitterResp, BindReceiverResp, BindTransceiverResp, SubmitSmResp, DataSmResp)
)


# --- encode ---------------------------------------------------------------------------------


def encode(pdu: Pdu) -> bytes:
    """The PDU's octets on the wire. Raises ValueError for a field out of its range (a string
    too long for its C-octet field or not Latin-1, an integer not an octet, a short_message
    over 254 octets): values inside the gateway are valid, so this is a programming error."""
    cls = type(pdu)
    fast = _FAST_ENCODERS.get(cls)
    if (
        fast is not None
        and 0 <= pdu.sequence_number <= 0xFFFFFFFF
        and 0 <= pdu.command_status <= 0xFFFFFFFF
    ):
        fast_body = fast(pdu)
        if fast_body is not None:
            length = HEADER_LENGTH + len(fast_body)
            header = _HEADER.pack(length, cls.command_id, pdu.command_status, pdu.sequence_number)
            return header + fast_body
    return _encode_by_layout(pdu)


def _encode_by_layout(pdu: Pdu) -> bytes:
    """`encode`, any PDU, field by field as its layout lists them."""
    cls = type(pdu)
    body = bytearray()
    if not (pdu.command_status and cls in _NO_BODY_ON_ERROR):
        for spec in _LAYOUTS[cls]:
            value = getattr(pdu, spec.name)
            match spec:
                case _CString(name, max_octets, _):
                    body += _cstring(name, value, max_octets)
                case _Octet(name):
                    body.append(_octet(name, value))
                case _ShortMessageOctets(name):
                    if len(value) > 254:
                        raise ValueError(
                            f"{name}: {len(value)} octets, over 254: use message_payload"
                        )
                    body.append(len(value))
                    body += value
                case _OptionalParameters():
                    _encode_tlvs(value, body)
    if not 0 <= pdu.sequence_number <= 0xFFFFFFFF:
        raise ValueError(f"sequence_number {pdu.sequence_number} is not 32 bits")
    if not 0 <= pdu.command_status <= 0xFFFFFFFF:
        raise ValueError(f"command_status {pdu.command_status} is not 32 bits")
    header = _HEADER.pack(
        HEADER_LENGTH + len(body), cls.command_id, pdu.command_status, pdu.sequence_number
    )
    return header + bytes(body)


def _short_message_body(pdu: Pdu) -> bytes | None:
    """The body of a valid submit_sm or deliver_sm, written out field by field; None when a
    field is out of range or the PDU is an error response (`encode` then says which)."""
    assert isinstance(pdu, _ShortMessage)
    try:
        service_type = pdu.service_type.encode("latin-1")
        source = pdu.source_addr.encode("latin-1")
        destination = pdu.destination_addr.encode("latin-1")
        schedule = pdu.schedule_delivery_time.encode("latin-1")
        validity = pdu.validity_period.encode("latin-1")
        short_message = pdu.short_message
        parts = [
            service_type,
            bytes((0, pdu.source_addr_ton, pdu.source_addr_npi)),
            source,
            bytes((0, pdu.dest_addr_ton, pdu.dest_addr_npi)),
            destination,
            bytes((0, pdu.esm_class, pdu.protocol_id, pdu.priority_flag)),
            schedule,
            b"\0",
            validity,
            bytes(
                (
                    0,
                    pdu.registered_delivery,
                    pdu.replace_if_present_flag,
                    pdu.data_coding,
                    pdu.sm_default_msg_id,
                    len(short_message),
                )
            ),
            short_message,
        ]
    except (ValueError, TypeError):  # not Latin-1 (UnicodeEncodeError), or not an octet
        return None
    if (
        len(short_message) > 254
        or len(service_type) >= 6
        or len(source) >= 21
        or len(destination) >= 21
        or len(schedule) >= 17
        or len(validity) >= 17
        or b"\0" in service_type + source + destination + schedule + validity
    ):
        return None
    if pdu.tlvs != _NO_TLVS:
        tlvs = bytearray()
        _encode_tlvs(pdu.tlvs, tlvs)
        parts.append(bytes(tlvs))
    return b"".join(parts)


def _message_id_body(pdu: Pdu) -> bytes | None:
    """The body of a response with only a message_id (and no TLVs); None for any other."""
    assert isinstance(pdu, SubmitSmResp | DeliverSmResp | DataSmResp)
    if pdu.tlvs != _NO_TLVS:
        return None
    if pdu.command_status and type(pdu) in _NO_BODY_ON_ERROR:
        return b""
    if not pdu.message_id:
        return b"\0"
    try:
        raw = pdu.message_id.encode("latin-1")
    except UnicodeEncodeError:
        return None
    if len(raw) >= 65 or b"\0" in raw:
        return None
    return raw + b"\0"


_FAST_ENCODERS: Final[dict[type[Pdu], Callable[[Pdu], bytes | None]]] = {
    SubmitSm: _short_message_body,
    DeliverSm: _short_message_body,
    SubmitSmResp: _message_id_body,
    DeliverSmResp: _message_id_body,
    DataSmResp: _message_id_body,
}


def address_field(name: str, ton: int, npi: int, addr: str) -> bytes:
    """A submit_sm's source (`name` "source_addr") or destination ("destination_addr"): its
    TON, NPI and address as `encode` writes them, and raises ValueError for them."""
    if not (0 <= ton <= 0xFF and 0 <= npi <= 0xFF):
        _octet(f"{name}_ton", ton)
        _octet(f"{name}_npi", npi)
    return bytes((ton, npi)) + _cstring(name, addr, 21)


def submit_sm_frame(
    source: bytes,
    destination: bytes,
    *,
    esm_class: int,
    registered_delivery: int,
    data_coding: int,
    short_message: bytes,
    tlvs: Tlvs = _NO_TLVS,
) -> bytes:
    """`encode(SubmitSm(...))` with sequence number 0, these fields, the addresses as
    `address_field` wrote them and every other field at its default, in fewer steps: what a
    part of an outgoing message is sent as. ValueError as `encode` raises it."""
    if len(short_message) > 254:
        over = len(short_message)
        raise ValueError(f"short_message: {over} octets, over 254: use message_payload")
    octets = (esm_class, 0, 0, 0, 0, registered_delivery, 0, data_coding, 0, len(short_message))
    parts = [b"\0", source, destination, bytes(octets), short_message]
    if tlvs != _NO_TLVS:
        encoded = bytearray()
        _encode_tlvs(tlvs, encoded)
        parts.append(bytes(encoded))
    body = b"".join(parts)
    return _HEADER.pack(HEADER_LENGTH + len(body), CommandId.SUBMIT_SM, 0, 0) + body


def _cstring(name: str, value: str, max_octets: int) -> bytes:
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: {value!r} is not Latin-1") from None
    if b"\0" in raw:
        raise ValueError(f"{name}: {value!r} holds a NUL")
    if len(raw) >= max_octets:
        raise ValueError(f"{name}: {value!r} is over {max_octets - 1} characters")
    return raw + b"\0"


def _octet(name: str, value: int) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name}: {value} is not an octet")
    return value


def _u16(name: str, value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name}: {value} is not 16 bits")
    return value.to_bytes(2, "big")


def _encode_tlvs(tlvs: Tlvs, out: bytearray) -> None:
    for name, tag, kind in _NAMED_TLVS:
        value = getattr(tlvs, name)
        if value is None:
            continue
        if kind == "u8":
            raw = bytes([_octet(name, value)])
        elif kind == "u16":
            raw = _u16(name, value)
        elif kind == "cstr":
            raw = _cstring(name, value, _RECEIPTED_MESSAGE_ID_MAX)
        elif kind == "network_error":
            raw = bytes([_octet(name, value.network_type)]) + _u16(name, value.error_code)
        else:
            raw = value
        _append_tlv(out, tag, raw)
    for tlv in tlvs.other:
        _append_tlv(out, tlv.tag, tlv.value)


def _append_tlv(out: bytearray, tag: int, value: bytes) -> None:
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV 0x{tag:04X}: {len(value)} octets, at most 65,535")
    out += struct.pack(">HH", tag, len(value))
    out += value


# --- decode ---------------------------------------------------------------------------------


def decode(frame: bytes) -> Pdu:
    """One whole PDU from its octets (command_length must equal len(frame)). Raises PduError."""
    if len(frame) < HEADER_LENGTH:
        raise PduError(f"{len(frame)} octets is shorter than a header", status=_S.ESME_RINVCMDLEN)
    length, command_id, status, sequence_number = _HEADER.unpack_from(frame)
    if length != len(frame):
        raise PduError(
            f"command_length {length} but the frame has {len(frame)} octets",
            status=_S.ESME_RINVCMDLEN,
            sequence_number=sequence_number,
            command_id=command_id,
        )
    return _decode_frame(frame, command_id, status, sequence_number)


def _decode_frame(frame: bytes, command_id: int, status: int, sequence_number: int) -> Pdu:
    """`decode` of a frame whose header was read and whose length is right."""
    cls = _BY_ID.get(command_id)
    if cls is None:
        raise PduError(
            f"unknown command_id 0x{command_id:08X}",
            status=_S.ESME_RINVCMDID,
            sequence_number=sequence_number,
            command_id=command_id,
        )
    fast = _FAST_DECODERS.get(cls)
    if fast is not None:
        pdu = fast(cls, frame, status, sequence_number)
        if pdu is not None:
            return pdu
    return _decode_by_layout(cls, frame, status, sequence_number)


def _decode_by_layout(cls: type[Pdu], frame: bytes, status: int, sequence_number: int) -> Pdu:
    """`decode` once the header is checked, any PDU, field by field as its layout lists them."""
    command_id = cls.command_id
    body = _Body(frame, sequence_number, command_id)
    fields: dict[str, Any] = {}
    # Responses carrying an error often (and by the spec, for some) come without a body.
    if not (len(frame) == HEADER_LENGTH and command_id & 0x80000000):
        for spec in _LAYOUTS[cls]:
            match spec:
                case _CString(name, max_octets, field_status):
                    fields[name] = body.cstring(name, max_octets, field_status)
                case _Octet(name):
                    fields[name] = body.octet(name)
                case _ShortMessageOctets(name):
                    fields[name] = body.short_message()
                case _OptionalParameters(name):
                    fields[name] = body.tlvs()
    if body.pos != len(frame):
        raise body.error(f"{len(frame) - body.pos} octets after the body", _S.ESME_RINVCMDLEN)
    return cls(sequence_number=sequence_number, command_status=status, **fields)


def _decode_message_id(
    cls: type[SubmitSmResp | DeliverSmResp | DataSmResp],
    frame: bytes,
    status: int,
    sequence_number: int,
) -> Pdu | None:
    """A response that is a message_id and nothing else, or has no body; None for any
    other (`decode` reads it, or says what is wrong with it)."""
    if len(frame) == HEADER_LENGTH:
        return cls(sequence_number=sequence_number, command_status=status)
    end = frame.find(b"\0", HEADER_LENGTH, HEADER_LENGTH + 65)
    if end != len(frame) - 1:
        return None
    message_id = frame[HEADER_LENGTH:end].decode("latin-1")
    return cls(sequence_number=sequence_number, command_status=status, message_id=message_id)


class _ShortMessageEnds(NamedTuple):
    """Where a submit_sm's or deliver_sm's C-octet strings end (their NULs), and where its
    short_message ends."""

    service: int
    source: int
    destination: int
    schedule: int
    validity: int
    short_message: int


def _short_message_ends(frame: bytes) -> _ShortMessageEnds | None:
    """The ends of a short message body's fields, each string found within its length; None
    when one is not (`decode` then says what is wrong)."""
    find = frame.find
    service_end = find(b"\0", HEADER_LENGTH, HEADER_LENGTH + 6)
    if service_end < 0:
        return None
    source_end = find(b"\0", service_end + 3, service_end + 3 + 21)
    if source_end < 0:
        return None
    destination_end = find(b"\0", source_end + 3, source_end + 3 + 21)
    if destination_end < 0:
        return None
    schedule_end = find(b"\0", destination_end + 4, destination_end + 4 + 17)
    if schedule_end < 0:
        return None
    validity_end = find(b"\0", schedule_end + 1, schedule_end + 1 + 17)
    if validity_end < 0:
        return None
    sm_length_at = validity_end + 5
    if sm_length_at >= len(frame):
        return None
    sm_end = sm_length_at + 1 + frame[sm_length_at]
    if sm_end > len(frame):
        return None
    return _ShortMessageEnds(
        service_end, source_end, destination_end, schedule_end, validity_end, sm_end
    )


def submit_sm_registered_delivery(frame: bytes) -> int | None:
    """The registered_delivery of a whole submit_sm frame that `decode` reads without error
    and that has no TLVs, without decoding the rest; None for any other frame: decode it.
    For a reader that needs only that field (a simulated SMSC)."""
    ends = _short_message_ends(frame)
    if ends is None or ends.short_message != len(frame):
        return None
    return frame[ends.validity + 1]


def _decode_short_message(
    cls: type[_ShortMessage], frame: bytes, status: int, sequence_number: int
) -> Pdu | None:
    """A valid deliver_sm or submit_sm, read field by field (the C-octet strings found first,
    the octets between them read after); None for anything `decode` has to look at."""
    ends = _short_message_ends(frame)
    if ends is None:
        return None
    service_end, source_end, destination_end, schedule_end, validity_end, sm_end = ends
    sm_length_at = validity_end + 5
    if sm_end == len(frame):
        tlvs = _NO_TLVS
    else:
        body = _Body(frame, sequence_number, cls.command_id)
        body.pos = sm_end
        tlvs = body.tlvs()
    return cls(
        sequence_number=sequence_number,
        command_status=status,
        service_type=frame[HEADER_LENGTH:service_end].decode("latin-1"),
        source_addr_ton=frame[service_end + 1],
        source_addr_npi=frame[service_end + 2],
        source_addr=frame[service_end + 3 : source_end].decode("latin-1"),
        dest_addr_ton=frame[source_end + 1],
        dest_addr_npi=frame[source_end + 2],
        destination_addr=frame[source_end + 3 : destination_end].decode("latin-1"),
        esm_class=frame[destination_end + 1],
        protocol_id=frame[destination_end + 2],
        priority_flag=frame[destination_end + 3],
        schedule_delivery_time=frame[destination_end + 4 : schedule_end].decode("latin-1"),
        validity_period=frame[schedule_end + 1 : validity_end].decode("latin-1"),
        registered_delivery=frame[validity_end + 1],
        replace_if_present_flag=frame[validity_end + 2],
        data_coding=frame[validity_end + 3],
        sm_default_msg_id=frame[validity_end + 4],
        short_message=frame[sm_length_at + 1 : sm_end],
        tlvs=tlvs,
    )


_FAST_DECODERS: Final[dict[type[Pdu], Callable[[Any, bytes, int, int], Pdu | None]]] = {
    SubmitSmResp: _decode_message_id,
    DeliverSmResp: _decode_message_id,
    DataSmResp: _decode_message_id,
    SubmitSm: _decode_short_message,
    DeliverSm: _decode_short_message,
}


class _Body:
    """A cursor over one frame's body: each read raises PduError naming the frame."""

    def __init__(self, frame: bytes, sequence_number: int, command_id: int) -> None:
        self.frame = frame
        self.pos = HEADER_LENGTH
        self.sequence_number = sequence_number
        self.command_id = command_id

    def error(self, message: str, status: int) -> PduError:
        return PduError(
            message,
            status=status,
            sequence_number=self.sequence_number,
            command_id=self.command_id,
        )

    def octet(self, name: str) -> int:
        if self.pos >= len(self.frame):
            raise self.error(f"the body ends before {name}", _S.ESME_RINVCMDLEN)
        self.pos += 1
        return self.frame[self.pos - 1]

    def cstring(self, name: str, max_octets: int, status: int) -> str:
        end = self.frame.find(b"\0", self.pos, self.pos + max_octets)
        if end < 0:
            if self.pos + max_octets > len(self.frame):
                raise self.error(f"the body ends inside {name}", _S.ESME_RINVCMDLEN)
            raise self.error(f"{name} is over {max_octets - 1} characters", status)
        value = self.frame[self.pos : end].decode("latin-1")
        self.pos = end + 1
        return value

    def short_message(self) -> bytes:
        length = self.octet("sm_length")
        if self.pos + length > len(self.frame):
            raise self.error(f"sm_length {length} runs past the end of the PDU", _S.ESME_RINVMSGLEN)
        self.pos += length
        return self.frame[self.pos - length : self.pos]

    def tlvs(self) -> Tlvs:
        named: dict[str, Any] = {}
        other: list[Tlv] = []
        frame = self.frame
        while self.pos < len(frame):
            if self.pos + 4 > len(frame):
                raise self.error("a TLV header is cut short", _S.ESME_RINVOPTPARSTREAM)
            tag, length = struct.unpack_from(">HH", frame, self.pos)
            start, self.pos = self.pos + 4, self.pos + 4 + length
            if self.pos > len(frame):
                raise self.error(
                    f"TLV 0x{tag:04X} of {length} octets runs past the end of the PDU",
                    _S.ESME_RINVOPTPARSTREAM,
                )
            value = frame[start : self.pos]
            if tag not in _NAMED_BY_TAG:
                other.append(Tlv(tag, value))
                continue
            name, kind = _NAMED_BY_TAG[tag]
            want = _FIXED_TLV_LENGTH.get(kind)
            if want is not None and length != want:
                raise self.error(f"{name} has {length} octets, not {want}", _S.ESME_RINVPARLEN)
            if kind in ("u8", "u16"):
                named[name] = int.from_bytes(value, "big")
            elif kind == "network_error":
                named[name] = NetworkErrorCode(value[0], int.from_bytes(value[1:], "big"))
            elif kind == "cstr":
                # The NUL is the spec's; some SMSCs leave it out.
                named[name] = value.split(b"\0", 1)[0].decode("latin-1")
            else:
                named[name] = value
        return Tlvs(**named, other=tuple(other))


# --- a stream of PDUs -----------------------------------------------------------------------


class PduReader:
    """Cuts a byte stream into PDUs: `feed` it what the socket gave, then take PDUs with
    `next_pdu` (or iterate) until there is no whole one left.

    A malformed frame raises PduError once and is skipped; the next read goes on with the
    frame after it. A command_length that cannot be a PDU (under 16 or over `max_length`)
    raises FramingError, and so does every later read: where the next PDU starts is lost.
    """

    def __init__(self, *, max_length: int = MAX_PDU_LENGTH) -> None:
        self.max_length = max_length
        self._buffer = bytearray()
        self._pos = 0
        self._broken: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Octets received and not yet returned as a PDU."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos and self._pos >= len(self._buffer) // 2:
            del self._buffer[: self._pos]  # compact now and then, not on every PDU
            self._pos = 0
        self._buffer += data

    def next_pdu(self) -> Pdu | None:
        """The next whole PDU, or None until more octets are fed. Raises PduError."""
        got = self.next_frame()
        if got is None:
            return None
        return _decode_frame(*got)

    def next_frame(self) -> tuple[bytes, int, int, int] | None:
        """The next whole frame, undecoded, with its command_id, command_status and
        sequence_number; or None until more octets are fed. Raises FramingError; `decode`
        says whether the frame is a valid PDU."""
        if self._broken is not None:
            raise self._broken
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos < HEADER_LENGTH:
            return None
        length, command_id, status, sequence_number = _HEADER.unpack_from(buffer, pos)
        if not HEADER_LENGTH <= length <= self.max_length:
            self._broken = FramingError(
                f"command_length {length} is not between {HEADER_LENGTH} and {self.max_length}",
                status=_S.ESME_RINVCMDLEN,
                # Under 16 octets, the "sequence number" read is the next frame's octets.
                sequence_number=sequence_number if length >= HEADER_LENGTH else None,
                command_id=command_id,
            )
            raise self._broken
        if len(buffer) - pos < length:
            return None
        frame = bytes(buffer[pos : pos + length])
        self._pos = pos + length
        return frame, command_id, status, sequence_number

    def __iter__(self) -> Iterator[Pdu]:
        while (pdu := self.next_pdu()) is not None:
            yield pdu


def next_sequence_number(previous: int) -> int:
    """The sequence number after `previous`: 1 to 0x7FFFFFFF, then 1 again."""
    return previous + 1 if 0 < previous < MAX_SEQUENCE_NUMBER else 1
