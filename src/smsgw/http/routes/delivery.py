"""Delivery: operators' delivery reports (DLRs), and the account's status callback settings."""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Sequence
from typing import cast

import msgspec
from quart import Blueprint, Response, current_app

from smsgw.engine.callbacks import callback_url_problem
from smsgw.engine.messages import DeliveryReport
from smsgw.http.context import MAX_BATCH_BODY_BYTES, gateway, hash_key, json_response
from smsgw.http.problems import ProblemError
from smsgw.http.schemas import (
    AccountOut,
    AccountPatchIn,
    DeliveryCounts,
    DeliveryReportsIn,
    DeliveryReportsOut,
    DeliveryResultOut,
    SigningSecretOut,
)

bp = Blueprint("delivery", __name__)

OPERATOR_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


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


@bp.post("/v1/dlr/<operator>")
async def delivery_reports(operator: str) -> Response:
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


@bp.patch("/v1/account")
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


@bp.post("/v1/account/signing-secret/rotate")
async def rotate_signing_secret() -> Response:
    """A new signing secret for the account's callbacks, shown only in this answer. Every
    callback sent from now on, retries included, is signed with it."""
    gw = gateway()
    account_id = await gw.require_account()
    secret = new_signing_secret()
    if not await gw.reads.rotate_signing_secret(account_id, secret):
        raise ProblemError(401, "unauthenticated", "unknown API key")
    return json_response(SigningSecretOut(account_id, secret))
