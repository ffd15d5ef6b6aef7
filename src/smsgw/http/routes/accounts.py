"""Accounts: creation, top-ups, settings, the list, suspension (admin); the account's own
view, key rotation."""

from __future__ import annotations

from datetime import UTC, datetime

from quart import Blueprint, Response, request

from smsgw.engine import numbers
from smsgw.engine.credit import CREDIT_MAX, TopUpTooLarge
from smsgw.engine.messages import AccountRecord, AccountSettings
from smsgw.http.context import gateway, hash_key, json_response, new_api_key
from smsgw.http.idempotency import idempotent_admin
from smsgw.http.params import query_params, whole_number
from smsgw.http.problems import ProblemError, from_store
from smsgw.http.schemas import (
    AccountAdminOut,
    AccountCreatedOut,
    AccountOut,
    AccountSettingsIn,
    AccountSettingsOut,
    AccountsPage,
    BalanceOut,
    CreateAccountIn,
    KeyRotatedOut,
    TopUpIn,
)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1_000
MAX_NAME_FILTER = 200

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
        price_per_segment=data.price_per_segment,
        express_surcharge=data.express_surcharge,
    )
    stored = await from_store(
        lambda: gw.reads.update_settings(account_id, settings), "store the settings"
    )
    if stored is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id}")
    gw.engine.learn_settings(account_id, stored)
    return json_response(settings_out(account_id, stored))


def settings_out(account_id: int, settings: AccountSettings) -> AccountSettingsOut:
    return AccountSettingsOut(
        account_id,
        settings.send_rate,
        settings.express_deadline_ms,
        settings.recipient_limit_per_hour,
        settings.api_rate,
        settings.default_country,
        settings.price_per_segment,
        settings.express_surcharge,
    )


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def admin_view(account: AccountRecord) -> AccountAdminOut:
    settings = account.settings
    return AccountAdminOut(
        id=account.id,
        name=account.name,
        balance=account.balance,
        held=account.held,
        captured=account.captured,
        topped_up=account.topped_up,
        created_at=rfc3339(account.created_at),
        suspended=account.suspended_at is not None,
        suspended_at=None if account.suspended_at is None else rfc3339(account.suspended_at),
        callback_url=account.callback_url,
        settings=settings_out(account.id, settings),
        senders=list(settings.senders),
        default_sender=settings.default_sender,
    )


@bp.get("/v1/accounts")
async def list_accounts() -> Response:
    """A page of accounts in id order, optionally only those whose name contains `name`."""
    gw = gateway()
    gw.require_admin()
    params = query_params(request.args, ("limit", "cursor", "name"))
    limit = whole_number(params, "limit", low=1, high=MAX_LIMIT, default=DEFAULT_LIMIT)
    after = whole_number(params, "cursor", low=0, high=2**63 - 1, default=0)
    name = params.get("name")
    if name is not None and not 1 <= len(name) <= MAX_NAME_FILTER:
        raise ProblemError(
            422,
            "invalid_field",
            f"`name` must be 1 to {MAX_NAME_FILTER} characters",
            field="name",
        )
    rows = await from_store(lambda: gw.reads.accounts_page(after, limit + 1, name), "list accounts")
    items = [admin_view(a) for a in rows[:limit]]
    next_cursor = str(items[-1].id) if len(rows) > limit else None
    return json_response(AccountsPage(items, next_cursor))


@bp.get("/v1/accounts/<int(max=9223372036854775807):account_id>")
async def show_account(account_id: int) -> Response:
    gw = gateway()
    gw.require_admin()
    account = await from_store(lambda: gw.reads.account_record(account_id), "read the account")
    if account is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id}")
    return json_response(admin_view(account))


async def set_suspended(account_id: int, suspended: bool) -> Response:
    gw = gateway()
    gw.require_admin()
    account = await from_store(
        lambda: gw.reads.set_suspended(account_id, suspended),
        "suspend the account" if suspended else "resume the account",
    )
    if account is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id}")
    # Here at once; every other node when the accounts trigger's notification arrives.
    gw.engine.learn_settings(account_id, account.settings)
    return json_response(admin_view(account))


@bp.post("/v1/accounts/<int(max=9223372036854775807):account_id>/suspend")
async def suspend(account_id: int) -> Response:
    """Its sends get 403 `account_suspended` on every node within a second, and its queued
    messages wait (unsent, uncharged) until it resumes. Suspending a suspended account keeps
    the time of the first suspension."""
    return await set_suspended(account_id, True)


@bp.post("/v1/accounts/<int(max=9223372036854775807):account_id>/resume")
async def resume(account_id: int) -> Response:
    """Its sends are taken again and its queued messages go out."""
    return await set_suspended(account_id, False)


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
