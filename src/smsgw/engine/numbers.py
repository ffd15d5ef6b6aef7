"""Phone numbers as people type them, made E.164: the one form the gateway stores and answers.

`normalize("09121234567", "IR")` is `"+989121234567"`; so are `"0098 912 123 4567"`,
`"+98-912-1234567"` and `"۰۹۱۲۱۲۳۴۵۶۷"` (Persian digits; Arabic-Indic ones too). The national
forms are read with the `phonenumbers` library (Google's libphonenumber metadata, kept current
upstream) in the account's country, and must be a valid number of its plan.

The fast path: a string already in E.164 form (`+`, a country code, digits only; what bulk
clients send) is not parsed. It is taken when its length is one the country's numbering plan
allows (`phonenumbers`' possible lengths for the country code, read once per country code),
which costs about a microsecond, where a parse and a validity check cost 20 µs and a validity
check alone 6-12 µs: a batch of 1,000 would spend 6-20 ms in it. So an E.164 number is refused
when it is impossible (an unknown country code, a wrong length), not when it is possible but
outside the ranges the plan assigns today: the operator is the judge of those, as it was before
national forms were taken.

The one module of the engine that imports a library beyond msgspec: number plans are data
that changes every month, which the engine should not keep by hand.
"""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE, NumberParseException

# ISO 3166 alpha-2 of the country whose national forms `to` may take, for an account that did
# not choose one; `serve --default-country` sets the node's (`set_node_country`).
DEFAULT_COUNTRY = "IR"
_node_country = DEFAULT_COUNTRY

E164 = re.compile(r"\+[1-9][0-9]{6,14}")
COUNTRY = re.compile(r"[A-Z]{2}")

# Country calling code, as the digits after the '+' -> the national number lengths its plan
# allows (None: no such code); filled on first use, about 250 codes in all.
_LENGTHS: dict[str, frozenset[int] | None] = {}


def _possible_lengths(code: str) -> frozenset[int] | None:
    found = _LENGTHS.get(code, _LENGTHS)
    if found is not _LENGTHS:
        return found  # type: ignore[return-value]
    lengths: set[int] = set()
    for region in COUNTRY_CODE_TO_REGION_CODE.get(int(code), ()):
        if region == phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY:
            meta = phonenumbers.PhoneMetadata.metadata_for_nongeo_region(int(code))
        else:
            meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
        if meta is not None and meta.general_desc is not None:
            lengths.update(meta.general_desc.possible_length or ())
    result = frozenset(lengths) if lengths else None
    _LENGTHS[code] = result
    return result


def _e164_possible(number: str) -> bool:
    """Whether `number` (matching E164) has a country code and a length its plan allows.
    Country codes are prefix-free: the first of 1, 2 or 3 digits that is one is the one."""
    digits = len(number) - 1
    for end in (2, 3, 4):
        lengths = _possible_lengths(number[1:end])
        if lengths is not None:
            return digits - end + 1 in lengths
    return False


def is_country(code: str) -> bool:
    """Whether `code` is an ISO 3166 alpha-2 code of a country with a numbering plan."""
    return bool(COUNTRY.fullmatch(code)) and code in phonenumbers.SUPPORTED_REGIONS


def node_country() -> str:
    """The country of accounts without a `default_country` of their own, on this node."""
    return _node_country


def set_node_country(code: str) -> None:
    """Set `node_country()` (once, at start: `serve --default-country`). ValueError for a
    code that is no country with a numbering plan."""
    global _node_country
    if not is_country(code):
        raise ValueError(f"{code!r} is not an ISO 3166 alpha-2 country code with a numbering plan")
    _node_country = code


def normalize(number: str, country: str = DEFAULT_COUNTRY) -> str | None:
    """`number` in E.164, read in `country`'s national forms when it has no country code;
    None when it is no possible (E.164 input) or valid (any other form) number."""
    if E164.fullmatch(number):
        return number if _e164_possible(number) else None
    if len(number) > 64:  # a person's way of writing a number is never this long
        return None
    return _national(number, country)


# National forms cost about 25 µs to read; the same number comes again (an OTP resent, a
# client that always writes 09...), so the last few thousand readings are kept.
@functools.lru_cache(maxsize=4_096)
def _national(number: str, country: str) -> str | None:
    try:
        parsed = phonenumbers.parse(number, country)
    except NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    e164 = phonenumbers.format_number(parsed, PhoneNumberFormat.E164)
    # A plan may allow more digits than E.164's 15 (a few German ones): not a number here.
    return e164 if E164.fullmatch(e164) else None


def number_problem(country: str) -> str:
    """What is wrong with a number `normalize` refused, in words a person can act on."""
    return (
        "must be a phone number: E.164 (a '+', the country code, then the number, e.g."
        f" +4915123456789) or a national form of {country} (e.g. {_example(country)});"
        " separators and Persian or Arabic-Indic digits are taken"
    )


def _example(country: str) -> str:
    example = phonenumbers.example_number_for_type(country, PhoneNumberType.MOBILE)
    if example is None:
        return "its national number"
    return phonenumbers.format_number(example, PhoneNumberFormat.NATIONAL)
