"""Logging setup: human-readable or JSON lines, each record tagged with its request id.

The request id of the HTTP request being served lives in a ContextVar, so every log record
made while serving it (in the handler, in the engine calls it awaits) carries it without
passing it around. Work that leaves the request (a message in the actors) carries its own
copy (`OutboundSms.request_id`) and passes it as `extra={"request_id": ...}`.

No secret is ever logged: nothing here formats headers or request bodies, and callers log
paths without query strings and URLs through `redact_url`. As a second line of defence, both
formatters pass every line through `scrub`: a URL loses its query string, fragment and
password, `password=...` its value, and anything shaped like one of the gateway's keys or
secrets (`sk_`, `adm_`, `whsec_`) all but its prefix.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "smsgw_request_id", default=None
)

# What a LogRecord has of its own; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_encoder = msgspec.json.Encoder()


# A URL's query string or fragment (anything up to whitespace or a quote); its password.
_URL_TAIL = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s?#\"'<>]*)[?#][^\s\"'<>]*")
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@\"'<>]*):[^\s/@\"'<>]*@")
_PASSWORD_WORD = re.compile(r"(?i)\b(password|passwd|pwd)\s*=\s*[^\s&;,]+")
_KEY_LIKE = re.compile(r"\b(sk|adm|whsec)_[A-Za-z0-9_\-]{6,}")


def scrub(text: str) -> str:
    """`text` without URL query strings, fragments and passwords, `password=` values and
    key-shaped words (kept: their prefix, so a reader sees what was there)."""
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\1:***@", _URL_TAIL.sub(r"\1", text))
    if "=" in text:
        text = _PASSWORD_WORD.sub(r"\1=***", text)
    if "_" in text:
        text = _KEY_LIKE.sub(r"\1_***", text)
    return text


def redact_url(url: str) -> str:
    """`url` as logs may show it: scheme, user (no password), host, port and path; no query
    string or fragment (a callback URL's query may carry the receiver's token, a database
    URL's its password)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return scrub(url.split("?", 1)[0].split("#", 1)[0])
    if not parts.scheme or not parts.netloc:
        return scrub(url.split("?", 1)[0].split("#", 1)[0])
    if ":" in host:
        host = f"[{host}]"
    user = f"{parts.username}@" if parts.username else ""
    netloc = f"{user}{host}" + (f":{port}" if port is not None else "")
    return f"{parts.scheme}://{netloc}{parts.path}"


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
            "message": scrub(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and value is not None:
                entry[key] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = scrub(record.exc_text)
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
        return scrub(super().format(record))


# Libraries that say too much at INFO for a node's log: httpx a line per request (the
# simulated operators' delivery reports). (The embedded PostgreSQL's chatter goes to a file
# of its own: storage/embedded.py.)
QUIET_LOGGERS = ("httpx", "httpcore", "asyncio")
ACCESS_LOGGER = "smsgw.http.access"


def configure(
    *,
    json: bool | None = None,
    level: int = logging.WARNING,
    smsgw_level: int | None = None,
    access_log: bool = True,
) -> None:
    """Set up the root logger for the `smsgw` command. `json=None` reads SMSGW_LOG_FORMAT
    (`json` or `text`, the default). `smsgw_level` sets the gateway's own loggers apart from
    the root's (DEBUG for `serve -v`); `access_log=False` silences the per-request lines."""
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
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.getLogger("smsgw").setLevel(logging.NOTSET if smsgw_level is None else smsgw_level)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if access_log else logging.WARNING)


def _iso(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _fallback(entry: dict[str, Any]) -> str:
    """Values msgspec cannot encode (an object passed in `extra=`) become their repr."""
    safe = {k: v if isinstance(v, str | int | float | bool) else repr(v) for k, v in entry.items()}
    return _encoder.encode(safe).decode()
