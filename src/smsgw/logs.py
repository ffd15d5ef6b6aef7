"""Logging setup: human-readable or JSON lines, each record tagged with its request id.

The request id of the HTTP request being served lives in a ContextVar, so every log record
made while serving it (in the handler, in the engine calls it awaits) carries it without
passing it around. Work that leaves the request (a message in the actors) carries its own
copy (`OutboundSms.request_id`) and passes it as `extra={"request_id": ...}`.

No secret is ever logged: nothing here formats headers or request bodies, and callers log
paths without query strings.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from typing import Any

import msgspec

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "smsgw_request_id", default=None
)

# What a LogRecord has of its own; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_encoder = msgspec.json.Encoder()


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` from the request being served, unless the caller passed one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601), level, logger, message, request_id when
    there is one, any `extra=` fields, and the traceback as `exc`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return _encoder.encode(entry).decode()
        except (TypeError, ValueError):
            return _fallback(entry)


class TextFormatter(logging.Formatter):
    """The human-readable default, with ` [request id]` after the logger name when set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.rid = f" [{request_id}]" if request_id else ""
        return super().format(record)


def configure(*, json: bool | None = None, level: int = logging.WARNING) -> None:
    """Set up the root logger for the `smsgw` command. `json=None` reads SMSGW_LOG_FORMAT
    (`json` or `text`, the default)."""
    if json is None:
        json = os.environ.get("SMSGW_LOG_FORMAT", "text").strip().lower() == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _iso(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _fallback(entry: dict[str, Any]) -> str:
    """Values msgspec cannot encode (an object passed in `extra=`) become their repr."""
    safe = {k: v if isinstance(v, str | int | float | bool) else repr(v) for k, v in entry.items()}
    return _encoder.encode(safe).decode()
