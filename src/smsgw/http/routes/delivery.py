"""Delivery: operators' delivery reports (DLRs), and the account's status callback settings."""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Sequence
from typing import cast

import msgspec
from quart import Response, current_app

from smsgw.engine.callbacks import callback_url_problem
from smsgw.engine.messages import DeliveryReport
from smsgw.http.api import Api
from smsgw.http.context import MAX_BATCH_BODY_BYTES, gateway, hash_key, json_response
from smsgw.http.problems import ProblemError
from smsgw.http.schemas import (
    AccountOut,
    AccountPatchIn,
    DeliveryCounts,
    DeliveryReportsIn,
    DeliveryReportsOut,
    DeliveryResultOut,
    OperatorName,
    SigningSecretOut,
)

api = Api("delivery", __name__, tag="delivery")

OPERATOR_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")

# How status callbacks are sent and signed: the same words on every route that sets a URL.
CALLBACKS = (
    'Callbacks: a POST with a JSON body {event: "message.status", delivery_id, message_id,'
    " status, reason, client_ref, at}, signed as Standard Webhooks prescribe: `webhook-id`"
    " (the delivery_id, the same on every retry), `webhook-timestamp` (unix seconds) and"
    " `webhook-signature: v1,<base64>`, the HMAC-SHA256 over `<id>.<timestamp>.<body>` with"
    " the account's signing secret `whsec_<base64>` decoded as key (the published Standard"
    " Webhooks libraries verify it). The earlier headers `X-Smsgw-Timestamp`,"
    " `X-Smsgw-Delivery` and `X-Smsgw-Signature: sha256=<hex>` (HMAC-SHA256 over"
    " `<timestamp>.<body>`, the whole secret as UTF-8 key) are sent too, deprecated. Verify"
    " in constant time and refuse old timestamps."
    " Any 2xx answer is success; anything else, or no answer within 10 s, is retried with"
    " exponential backoff and full jitter for up to 24 hours. A message's callbacks arrive in"
    " the order of its status changes, at least once each. The URL must be http(s) and, in"
    " production, name a public host: loopback, private, link-local, multicast, reserved and"
    " metadata addresses and names are refused, and so is a name that resolves to one when a"
    " callback connects. A node not in production mode takes loopback hosts only."
)


class OperatorKeys:
    """Operator name -> SHA-256 digest of its DLR key (set at serve time; never the key)."""

    def __init__(self, keys: Sequence[tuple[str, str]]) -> None:
        self._digests: dict[str, bytes] = {}
        for name, key in keys:
            if not OPERATOR_NAME.match(name):
                raise ValueError(f"bad operator name {name!r}: want 1-100 of A-Z a-z 0-9 . _ : -")
            if not key:
                raise ValueError(f"operator {name!r} has an empty DLR key")
            self._digests[name] = hash_key(key)

    def check(self, operator: str, digest: bytes) -> bool:
        """Whether `digest` is this operator's key: constant time, and the same answer (no)
        for an operator with no key as for a wrong key."""
        want = self._digests.get(operator)
        if want is None:
            hmac.compare_digest(digest, digest)
            return False
        return hmac.compare_digest(digest, want)


def new_signing_secret() -> str:
    return "whsec_" + secrets.token_hex(32)


@api.route(
    "POST",
    "/v1/dlr/<operator>",
    "Delivery reports from an operator, up to 10,000 a request",
    auth="operator",
    body=DeliveryReportsIn,
    responses={200: DeliveryReportsOut},
    problems=(503,),
    description=(
        "Authenticated with the operator's own key. One result per report, in order:"
        " `applied` (the message moved from `sent` to `delivered` or `undelivered`),"
        " `duplicate` (it already has that status), `conflict` (it is final otherwise:"
        " the other report status, or `failed`; unchanged), `unknown` (no message sent"
        " through this operator has that id yet: the report is kept and applied if the"
        " message's `sent` is recorded within 24 hours). Credit was captured when the"
        " message was `sent`; an `undelivered` report does not refund it. A body that"
        " is not valid changes nothing (4xx)."
    ),
)
async def delivery_reports(operator: OperatorName) -> Response:
    """200 with one result per report, in order. `sent` moves to `delivered` or
    `undelivered`; the credit was captured at `sent` and an `undelivered` report does not
    refund it. A report that names no sent message of this operator is `unknown`: it is kept
    and applied if the message's `sent` arrives later (within 24 h)."""
    gw = gateway()
    keys = cast(OperatorKeys, current_app.extensions["smsgw.dlr_keys"])
    if not keys.check(operator, gw.bearer()):
        raise ProblemError(
            401, "unauthenticated", "unknown operator or wrong key for its delivery reports"
        )
    data = await gw.body(DeliveryReportsIn, limit=MAX_BATCH_BODY_BYTES)
    reports = [DeliveryReport(r.operator_message_id, r.status, r.error) for r in data.reports]
    results = await gw.call(lambda: gw.engine.record_deliveries(operator, reports))
    counts = {"applied": 0, "duplicate": 0, "conflict": 0, "unknown": 0}
    out = []
    for r in results:
        counts[r.result] += 1
        out.append(DeliveryResultOut(r.operator_message_id, r.result, r.message_id, r.status))
    return json_response(DeliveryReportsOut(out, DeliveryCounts(**counts)))


@api.route(
    "PATCH",
    "/v1/account",
    "Set the calling account's fields (`callback_url`)",
    tag="accounts",
    body=AccountPatchIn,
    responses={200: AccountOut},
    description=(
        "A field left out stays as it is; null clears it. `callback_url` receives the"
        " status changes of every message that has no `callback_url` of its own. " + CALLBACKS
    ),
)
async def patch_account() -> Response:
    """Set the account's fields: `callback_url` (null clears it). Messages without their own
    `callback_url` use the account's at the time of each status change."""
    gw = gateway()
    account_id = await gw.require_account()
    data = await gw.body(AccountPatchIn)
    if data.callback_url is msgspec.UNSET:
        account = await gw.reads.account(account_id)
    else:
        url = data.callback_url
        if url is not None:
            problem = callback_url_problem(url, production=gw.engine.config.production)
            if problem:
                raise ProblemError(
                    422, "invalid_field", f"`callback_url` {problem}", field="callback_url"
                )
        account = await gw.reads.set_callback_url(account_id, url)
    if account is None:
        raise ProblemError(401, "unauthenticated", "unknown API key")
    return json_response(
        AccountOut(account.id, account.name, account.balance, account.held, account.callback_url)
    )


@api.route(
    "POST",
    "/v1/account/signing-secret/rotate",
    "Replace the calling account's callback signing secret",
    tag="accounts",
    responses={200: SigningSecretOut},
    idempotent=False,
    description=(
        "The new secret is shown only in this answer; every callback sent from now on,"
        " retries of earlier ones included, is signed with it."
    ),
)
async def rotate_signing_secret() -> Response:
    """A new signing secret for the account's callbacks, shown only in this answer. Every
    callback sent from now on, retries included, is signed with it."""
    gw = gateway()
    account_id = await gw.require_account()
    secret = new_signing_secret()
    if not await gw.reads.rotate_signing_secret(account_id, secret):
        raise ProblemError(401, "unauthenticated", "unknown API key")
    return json_response(SigningSecretOut(account_id, secret))
