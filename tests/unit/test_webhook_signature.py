"""The Standard Webhooks signature the gateway computes, against the published library's own
signing and verification (the same bytes for the gateway's secrets and odd ones alike)."""

from __future__ import annotations

import secrets
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from smsgw.engine.callbacks import sign_webhook, signature_headers, signing_key, verify

BODY = '{"event":"message.status","delivery_id":42,"status":"sent","reason":"ü"}'.encode()


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_" + secrets.token_hex(32),  # what the gateway makes (and its SQL default)
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # a library-made one: base64 of 24 bytes
        "whsec_dGVzdA",  # unpadded base64
    ],
)
def test_the_library_verifies_what_the_gateway_signs(secret: str) -> None:
    now = int(time.time())
    headers = signature_headers(secret, 42, now, BODY)
    assert headers["webhook-id"] == headers["X-Smsgw-Delivery"] == "42"
    assert headers["webhook-timestamp"] == headers["X-Smsgw-Timestamp"] == str(now)
    assert Webhook(secret).verify(BODY, headers) == {
        "event": "message.status",
        "delivery_id": 42,
        "status": "sent",
        "reason": "ü",
    }
    # The deprecated header still verifies as before.
    assert verify(secret, str(now), BODY, headers["X-Smsgw-Signature"])
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY + b" ", headers)


def test_a_gateway_secret_decodes_to_48_bytes() -> None:
    secret = "whsec_" + secrets.token_hex(32)
    assert len(signing_key(secret)) == 48
    assert signing_key(secret) == Webhook(secret)._whsecret


def test_a_secret_that_is_not_base64_still_signs() -> None:
    # Never made by the gateway; its callbacks are signed (with the UTF-8 bytes) all the same.
    key = signing_key("whsec_k")
    assert key == b"whsec_k"
    assert sign_webhook(key, "1", 1, b"{}").startswith("v1,")
