"""SMS rules: recipient and sender validation, GSM-7 / UCS-2 segment counting, pricing."""

from __future__ import annotations

import re

# GSM 03.38 basic character set, and the extension table (each extension character costs two
# septets: an escape and the character).
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_ALNUM_SENDER = re.compile(r"^[A-Za-z0-9 ._-]{1,11}$")
_NUMERIC_SENDER = re.compile(r"^\+?[0-9]{1,15}$")


_GSM7_ALL = _GSM7_BASIC | _GSM7_EXTENSION


def is_gsm7(text: str) -> bool:
    return _GSM7_ALL.issuperset(text)


def segments(text: str) -> int:
    """How many SMS the operator will bill for `text`: the number of `segment_texts(text)`, so
    what is priced is what an SMPP connection sends (one PDU a part)."""
    return len(segment_texts(text))


def segment_texts(text: str) -> list[str]:
    """The parts `text` is sent in, in order: [] for "", [text] when it fits one SMS.

    GSM-7: 160 septets in one SMS, 153 per part when concatenated; an extension character
    takes two septets and a part never splits an escape from its character. UCS-2 (anything
    else, e.g. Persian): 70 UTF-16 code units in one SMS, 67 per part, never splitting a
    surrogate pair.
    """
    if not text:
        return []
    if _GSM7_BASIC.issuperset(text):
        # The common case, without a loop in Python: one septet a character.
        n = len(text)
        return [text] if n <= 160 else [text[i : i + 153] for i in range(0, n, 153)]
    if is_gsm7(text):
        units = [2 if c in _GSM7_EXTENSION else 1 for c in text]
        single, part = 160, 153
    else:
        units = [2 if ord(c) > 0xFFFF else 1 for c in text]
        single, part = 70, 67
    if sum(units) <= single:
        return [text]
    parts: list[str] = []
    start, used = 0, 0
    for i, u in enumerate(units):
        if used + u > part:
            parts.append(text[start:i])
            start, used = i, 0
        used += u
    parts.append(text[start:])
    return parts


def recipient_problem(to: str) -> str | None:
    """None when `to` is an E.164 number, else what is wrong, in words a person can act on."""
    if E164.fullmatch(to):
        return None
    return (
        "must be an E.164 phone number: a '+', the country code, then the number,"
        " 8 to 16 characters in all, digits only (e.g. +4915123456789)"
    )


def sender_problem(sender: str) -> str | None:
    if _NUMERIC_SENDER.fullmatch(sender) or _ALNUM_SENDER.fullmatch(sender):
        return None
    return (
        "must be alphanumeric (letters, digits, space, '.', '_' or '-'), at most 11 characters,"
        " or numeric, at most 15 digits"
    )


def price(segment_count: int, *, express: bool, normal_price: int, express_price: int) -> int:
    return segment_count * (express_price if express else normal_price)
