"""Accounts: creation and top-ups (admin), the account's own view."""

from __future__ import annotations

from quart import Blueprint, Response

from smsgw.http.context import gateway, hash_key, json_response, new_api_key
from smsgw.http.problems import ProblemError
from smsgw.http.schemas import AccountCreatedOut, AccountOut, BalanceOut, CreateAccountIn, TopUpIn

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
    return json_response(AccountCreatedOut(account.id, account.name, api_key, account.balance), 201)


@bp.post("/v1/accounts/<int:account_id>/topups")
async def topup(account_id: int) -> Response:
    gw = gateway()
    gw.require_admin()
    data = await gw.body(TopUpIn)
    balance = await gw.call(lambda: gw.engine.topup(account_id, data.amount))
    if balance is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id}")
    return json_response(BalanceOut(balance))


@bp.get("/v1/account")
async def get_account() -> Response:
    gw = gateway()
    account = await gw.reads.account(await gw.require_account())
    if account is None:
        raise ProblemError(401, "unauthenticated", "unknown API key")
    return json_response(AccountOut(account.id, account.name, account.balance, account.held))
