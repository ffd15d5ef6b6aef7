"""The client's errors: one base class, the gateway's problem answers, bad callbacks."""

from __future__ import annotations

from typing import Any


class SmsgwError(Exception):
    """Every error this client raises (transport failures stay httpx's own)."""


class ApiError(SmsgwError):
    """A problem+json answer (RFC 9457): `status` the HTTP status, `code` the gateway's stable
    machine-readable code (`insufficient_credit`, `recipient_rate_limited`, ...), `detail`
    what to do, `retry_after` seconds to wait (429 and 503), `field` the field or parameter
    at fault, and `problem` every member as the gateway sent it."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        retry_after: int | None = None,
        field: str | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after
        self.field = field
        self.problem = problem or {}


class CallbackVerificationError(SmsgwError):
    """A status callback whose signature is missing, wrong or too old: do not trust it."""
