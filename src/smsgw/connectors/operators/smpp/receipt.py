"""Delivery receipts: what an operator's deliver_sm says became of a message it accepted, and
the DeliveryReport the gateway records for it."""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import Final, Literal

import msgspec

from smsgw.connectors.operators.smpp.encoding import DATA_CODING_UCS2, ESM_CLASS_UDHI, ucs2_text
from smsgw.connectors.operators.smpp.pdu import DataSm, DeliverSm, NetworkErrorCode, Tlvs
from smsgw.engine.messages import DeliveryReport

ReceiptState = Literal["delivered", "undelivered", "expired", "rejected"]

# esm_class bits 2-5, the message type of a deliver_sm / data_sm from the SMSC.
_MESSAGE_TYPE_MASK: Final = 0x3C
_RECEIPT_TYPES: Final = frozenset({0x04, 0x20})  # SMSC delivery receipt, intermediate notification

# stat: as written, and the words SMSCs use instead of the spec's 7-letter ones. None: not
# final yet. A word not here is not final either: the message then ends when its own
# validity runs out, which beats calling it delivered or failed on a guess.
_STAT: Final[dict[str, ReceiptState | None]] = {
    "DELIVRD": "delivered",
    "DELIVERED": "delivered",
    "UNDELIV": "undelivered",
    "UNDELIVERABLE": "undelivered",
    "UNDELIVERED": "undelivered",
    "FAILED": "undelivered",
    "DELETED": "undelivered",
    "UNKNOWN": "undelivered",
    "SKIPPED": "undelivered",
    "EXPIRED": "expired",
    "REJECTD": "rejected",
    "REJECTED": "rejected",
    "ACCEPTD": None,
    "ACCEPTED": None,
    "ENROUTE": None,
    "SCHEDULED": None,
}
# The message_state TLV's values (SMPP 3.4 5.2.28; 0 and 9 are SMPP 5.0's).
MESSAGE_STATES: Final = {
    0: "SCHEDULED",
    1: "ENROUTE",
    2: "DELIVERED",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIVERABLE",
    6: "ACCEPTED",
    7: "UNKNOWN",
    8: "REJECTED",
    9: "SKIPPED",
}

# A field name and its colon; "submit date" is also seen as "submit_date" or "submitdate".
_FIELD = re.compile(
    r"\b(id|sub|dlvrd|submit[ _]?date|done[ _]?date|stat|err|text)\s*:\s*", re.IGNORECASE
)
_DATE_FORMATS: Final = {10: "%y%m%d%H%M", 12: "%y%m%d%H%M%S", 14: "%Y%m%d%H%M%S"}
# The spec's layout, one space between fields, values without spaces or colons: what `_FIELD`
# would read the same way, read by one match.
_STANDARD: Final = re.compile(
    r"id:(?P<id>[^\s:]+) sub:(?P<sub>[^\s:]+) dlvrd:(?P<dlvrd>[^\s:]+)"
    r" submit date:(?P<submitdate>[^\s:]+) done date:(?P<donedate>[^\s:]+)"
    r" stat:(?P<stat>[^\s:]+) err:(?P<err>[^\s:]+)(?: text:(?P<text>.*))?",
    re.DOTALL,
)
_HEX: Final = re.compile(r"[0-9a-f]+")


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery receipt. `state` is None while the message is not final (ENROUTE,
    ACCEPTD) or when the stat is one this parser does not know; `stat` and `error` are kept
    as the operator gave them, for the message's history. Dates are the SMSC's clock, time
    zone unknown."""

    message_id: str
    state: ReceiptState | None
    stat: str | None = None
    error: str | None = None
    network_error: NetworkErrorCode | None = None
    submitted: datetime | None = None
    done: datetime | None = None
    submitted_parts: int | None = None
    delivered_parts: int | None = None
    text: str | None = None

    @property
    def final(self) -> bool:
        return self.state is not None


def receipt_fields(text: str) -> dict[str, str]:
    """The `name:value` fields of a receipt's text, names lower case without space or '_'
    ("submitdate"). The text field is last and runs to the end, whatever it holds."""
    standard = _standard_fields(text)
    return standard if standard is not None else _matched_fields(text)


def _matched_fields(text: str) -> dict[str, str]:
    """`receipt_fields` of any text, by finding the field names in it."""
    fields: dict[str, str] = {}
    matches = list(_FIELD.finditer(text))
    for i, m in enumerate(matches):
        name = re.sub(r"[ _]", "", m.group(1).lower())
        if name == "text":
            fields[name] = text[m.end() :].strip()
            break
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        fields.setdefault(name, text[m.end() : end].strip())
    return fields


def _standard_fields(text: str) -> dict[str, str] | None:
    """`receipt_fields` of a text in the spec's layout (`_STANDARD`); None for any other."""
    m = _STANDARD.fullmatch(text)
    if m is None:
        return None
    fields: dict[str, str] = m.groupdict()
    rest = fields.pop("text")
    if rest is not None:
        fields["text"] = rest.strip()
    return fields


def parse_receipt(text: str, tlvs: Tlvs | None = None) -> Receipt | None:
    """A receipt from its text and the PDU's TLVs; receipted_message_id and message_state,
    when present, win over the text's id and stat. None when neither gives a message id."""
    fields = receipt_fields(text)
    message_id = fields.get("id") or None
    stat = fields.get("stat") or None
    state = _STAT.get(stat.upper()) if stat else None
    network_error = None
    if tlvs is not None:
        message_id = tlvs.receipted_message_id or message_id
        if tlvs.message_state is not None:
            stat = MESSAGE_STATES.get(tlvs.message_state, f"message_state {tlvs.message_state}")
            state = _STAT.get(stat)
        network_error = tlvs.network_error_code
    if message_id is None:
        return None
    return Receipt(
        message_id=message_id,
        state=state,
        stat=stat,
        error=fields.get("err") or None,
        network_error=network_error,
        submitted=_date(fields.get("submitdate")),
        done=_date(fields.get("donedate")),
        submitted_parts=_count(fields.get("sub")),
        delivered_parts=_count(fields.get("dlvrd")),
        text=fields.get("text"),
    )


def receipt_from_pdu(pdu: DeliverSm | DataSm) -> Receipt | None:
    """The receipt a deliver_sm or data_sm carries, or None when it is not one (a message
    from a phone). It is one when its esm_class says so or it has receipted_message_id.

    The text is read as Latin-1 unless data_coding is UCS-2: SMSCs write receipts in ASCII
    even under data_coding 0, where GSM 03.38 would turn '_' into '§'.
    """
    tlvs = pdu.tlvs
    message_type = pdu.esm_class & _MESSAGE_TYPE_MASK
    if message_type not in _RECEIPT_TYPES and tlvs.receipted_message_id is None:
        return None
    raw = pdu.short_message if isinstance(pdu, DeliverSm) else b""
    if not raw:
        raw = tlvs.message_payload or b""
    if pdu.esm_class & ESM_CLASS_UDHI and raw:
        raw = raw[1 + raw[0] :]
    text = ucs2_text(raw) if pdu.data_coding == DATA_CODING_UCS2 else raw.decode("latin-1")
    return parse_receipt(text, tlvs)


def canonical_message_id(message_id: str) -> str:
    """The form to keep a submit_sm_resp message_id under, and to look receipts up by:
    trimmed, lower case, leading zeros dropped."""
    return message_id.strip().lower().lstrip("0") or "0"


def receipt_id_candidates(receipt_id: str) -> tuple[str, ...]:
    """The canonical message ids a receipt's id may stand for, most likely first: itself,
    then, because some SMSCs answer submit_sm in hex and write receipts in decimal (or the
    other way round), its decimal value in hex and its hex value in decimal."""
    own = canonical_message_id(receipt_id)
    candidates = [own]
    if own.isdigit() and own.isascii():
        candidates.append(f"{int(own):x}")
    if _HEX.fullmatch(own):
        candidates.append(str(int(own, 16)))
    return tuple(dict.fromkeys(candidates))


def report_for(receipt: Receipt, recent: dict[str, bool]) -> DeliveryReport | None:
    """The DeliveryReport a receipt makes, or None when it is only acknowledged: not final
    (ENROUTE, ACCEPTD, a stat not known), or the receipt of a part other than a message's
    first. `recent` maps the canonical ids of parts sent lately to whether each was a first
    part; it also picks, among the forms an id may take (hex or decimal), the one sent."""
    if receipt.state is None:
        return None
    chosen = canonical_message_id(receipt.message_id)
    first = recent.get(chosen)
    if first is None:  # not sent in this form: maybe in another
        for candidate in receipt_id_candidates(receipt.message_id)[1:]:
            first = recent.get(candidate)
            if first is not None:
                chosen = candidate
                break
    if first is False:
        return None
    if receipt.state == "delivered":
        return DeliveryReport(chosen, "delivered")
    error = receipt.stat or receipt.state.upper()
    if receipt.error:
        error += f" err:{receipt.error}"
    if receipt.network_error is not None:
        error += f" network:{receipt.network_error.network_type}/{receipt.network_error.error_code}"
    return DeliveryReport(chosen, "undelivered", error)


def _date(value: str | None) -> datetime | None:
    return _parse_date(value) if value else None


@lru_cache(maxsize=1024)  # a receipt's dates repeat those of the receipts just before it
def _parse_date(value: str) -> datetime | None:
    digits = re.sub(r"\D", "", value)
    fmt = _DATE_FORMATS.get(len(digits))
    if fmt is None:
        return None
    try:
        return datetime.strptime(digits, fmt)
    except ValueError:
        return None


def _count(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() and value.isascii() else None
