"""problem+json (RFC 9457) error responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import msgspec
from quart import Response

_encoder = msgspec.json.Encoder()
# The code of the problem this request answered with, for the access log and /metrics.
problem_code_var: ContextVar[str | None] = ContextVar("smsgw_problem_code", default=None)

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class ProblemError(Exception):
    """Raised anywhere in a handler: becomes a problem+json response."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra

    def response(self) -> Response:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return problem_response(self.status, self.code, self.detail, headers=headers, **self.extra)


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """The problem+json answer. An integer `retry_after` member also becomes the Retry-After
    header (429 and 503 say when to come back)."""
    problem_code_var.set(code)
    retry_after = extra.get("retry_after")
    if isinstance(retry_after, int):
        headers = {**(headers or {}), "Retry-After": str(retry_after)}
    body = {
        "type": f"https://smsgw.dev/problems/{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return Response(
        _encoder.encode(body),
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )


T = TypeVar("T")


async def from_store(call: Callable[[], Awaitable[T]], what: str) -> T:
    """`call`'s answer; a failure of the store (not a problem it raised itself) a 503 that
    says what could not be done, with a Retry-After."""
    try:
        return await call()
    except ProblemError:
        raise
    except Exception as exc:
        raise ProblemError(503, "unavailable", f"could not {what}: {exc}", retry_after=1) from None


def message_not_found(message_id: str) -> ProblemError:
    """The 404 for a message id the calling account has no message under (another account's,
    none, or no message id at all): the same answer whichever, so ids reveal nothing."""
    return ProblemError(404, "message_not_found", f"no message {message_id}")


def storage_unavailable() -> ProblemError:
    """503 (with Retry-After, as every 503): PostgreSQL could not be reached or could not
    commit; nothing of the request was stored."""
    return ProblemError(503, "unavailable", "storage is unavailable; retry shortly")
