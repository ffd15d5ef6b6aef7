"""SMPP 3.4 PDUs: one typed Struct per PDU, `encode`, `decode`, and `PduReader` for a stream."""

from __future__ import annotations

import struct
from collections.abc import Iterator
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
    cls = _BY_ID.get(command_id)
    if cls is None:
        raise PduError(
            f"unknown command_id 0x{command_id:08X}",
            status=_S.ESME_RINVCMDID,
            sequence_number=sequence_number,
            command_id=command_id,
        )
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
        if self._broken is not None:
            raise self._broken
        if self.buffered < HEADER_LENGTH:
            return None
        length, command_id, _, sequence_number = _HEADER.unpack_from(self._buffer, self._pos)
        if not HEADER_LENGTH <= length <= self.max_length:
            self._broken = FramingError(
                f"command_length {length} is not between {HEADER_LENGTH} and {self.max_length}",
                status=_S.ESME_RINVCMDLEN,
                # Under 16 octets, the "sequence number" read is the next frame's octets.
                sequence_number=sequence_number if length >= HEADER_LENGTH else None,
                command_id=command_id,
            )
            raise self._broken
        if self.buffered < length:
            return None
        frame = bytes(self._buffer[self._pos : self._pos + length])
        self._pos += length
        return decode(frame)

    def __iter__(self) -> Iterator[Pdu]:
        while (pdu := self.next_pdu()) is not None:
            yield pdu


def next_sequence_number(previous: int) -> int:
    """The sequence number after `previous`: 1 to 0x7FFFFFFF, then 1 again."""
    return previous + 1 if 0 < previous < MAX_SEQUENCE_NUMBER else 1
