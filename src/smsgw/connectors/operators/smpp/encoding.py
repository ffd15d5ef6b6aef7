"""SMS text on the wire: GSM 03.38 septets, UCS-2, and the parts a long text is sent in."""

from __future__ import annotations

from typing import Final, Literal, assert_never

import msgspec

from smsgw.connectors.operators.smpp.pdu import Tlvs
from smsgw.engine.sms import is_gsm7, segment_texts

# The GSM 03.38 default alphabet, by septet value; 0x1B is the escape to the extension table.
GSM7_BASIC: Final = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
ESCAPE: Final = 0x1B
GSM7_EXTENSION: Final = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}
_BASIC_SEPTET = {c: i for i, c in enumerate(GSM7_BASIC) if i != ESCAPE}
_EXTENSION_CHAR = {septet: c for c, septet in GSM7_EXTENSION.items()}
# Each character of the alphabet to its septets as characters, for str.translate.
_SEPTETS_OF = str.maketrans(
    {c: f"\x1b{chr(septet)}" for c, septet in GSM7_EXTENSION.items()}
    | {c: chr(septet) for c, septet in _BASIC_SEPTET.items()}
)
_ALPHABET = frozenset(_BASIC_SEPTET) | frozenset(GSM7_EXTENSION)

DATA_CODING_DEFAULT: Final = 0x00  # the SMSC's default alphabet: GSM 03.38
DATA_CODING_IA5: Final = 0x01
DATA_CODING_LATIN1: Final = 0x03
DATA_CODING_UCS2: Final = 0x08
ESM_CLASS_UDHI: Final = 0x40  # short_message starts with a user data header


def gsm7_septets(text: str) -> bytes:
    """`text` in GSM 03.38, one septet an octet (the unpacked form most SMSCs want with
    data_coding 0); an extension character is two: ESC, then its code. KeyError for a
    character outside the alphabet (check with `is_gsm7` first)."""
    if _ALPHABET.issuperset(text):
        return text.translate(_SEPTETS_OF).encode("latin-1")
    out = bytearray()
    for c in text:
        septet = _BASIC_SEPTET.get(c)
        if septet is None:
            out.append(ESCAPE)
            septet = GSM7_EXTENSION[c]
        out.append(septet)
    return bytes(out)


def gsm7_text(septets: bytes) -> str:
    """The text of unpacked septets. An escape before a code the extension table lacks
    stands for the basic character (as 03.38 asks of a phone); a trailing escape is dropped."""
    chars: list[str] = []
    escaped = False
    for septet in septets:
        septet &= 0x7F
        if escaped:
            chars.append(_EXTENSION_CHAR.get(septet, GSM7_BASIC[septet]))
            escaped = False
        elif septet == ESCAPE:
            escaped = True
        else:
            chars.append(GSM7_BASIC[septet])
    return "".join(chars)


def pack_septets(septets: bytes, fill_bits: int = 0) -> bytes:
    """Septets packed 8 to 7 octets, least significant bit first (03.38 section 6.1.2.1).
    `fill_bits` zero bits come first: 1 after a 6-octet UDH, so septets start on a septet
    boundary of the user data."""
    if not septets:
        return b""
    bits = fill_bits
    acc = 0
    out = bytearray()
    for septet in septets:
        acc |= (septet & 0x7F) << bits
        bits += 7
        while bits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            bits -= 8
    if bits:
        out.append(acc)
    return bytes(out)


def unpack_septets(data: bytes, count: int | None = None, fill_bits: int = 0) -> bytes:
    """The septets packed in `data`, one an octet. Give `count` when known (the UDL): a last
    octet with 7 spare bits otherwise reads as one more '@'."""
    available = max(0, len(data) * 8 - fill_bits) // 7
    if count is None:
        count = available
    elif count > available:
        raise ValueError(f"{len(data)} octets hold {available} septets, not {count}")
    value = int.from_bytes(data, "little") >> fill_bits
    return bytes((value >> (7 * i)) & 0x7F for i in range(count))


def ucs2(text: str) -> bytes:
    """`text` in UTF-16 big-endian, what SMSCs take for data_coding 8: a character outside
    the BMP (an emoji) is a surrogate pair, two code units."""
    return text.encode("utf-16-be", "surrogatepass")


def ucs2_text(data: bytes) -> str:
    return data.decode("utf-16-be", "surrogatepass" if len(data) % 2 == 0 else "replace")


def decode_short_message(short_message: bytes, data_coding: int, esm_class: int = 0) -> str:
    """The text of a received short_message (or message_payload), its UDH dropped. GSM is
    read unpacked; a coding not known here is read as Latin-1 (lossless, never fails)."""
    if esm_class & ESM_CLASS_UDHI and short_message:
        short_message = short_message[1 + short_message[0] :]
    if data_coding == DATA_CODING_DEFAULT:
        return gsm7_text(short_message)
    if data_coding == DATA_CODING_UCS2:
        return ucs2_text(short_message)
    return short_message.decode("latin-1")


class Part(msgspec.Struct, frozen=True):
    """One submit_sm's worth of a text: its short_message, esm_class, data_coding and TLVs."""

    short_message: bytes
    esm_class: int
    data_coding: int
    tlvs: Tlvs = msgspec.field(default_factory=Tlvs)


Method = Literal["udh", "sar", "payload"]
_UDH_FILL_BITS: Final = 1  # 6 octets = 48 bits; the next septet boundary is at 49


def concatenation_udh(ref: int, total: int, seq: int) -> bytes:
    """The 6-octet user data header of a concatenated SMS with an 8-bit reference."""
    return bytes((0x05, 0x00, 0x03, ref, total, seq))


def split(text: str, method: Method = "udh", ref: int = 0, *, packed: bool = False) -> list[Part]:
    """The submit_sm parts `text` is sent in. Their number is `engine.sms.segments(text)`,
    what the gateway prices, since both come from `segment_texts`.

    GSM 03.38 text goes as data_coding 0, unpacked unless `packed`; any other text as UCS-2
    (data_coding 8). A text that fits one SMS is one plain part, whatever the method. Longer:
      udh      each part starts with a concatenation UDH (05 00 03 ref total seq), esm_class
               has UDHI; `ref` is 8 bits.
      sar      the sar_msg_ref_num / sar_total_segments / sar_segment_seqnum TLVs; `ref` is
               16 bits.
      payload  ONE submit_sm with the whole text in message_payload, which the SMSC cuts into
               the same `segments(text)` SMS (and bills as many).
    ValueError for an empty text, more than 255 parts, or a `ref` the method cannot carry.
    """
    texts = segment_texts(text)
    if not texts:
        raise ValueError("an SMS needs some text")
    gsm = is_gsm7(text)
    coding = DATA_CODING_DEFAULT if gsm else DATA_CODING_UCS2

    def payload(t: str, fill_bits: int = 0) -> bytes:
        if not gsm:
            return ucs2(t)
        septets = gsm7_septets(t)
        return pack_septets(septets, fill_bits) if packed else septets

    if len(texts) == 1:
        return [Part(payload(text), 0, coding)]
    total = len(texts)
    if total > 255:
        raise ValueError(f"{total} parts: a concatenated SMS has at most 255")
    match method:
        case "udh":
            if not 0 <= ref <= 0xFF:
                raise ValueError(f"ref {ref}: a UDH reference is 8 bits")
            return [
                Part(
                    concatenation_udh(ref, total, seq) + payload(t, _UDH_FILL_BITS),
                    ESM_CLASS_UDHI,
                    coding,
                )
                for seq, t in enumerate(texts, 1)
            ]
        case "sar":
            if not 0 <= ref <= 0xFFFF:
                raise ValueError(f"ref {ref}: sar_msg_ref_num is 16 bits")
            return [
                Part(
                    payload(t),
                    0,
                    coding,
                    Tlvs(sar_msg_ref_num=ref, sar_total_segments=total, sar_segment_seqnum=seq),
                )
                for seq, t in enumerate(texts, 1)
            ]
        case "payload":
            return [Part(b"", 0, coding, Tlvs(message_payload=payload(text)))]
        case _:
            assert_never(method)
