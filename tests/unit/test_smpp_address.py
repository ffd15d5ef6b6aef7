"""SMPP addresses: TON and NPI from the sender's form and from an E.164 recipient."""

from __future__ import annotations

import pytest

from smsgw.connectors.operators.smpp.address import Address, destination_address, source_address


@pytest.mark.parametrize(
    ("sender", "address"),
    [
        ("ACME", Address(5, 0, "ACME")),
        ("Acme Ltd.", Address(5, 0, "Acme Ltd.")),
        ("123 456", Address(5, 0, "123 456")),  # not only digits: alphanumeric
        ("1a", Address(5, 0, "1a")),
        ("+4915123456789", Address(1, 1, "4915123456789")),
        ("4915123456789", Address(1, 1, "4915123456789")),
        ("123456789", Address(1, 1, "123456789")),  # 9 digits: a number, not a short code
        ("12345678", Address(3, 0, "12345678")),  # 8 digits: a short code
        ("1234", Address(3, 0, "1234")),
        ("+1234", Address(1, 1, "1234")),  # a '+' says international, however short
    ],
)
def test_source_address(sender: str, address: Address) -> None:
    assert source_address(sender) == address


def test_destination_address_is_international_without_the_plus() -> None:
    assert destination_address("+4915123456789") == Address(1, 1, "4915123456789")


@pytest.mark.parametrize("to", ["4915123456789", "+0123456789", "+49 151", ""])
def test_destination_address_refuses_what_is_not_e164(to: str) -> None:
    with pytest.raises(ValueError):
        destination_address(to)
