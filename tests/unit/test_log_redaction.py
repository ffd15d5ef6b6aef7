"""What logs may show of URLs and secrets: `redact_url` at the source, `scrub` on every line
the formatters write."""

from __future__ import annotations

import json
import logging

from smsgw.logs import JsonFormatter, TextFormatter, redact_url, scrub


def test_redact_url_keeps_where_not_what() -> None:
    assert redact_url("http://127.0.0.1:9/cb?token=s3cret#x") == "http://127.0.0.1:9/cb"
    assert redact_url("postgresql://app:pw@db:5432/gw?sslmode=require") == (
        "postgresql://app@db:5432/gw"
    )
    assert redact_url("smpp://esme:pw@smsc:2775?binds=2") == "smpp://esme@smsc:2775"
    assert redact_url("https://[::1]:8443/hook") == "https://[::1]:8443/hook"
    assert redact_url("http://127.0.0.1:99999/x?k=v") == "http://127.0.0.1:99999/x"


def test_scrub_takes_queries_passwords_and_keys_out_of_any_line() -> None:
    line = (
        "POST http://h/cb?token=s3cret failed; db postgresql://u:pw@h/db;"
        " host=h password=pw2; key sk_abcdefgh whsec_0123456789 adm_abcdefgh"
    )
    cleaned = scrub(line)
    for secret in ("s3cret", ":pw@", "pw2", "abcdefgh", "0123456789"):
        assert secret not in cleaned, secret
    assert "http://h/cb failed" in cleaned and "postgresql://u:***@h/db" in cleaned
    assert scrub("GET /v1/messages 200 1.2ms") == "GET /v1/messages 200 1.2ms"


def test_both_formatters_scrub() -> None:
    record = logging.LogRecord(
        "smsgw.test", logging.WARNING, __file__, 1, "to %s", ("http://h/x?t=s3cret",), None
    )
    record.url = "http://h/x?t=s3cret"
    assert "s3cret" not in TextFormatter().format(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "to http://h/x" and entry["url"] == "http://h/x"
