"""Log formatting: JSON lines and text, with the request id from the context or `extra=`."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from smsgw.logs import JsonFormatter, RequestIdFilter, TextFormatter, configure, request_id_var


def record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("smsgw.test", logging.WARNING, __file__, 1, msg, args or ("x",), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_carry_the_fields_and_extras() -> None:
    line = JsonFormatter().format(record(request_id="r1", message_id="m1", attempts=2))
    entry = json.loads(line)
    assert entry["message"] == "hello x"
    assert (entry["level"], entry["logger"]) == ("WARNING", "smsgw.test")
    assert (entry["request_id"], entry["message_id"], entry["attempts"]) == ("r1", "m1", 2)
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert "\n" not in line


def test_json_lines_hold_tracebacks_and_odd_extras() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record(exc_info=sys.exc_info(), thing=object())
    entry = json.loads(JsonFormatter().format(rec))
    assert "ValueError: boom" in entry["exc"]
    assert entry["thing"].startswith("<object")


def test_the_filter_takes_the_request_id_from_the_context_unless_given() -> None:
    token = request_id_var.set("ctx-id")
    try:
        plain = record()
        RequestIdFilter().filter(plain)
        assert plain.request_id == "ctx-id"
        given = record(request_id="own-id")
        RequestIdFilter().filter(given)
        assert given.request_id == "own-id"
    finally:
        request_id_var.reset(token)
    outside = record()
    RequestIdFilter().filter(outside)
    assert outside.request_id is None


def test_text_shows_the_request_id_when_there_is_one() -> None:
    assert " smsgw.test [r9]: hello x" in TextFormatter().format(record(request_id="r9"))
    assert " smsgw.test: hello x" in TextFormatter().format(record())


def test_configure_picks_the_format_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        monkeypatch.setenv("SMSGW_LOG_FORMAT", "json")
        configure(level=logging.INFO)
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter)
        stream = io.StringIO()
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        token = request_id_var.set("abc")
        try:
            logging.getLogger("smsgw.x").info("served")
        finally:
            request_id_var.reset(token)
        assert json.loads(stream.getvalue())["request_id"] == "abc"
        monkeypatch.delenv("SMSGW_LOG_FORMAT")
        configure()
        assert isinstance(root.handlers[0].formatter, TextFormatter)
        configure(json=True)
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
