"""Verifying a status callback's signature, as the gateway signs it.

Kept to one function on purpose: when the gateway's scheme changes, only this changes. The
gateway signs as Standard Webhooks prescribe (`webhook-id`, `webhook-timestamp`,
`webhook-signature: v1,<base64 HMAC-SHA256>` over `id.timestamp.body`, the key the base64
after `whsec_`), and still sends its earlier, deprecated headers (`X-Smsgw-Timestamp`,
`X-Smsgw-Signature: sha256=<hex>` over `timestamp.body`, the whole secret as key). A callback
with the standard headers is checked by them; one with only the earlier ones, by those.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

import msgspec

from smsgw.client.errors import CallbackVerificationError
from smsgw.client.models import StatusCallback

TOLERANCE_S = 300  # how far a callback's timestamp may be from this machine's clock
_decode = msgspec.json.Decoder(StatusCallback).decode


def verify_callback(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> StatusCallback:
    """The callback in `body` once its signature checks out with the account's signing
    `secret` (`whsec_...`); raises CallbackVerificationError for a missing, wrong or stale
    (more than `tolerance_s` from `now`, default this machine's clock) signature. `body` must
    be the exact bytes received; header names are matched in any case."""
    lower = {name.lower(): value for name, value in headers.items()}
    signatures = lower.get("webhook-signature")
    if signatures is not None:
        webhook_id = lower.get("webhook-id", "")
        stamp = lower.get("webhook-timestamp", "")
        _check_time(stamp, tolerance_s, now)
        encoded = secret.removeprefix("whsec_")
        try:
            key = base64.b64decode(encoded + "==") or secret.encode()
        except (binascii.Error, ValueError):
            key = secret.encode()
        mac = hmac.new(key, f"{webhook_id}.{stamp}.".encode() + body, hashlib.sha256)
        expected = base64.b64encode(mac.digest()).decode()
        offered = [s.split(",", 1) for s in signatures.split()]
        if not any(
            len(s) == 2 and s[0] == "v1" and hmac.compare_digest(s[1], expected) for s in offered
        ):
            raise CallbackVerificationError("the webhook-signature does not match")
    elif "x-smsgw-signature" in lower:
        stamp = lower.get("x-smsgw-timestamp", "")
        _check_time(stamp, tolerance_s, now)
        mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256)
        if not hmac.compare_digest(lower["x-smsgw-signature"], "sha256=" + mac.hexdigest()):
            raise CallbackVerificationError("the X-Smsgw-Signature does not match")
    else:
        raise CallbackVerificationError("the callback carries no signature")
    try:
        return _decode(body)
    except msgspec.DecodeError as exc:
        raise CallbackVerificationError(
            f"the signed body is not a status callback: {exc}"
        ) from None


def _check_time(stamp: str, tolerance_s: float, now: float | None) -> None:
    if not (stamp.isascii() and stamp.isdigit()):
        raise CallbackVerificationError("the callback's timestamp is missing or not a number")
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance_s:
        raise CallbackVerificationError("the callback's timestamp is too far from this clock")
