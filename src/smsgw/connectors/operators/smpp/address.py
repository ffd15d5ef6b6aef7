"""SMPP addresses: the TON and NPI a sender or an E.164 recipient goes with."""

from __future__ import annotations

import re
from typing import Final

import msgspec

from smsgw.engine.sms import E164

TON_UNKNOWN: Final = 0
TON_INTERNATIONAL: Final = 1
TON_NATIONAL: Final = 2
TON_NETWORK_SPECIFIC: Final = 3
TON_SUBSCRIBER: Final = 4
TON_ALPHANUMERIC: Final = 5
TON_ABBREVIATED: Final = 6
NPI_UNKNOWN: Final = 0
NPI_ISDN: Final = 1  # E.163 / E.164

# At most this many digits is a short code, more a phone number (national numbers without
# their country code start at about 9 digits in most plans).
SHORT_CODE_MAX_DIGITS: Final = 8
_NUMERIC = re.compile(r"\+?[0-9]+")


class Address(msgspec.Struct, frozen=True):
    ton: int
    npi: int
    addr: str


def source_address(sender: str) -> Address:
    """The source_addr_ton / _npi / source_addr for a sender the gateway accepted.

    - digits with a '+', or more than SHORT_CODE_MAX_DIGITS digits: an international number,
      TON 1 NPI 1, sent without the '+'.
    - up to SHORT_CODE_MAX_DIGITS digits: a short code, TON 3 (network specific) NPI 0. The
      choice: a short code belongs to one network's numbering, not E.164; most SMSCs take
      3/0 for it, some want 0/1 or 6/0, which an operator's bind settings would override.
    - anything else (letters, spaces, '.', '_', '-'): alphanumeric, TON 5 NPI 0, as written.
    """
    if _NUMERIC.fullmatch(sender):
        digits = sender.removeprefix("+")
        if sender.startswith("+") or len(digits) > SHORT_CODE_MAX_DIGITS:
            return Address(TON_INTERNATIONAL, NPI_ISDN, digits)
        return Address(TON_NETWORK_SPECIFIC, NPI_UNKNOWN, digits)
    return Address(TON_ALPHANUMERIC, NPI_UNKNOWN, sender)


def destination_address(to: str) -> Address:
    """The dest_addr_ton / _npi / destination_addr for an E.164 number ('+' and digits):
    TON 1 NPI 1, without the '+'. ValueError for anything else."""
    if not E164.fullmatch(to):
        raise ValueError(f"{to!r} is not an E.164 number")
    return Address(TON_INTERNATIONAL, NPI_ISDN, to[1:])
