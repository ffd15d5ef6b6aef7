"""The senders an account may use (admin): PUT /v1/accounts/{id}/senders.

Kept with the account's other settings (migration 010): every node caches them and learns a
change from the accounts trigger's notification, so a send checks its sender with no query
(routes/messages.py, `Intake.sender`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from quart import Response

from smsgw.engine import sms as rules
from smsgw.engine.messages import AccountSettings
from smsgw.http.api import Api
from smsgw.http.context import gateway, json_response
from smsgw.http.problems import ProblemError, from_store
from smsgw.http.routes.accounts import ACCOUNT
from smsgw.http.routes.messages import DEFAULT_SENDER
from smsgw.http.schemas import AccountId, SendersIn, SendersOut

api = Api("senders", __name__, tag="accounts")


@runtime_checkable
class SendersStore(Protocol):
    """What this route needs of the store beyond FrontDoorStore (PgStore has it)."""

    async def update_senders(
        self, account_id: int, senders: Sequence[str], default: str | None
    ) -> AccountSettings | None: ...


@api.route(
    "PUT",
    ACCOUNT + "/senders",
    "Replace the senders an account may use, and its default sender",
    auth="admin",
    body=SendersIn,
    responses={200: SendersOut},
    problems=(503,),
    description=(
        "With a list, the account's sends may use only its senders (else 422"
        " `sender_not_allowed` naming `sender` or `from`), and a send without one uses"
        " `default` (null: the first of `senders`). An empty list lets it send from any"
        ' valid sender, as an account without a list does (default "smsgw", or'
        " `default`). Holds on every node within a notification's latency."
    ),
)
async def put_senders(account_id: AccountId) -> Response:
    """Replace the account's senders and default sender. An empty list lets it send from any
    valid sender again, as an account without a list does."""
    gw = gateway()
    gw.require_admin()
    data = await gw.body(SendersIn)
    for i, sender in enumerate(data.senders):
        problem = rules.sender_problem(sender)
        if problem:
            raise ProblemError(
                422, "invalid_field", f"`senders[{i}]` {problem}", field=f"senders[{i}]"
            )
    senders = list(dict.fromkeys(data.senders))  # in order, each once
    default = data.default
    if default is not None:
        problem = rules.sender_problem(default)
        if problem:
            raise ProblemError(422, "invalid_field", f"`default` {problem}", field="default")
        if senders and default not in senders:
            raise ProblemError(
                422,
                "invalid_field",
                f"`default` {default!r} must be one of `senders`",
                field="default",
            )
    store = gw.reads
    if not isinstance(store, SendersStore):  # a store without senders: only in tests
        raise ProblemError(503, "unavailable", "this node's store keeps no senders")
    stored = await from_store(
        lambda: store.update_senders(account_id, senders, default), "store the senders"
    )
    if stored is None:
        raise ProblemError(404, "account_not_found", f"no account {account_id}")
    gw.engine.learn_settings(account_id, stored)
    # The sender a send without one uses now.
    default = stored.default_sender or (stored.senders[0] if stored.senders else DEFAULT_SENDER)
    return json_response(SendersOut(account_id, list(stored.senders), default))
