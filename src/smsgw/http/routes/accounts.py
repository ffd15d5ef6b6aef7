"""Accounts: creation and top-ups (admin), the account's own view, key rotation."""

from __future__ import annotations

from quart import Blueprint, Response

from smsgw.engine import numbers
from smsgw.engine.credit import CREDIT_MAX, TopUpTooLarge
from smsgw.engine.messages import AccountSettings
from smsgw.http.context import gateway, hash_key, json_response, new_api_key
from smsgw.http.idempotency import idempotent_admin
from smsgw.http.problems import ProblemError
from smsgw.http.schemas import (
    AccountCreatedOut,
    AccountOut,
    AccountSettingsIn,
    AccountSettingsOut,
    BalanceOut,
    CreateAccountIn,
    KeyRotatedOut,
    TopUpIn,
)

bp = Blueprint("accounts", __name__)


@bp.post("/v1/accounts")
async def create_account() -> Response:
    gw = gateway()
    gw.require_admin()
    data = await gw.body(CreateAccountIn)
    api_key = new_api_key()
    account = await gw.call(
        lambda: gw.engine.create_account(data.name, data.credit, hash_key(api_key))
    )
    return json_response(
        AccountCreatedOut(
            account.id, account.name, api_key, account.balance, account.signing_secret or ""
        ),
        201,
    )


# Account ids are PostgreSQL bigints: a larger one is no account (404), not a query error
# that would fail the whole group commit it rode in.
@bp.post("/v1/accounts/<int(max=9223372036854775807):account_id>/topups")
@idempotent_admin
async def topup(account_id: int) -> Response:
    """Add credit. A retry under the same Idempotency-Key credits once. An amount the account's
    credit cannot hold (its figures are PostgreSQL bigints) is a 422 and changes nothing: it is
    found in the group commit's transaction, where the account's row is locked, and only that
    top-up is refused (not its group)."""
    gw = gateway()
    gw.require_admin()
    data = await gw.body(TopUpIn)
    try:
        balance = await gw.call(lambda: gw.engine.topup(account_id, data.amount))
    except TopUpTooLarge as exc:
        raise ProblemError(
            422,
            "amount_too_large",
            f"the account's credit would pass {CREDIT_MAX}; it can take at most {exc.room} more",
            field="amount",
        ) from None
    if balance is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id}")
    return json_response(BalanceOut(balance))


@bp.put("/v1/accounts/<int(max=9223372036854775807):account_id>/settings")
async def put_settings(account_id: int) -> Response:
    """Replace an account's scheduling and rate settings (a missing field: the default). They
    apply on this node at once and on every other node when the change's notification arrives
    (migration 006's trigger: well under a second)."""
    gw = gateway()
    gw.require_admin()
    data = await gw.body(AccountSettingsIn)
    if data.default_country is not None and not numbers.is_country(data.default_country):
        raise ProblemError(
            422,
            "invalid_field",
            f"`default_country` {data.default_country!r} is no country with a numbering plan",
            field="default_country",
        )
    settings = AccountSettings(
        send_rate=data.send_rate,
        express_deadline_ms=data.express_deadline_ms,
        recipient_limit_per_hour=data.recipient_limit_per_hour,
        api_rate=data.api_rate,
        default_country=data.default_country,
    )
    try:
        stored = await gw.reads.update_settings(account_id, settings)
    except Exception as exc:
        raise ProblemError(503, "unavailable", f"could not store the settings: {exc}") from None
    if stored is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id}")
    gw.engine.learn_settings(account_id, stored)
    return json_response(
        AccountSettingsOut(
            account_id,
            stored.send_rate,
            stored.express_deadline_ms,
            stored.recipient_limit_per_hour,
            stored.api_rate,
            stored.default_country,
        )
    )


@bp.get("/v1/account")
async def get_account() -> Response:
    gw = gateway()
    account = await gw.reads.account(await gw.require_account())
    if account is None:
        raise ProblemError(401, "unauthenticated", "unknown API key")
    return json_response(
        AccountOut(account.id, account.name, account.balance, account.held, account.callback_url)
    )


@bp.post("/v1/account/keys/rotate")
async def rotate_key() -> Response:
    """A new API key for the calling account, shown only in this answer; the key that made the
    call stops working at once on this node (it is dropped from the KeyCache) and on every
    other node when the change's notification arrives (well under a second). No body. Of two
    concurrent rotations with the same key, one wins; the other gets 401, as the key it used
    is gone."""
    gw = gateway()
    account_id = await gw.require_account()
    old_hash = gw.bearer()
    api_key = new_api_key()
    rotated = await gw.reads.rotate_key(account_id, old_hash, hash_key(api_key))
    gw.keys.forget(old_hash)
    if not rotated:
        raise ProblemError(401, "unauthenticated", "this API key has been rotated already")
    return json_response(KeyRotatedOut(account_id, api_key))
