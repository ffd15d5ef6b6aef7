"""Accounts: creation, top-ups, settings, the list, suspension (admin); the account's own
view, key rotation."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec
from quart import Response

from smsgw.engine import numbers
from smsgw.engine.credit import CREDIT_MAX, TopUpTooLarge
from smsgw.engine.messages import AccountRecord, AccountSettings
from smsgw.http.api import Api
from smsgw.http.context import gateway, hash_key, json_response, new_api_key
from smsgw.http.idempotency import idempotent_admin
from smsgw.http.params import whole_number
from smsgw.http.problems import ProblemError, from_store
from smsgw.http.schemas import (
    MAX_ID,
    AccountAdminOut,
    AccountCreatedOut,
    AccountId,
    AccountOut,
    AccountSettingsIn,
    AccountSettingsOut,
    AccountsPage,
    BalanceOut,
    CreateAccountIn,
    KeyRotatedOut,
    Name,
    PageCursor,
    PageLimit,
    TopUpIn,
)

DEFAULT_LIMIT = 100

api = Api("accounts", __name__, tag="accounts")
NameFilter = Annotated[
    Name, msgspec.Meta(description="only accounts whose name contains this (any case)")
]


class AccountsQuery(msgspec.Struct, frozen=True):
    """GET /v1/accounts: a page, and a filter by name."""

    limit: PageLimit = DEFAULT_LIMIT
    cursor: PageCursor | None = None  # the last id of the previous page
    name: NameFilter | None = None


@api.route(
    "POST",
    "/v1/accounts",
    "Create an account; its API key is shown only in this answer",
    auth="admin",
    body=CreateAccountIn,
    responses={201: AccountCreatedOut},
    problems=(503,),
    description=(
        "The answer holds the account's API key and its callback `signing_secret`, each"
        " shown only here."
    ),
)
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
ACCOUNT = "/v1/accounts/<int(max=9223372036854775807):account_id>"


@api.route(
    "POST",
    ACCOUNT + "/topups",
    "Add credit to an account",
    auth="admin",
    body=TopUpIn,
    responses={200: BalanceOut},
    problems=(503,),
    idempotent=True,
    description=(
        "An `amount` the account's credit cannot hold (2^63 - 1 in all) is a 422"
        " `amount_too_large` and changes nothing. Idempotency-Key: the admin's keys are"
        " per target account."
    ),
)
@idempotent_admin
async def topup(account_id: AccountId) -> Response:
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


@api.route(
    "PUT",
    ACCOUNT + "/settings",
    "Replace an account's scheduling and rate settings",
    auth="admin",
    body=AccountSettingsIn,
    responses={200: AccountSettingsOut},
    problems=(503,),
    description=(
        "`send_rate`: bulk segments a second dispatched to operators (as operators count;"
        " paced, never refused); `express_deadline_ms`: accept to operator for express messages;"
        " `recipient_limit_per_hour`: messages to one number; `api_rate`: API requests a"
        " second; `price_per_segment` and `express_surcharge`: the account's prices, in the"
        " smallest currency unit (an express segment costs both). A missing or null field"
        " is the node's default."
    ),
)
async def put_settings(account_id: AccountId) -> Response:
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


@api.route(
    "GET",
    "/v1/accounts",
    "A page of accounts, in id order",
    auth="admin",
    query=AccountsQuery,
    responses={200: AccountsPage},
    problems=(503,),
)
async def list_accounts() -> Response:
    """A page of accounts in id order, optionally only those whose name contains `name`."""
    gw = gateway()
    gw.require_admin()
    query = gw.query(AccountsQuery)
    limit, name = query.limit, query.name
    after = 0 if query.cursor is None else whole_number(query.cursor)
    if after is None or after > MAX_ID:
        raise ProblemError(
            422,
            "invalid_field",
            f"`cursor` must be a whole number from 0 to {MAX_ID}, in ASCII digits",
            field="cursor",
        )
    rows = await from_store(lambda: gw.reads.accounts_page(after, limit + 1, name), "list accounts")
    items = [admin_view(a) for a in rows[:limit]]
    next_cursor = str(items[-1].id) if len(rows) > limit else None
    return json_response(AccountsPage(items, next_cursor))


@api.route(
    "GET",
    ACCOUNT,
    "An account: its credit, settings, senders, when it was made, whether it is suspended",
    auth="admin",
    responses={200: AccountAdminOut},
    problems=(503,),
)
async def show_account(account_id: AccountId) -> Response:
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


@api.route(
    "POST",
    ACCOUNT + "/suspend",
    "Suspend an account",
    auth="admin",
    responses={200: AccountAdminOut},
    problems=(503,),
    idempotent=False,
    description=(
        "Its sends get 403 `account_suspended` on every node within a second; its queued"
        " messages wait, unsent and uncharged (express ones end at their deadline, refunded),"
        " until it resumes. Its reads and reports still work."
    ),
)
async def suspend(account_id: AccountId) -> Response:
    """Its sends get 403 `account_suspended` on every node within a second, and its queued
    messages wait (unsent, uncharged) until it resumes. Suspending a suspended account keeps
    the time of the first suspension."""
    return await set_suspended(account_id, True)


@api.route(
    "POST",
    ACCOUNT + "/resume",
    "Resume a suspended account",
    auth="admin",
    responses={200: AccountAdminOut},
    problems=(503,),
    idempotent=False,
    description="Its sends are taken again and its queued messages go out.",
)
async def resume(account_id: AccountId) -> Response:
    """Its sends are taken again and its queued messages go out."""
    return await set_suspended(account_id, False)


@api.route("GET", "/v1/account", "The calling account", responses={200: AccountOut})
async def get_account() -> Response:
    gw = gateway()
    account = await gw.reads.account(await gw.require_account())
    if account is None:
        raise ProblemError(401, "unauthenticated", "unknown API key")
    return json_response(
        AccountOut(account.id, account.name, account.balance, account.held, account.callback_url)
    )


@api.route(
    "POST",
    "/v1/account/keys/rotate",
    "Replace the calling account's API key; the old one stops working",
    responses={200: KeyRotatedOut},
    idempotent=False,
    problems=(503,),
)
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
