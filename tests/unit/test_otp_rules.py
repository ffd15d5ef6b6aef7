"""One-time code rules (engine/otp.py): codes, templates, redaction, typed digits."""

from __future__ import annotations

from smsgw.engine import otp


def test_codes_are_digits_of_the_length_asked_and_vary() -> None:
    for length in range(otp.MIN_CODE_LENGTH, otp.MAX_CODE_LENGTH + 1):
        codes = {otp.new_code(length) for _ in range(50)}
        assert all(len(c) == length and c.isascii() and c.isdigit() for c in codes)
        assert len(codes) > 40  # 50 draws from at least 10,000 values


def test_a_template_carries_the_code_exactly_once() -> None:
    assert otp.template_problem(otp.DEFAULT_TEMPLATE) is None
    assert otp.template_problem("Code {code}, valid 2 min {x}") is None
    assert otp.template_problem("no code") is not None
    assert otp.template_problem("{code}{code}") is not None
    text = otp.render("Code {code}.", "0042")
    assert text == "Code 0042." and otp.redacted("Code {code}.", 4) == "Code ****."


def test_typed_codes_are_read_in_any_decimal_digits() -> None:
    assert otp.ascii_code("123456") == "123456"
    assert otp.ascii_code("۱۲۳۴۵۶") == "123456"  # Persian
    assert otp.ascii_code("١٢٣٤") == "1234"  # Arabic-Indic
    for bad in ("123", "123456789", "12a4", "²³⁴⁵", "1234\n", " 1234"):
        assert otp.ascii_code(bad) is None, bad
