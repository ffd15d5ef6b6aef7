"""Per-request bookkeeping: the request id, the access log line, the counters /metrics reads.

Cheap on purpose, since every request pays it: two ContextVar sets on the way in; on the way
out one dict increment, one histogram bisect, one header, and a log call only when INFO is on.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
import time
from contextvars import ContextVar
from typing import cast

from quart import Quart, Response, current_app

from smsgw.engine.histogram import LATENCY_BUCKETS, Histogram
from smsgw.http.context import current_request, optional_header
from smsgw.http.problems import problem_code_var
from smsgw.logs import request_id_var

REQUEST_ID_HEADER = "X-Request-Id"
# What a client may choose as its request id: enough for UUIDs and trace ids, nothing that
# could forge a log line or carry a secret's worth of arbitrary text.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Other methods reach only unmatched routes; naming them in labels would let clients grow the
# metrics without bound.
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

access_log = logging.getLogger("smsgw.http.access")
_started: ContextVar[float | None] = ContextVar("smsgw_request_started", default=None)


# Request ids need to be unique, not secret: a PRNG seeded from the OS, like message ids
# (secrets.token_hex is a getrandom syscall per request).
_id_random = random.Random(secrets.randbits(128))


def new_request_id() -> str:
    return f"{_id_random.getrandbits(64):016x}"


class HttpStats:
    """Requests answered, by (route rule, method, status, problem code), and their durations
    by (route rule, method): accept latency is the `POST /v1/messages` (and batch) series."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int, str], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}

    def record(self, route: str, method: str, status: int, code: str, seconds: float) -> None:
        key = (route, method, status, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.durations.get((route, method))
        if histogram is None:
            histogram = self.durations[(route, method)] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)


def http_stats() -> HttpStats:
    return cast(HttpStats, current_app.extensions["smsgw.http_stats"])


def install(app: Quart) -> HttpStats:
    """Add the request id, timing, counting and access-log hooks to `app`."""
    stats = app.extensions["smsgw.http_stats"] = HttpStats()

    @app.before_request
    async def begin() -> None:
        incoming = optional_header(REQUEST_ID_HEADER)
        if incoming is None or not _CLIENT_REQUEST_ID.fullmatch(incoming):
            incoming = new_request_id()
        request_id_var.set(incoming)
        problem_code_var.set(None)
        _started.set(time.perf_counter())

    @app.after_request
    async def finish(response: Response) -> Response:
        started = _started.get()
        elapsed = 0.0 if started is None else time.perf_counter() - started
        request_id = request_id_var.get() or new_request_id()
        response.headers[REQUEST_ID_HEADER] = request_id
        req = current_request()
        rule = req.url_rule.rule if req.url_rule is not None else "unmatched"
        method = req.method if req.method in _METHODS else "OTHER"
        status = response.status_code
        code = (problem_code_var.get() or "") if status >= 400 else ""
        stats.record(rule, method, status, code, elapsed)
        if access_log.isEnabledFor(logging.INFO):
            # The path only: a query string is the client's, and may hold anything.
            access_log.info(
                "%s %s %d %.1fms%s",
                method,
                req.path,
                status,
                elapsed * 1000,
                f" {code}" if code else "",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": req.path,
                    "status": status,
                    "code": code or None,
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )
        return response

    return stats
