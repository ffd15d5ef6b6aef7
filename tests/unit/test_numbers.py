"""Numbers as people type them (engine/numbers.py): a table of real-world inputs, each with
the E.164 form the gateway stores or None (a 422 naming the field at the HTTP door)."""

from __future__ import annotations

import pytest

from smsgw.engine.numbers import is_country, node_country, normalize, set_node_country

IRAN = "+989121234567"
GERMANY = "+4915123456789"
US = "+12125550100"

CASES = [
    # Iran (the default country): every way people write one mobile number
    ("09121234567", "IR", IRAN),
    ("9121234567", "IR", IRAN),
    ("0912 123 4567", "IR", IRAN),
    ("0912-123-4567", "IR", IRAN),
    ("(0912) 123 4567", "IR", IRAN),
    ("0098 912 123 4567", "IR", IRAN),
    ("00989121234567", "IR", IRAN),
    ("+98 912 123 4567", "IR", IRAN),
    ("+98-912-1234567", "IR", IRAN),
    ("+98 (912) 123-4567", "IR", IRAN),
    ("+989121234567", "IR", IRAN),
    ("۰۹۱۲۱۲۳۴۵۶۷", "IR", IRAN),  # Persian digits
    ("٠٩١٢١٢٣٤٥٦٧", "IR", IRAN),  # Arabic-Indic digits
    ("۰۹۱۲ ۱۲۳ ۴۵۶۷", "IR", IRAN),
    ("+۹۸۹۱۲۱۲۳۴۵۶۷", "IR", IRAN),
    ("۰۰۹۸۹۱۲۱۲۳۴۵۶۷", "IR", IRAN),
    ("02188776655", "IR", "+982188776655"),  # a Tehran landline
    ("+98 21 8877 6655", "IR", "+982188776655"),
    ("0912123456", "IR", None),  # a digit short
    ("091212345678", "IR", None),  # a digit too many
    ("+98912123456", "IR", None),  # E.164, but too short for Iran's plan
    ("0000000000", "IR", None),
    # Germany
    ("015123456789", "DE", GERMANY),
    ("0151 23456789", "DE", GERMANY),
    ("0151/23456789", "DE", GERMANY),
    ("+49 151 23456789", "DE", GERMANY),
    ("0049 151 23456789", "DE", GERMANY),
    ("+49 (0)151 23456789", "DE", GERMANY),
    ("+4915123456789", "DE", GERMANY),
    ("+4915123456789", "IR", GERMANY),  # E.164 is E.164 in every country
    ("+49 151 23456789", "IR", GERMANY),
    ("030 12345678", "DE", "+493012345678"),  # a Berlin landline
    ("015123456789", "IR", None),  # a German national form read as Iranian
    ("+4915123456789012", "DE", None),  # too long
    ("+49 30 1234567890123", "DE", None),  # the plan allows it, E.164's 15 digits do not
    # United States
    ("(212) 555-0100", "US", US),
    ("212-555-0100", "US", US),
    ("212.555.0100", "US", US),
    ("1 212 555 0100", "US", US),
    ("+1 (212) 555-0100", "US", US),
    ("+12125550100", "US", US),
    ("011 49 151 23456789", "US", GERMANY),  # the US international prefix
    ("555-0100", "US", None),  # no area code
    ("(212) 555-010", "US", None),
    # other countries' E.164 forms, on the fast path
    ("+447911123456", "IR", "+447911123456"),
    ("+33612345678", "IR", "+33612345678"),
    ("+80012345678", "IR", "+80012345678"),  # a non-geographic (freephone) code
    # not numbers
    ("", "IR", None),
    ("+", "IR", None),
    ("hello", "IR", None),
    ("+0123456789", "IR", None),
    ("+999123456789", "IR", None),  # no such country code
    ("+1234567890123456", "IR", None),  # 16 digits: longer than E.164 allows
    ("0912 123 4567 ext. 12" * 5, "IR", None),
    ("+49 151 2345 6789\n", "DE", GERMANY),  # phonenumbers strips trailing whitespace
]


@pytest.mark.parametrize(("typed", "country", "e164"), CASES)
def test_a_number_as_typed_is_its_e164_form_or_refused(
    typed: str, country: str, e164: str | None
) -> None:
    assert normalize(typed, country) == e164


def test_the_table_has_enough_real_world_inputs() -> None:
    assert len(CASES) >= 30
    assert {c for _, c, _ in CASES} >= {"IR", "DE", "US"}


def test_countries() -> None:
    assert is_country("IR") and is_country("DE") and is_country("US")
    assert not is_country("ir") and not is_country("XX") and not is_country("IRN")


def test_the_node_country_is_set_once_and_checked() -> None:
    before = node_country()
    try:
        set_node_country("DE")
        assert node_country() == "DE"
        with pytest.raises(ValueError):
            set_node_country("Germany")
        assert node_country() == "DE"
    finally:
        set_node_country(before)
