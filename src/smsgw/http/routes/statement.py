"""The account statement: every top-up, hold, capture and release of the calling account,
message by message and newest first, each with the balance after it (storage/statement.py).

A page continues from the position of its last entry (ledger row, place in the row): entries
committed meanwhile are newer than any page already read, so walking on neither repeats nor
skips one, and an entry's balance never changes once written.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import msgspec
from quart import Response

from smsgw.engine.ports import StatementEntry
from smsgw.http.api import Api
from smsgw.http.context import Gateway, gateway, json_response
from smsgw.http.params import cursor_bytes, cursor_of, invalid_cursor
from smsgw.http.problems import ProblemError, from_store
from smsgw.http.schemas import (
    MAX_ID,
    PageCursor,
    PageLimit,
    StatementEntryOut,
    StatementPage,
)

api = Api("statement", __name__, tag="accounts")
DEFAULT_LIMIT = 100
# A position's place in its ledger row: a row covers at most one group commit's messages.
MAX_PLACE = 2**31 - 1
_POSITION = re.compile(r"([1-9][0-9]{0,18})\.([1-9][0-9]{0,9})")


class StatementQuery(msgspec.Struct, frozen=True):
    """A page of the statement."""

    limit: PageLimit = DEFAULT_LIMIT
    cursor: PageCursor | None = None


@runtime_checkable
class StatementStore(Protocol):
    """What the route needs of the store beyond FrontDoorStore (PgStore has it)."""

    async def statement(
        self, account_id: int, before: tuple[int, int] | None, limit: int
    ) -> list[StatementEntry]: ...


def statement_store(gw: Gateway) -> StatementStore:
    store = gw.reads
    if not isinstance(store, StatementStore):  # a store without a ledger: only in tests
        raise ProblemError(503, "unavailable", "this node's store keeps no statement")
    return store


def position_cursor(position: tuple[int, int]) -> str:
    row, place = position
    return cursor_of(f"{row}.{place}".encode())


def cursor_position(cursor: str) -> tuple[int, int]:
    """The position a `next_cursor` names; a 422 for anything this API did not return."""
    raw = cursor_bytes(cursor)
    m = None if raw is None else _POSITION.fullmatch(raw.decode("latin-1"))
    if m is None or int(m.group(1)) > MAX_ID or int(m.group(2)) > MAX_PLACE:
        raise invalid_cursor()
    return int(m.group(1)), int(m.group(2))


@api.route(
    "GET",
    "/v1/account/statement",
    "The calling account's statement: every top-up, hold, capture and release, newest first",
    query=StatementQuery,
    responses={200: StatementPage},
    problems=(503,),
    description=(
        "One entry per top-up and per message's hold, capture and release, each with the"
        " `amount` moved (a message's price, as its 202 said), the `balance_after` it, the"
        " `message_id` and the time. `balance_after` is top-ups - captured - held once the"
        " entry applied: a hold lowers it, a release or a top-up raises it, a capture moves"
        " the hold to captured and leaves it. The newest entry's is the account's balance, and"
        " each entry's less its effect is the next entry's (the oldest's: 0). Pages continue"
        " from `next_cursor`: what is committed meanwhile comes before the first page, never"
        " between pages. `limit` 1 to 1,000 (default 100); a cursor this API did not return"
        " is a 422 `invalid_cursor`."
    ),
)
async def get_statement() -> Response:
    gw = gateway()
    account_id = await gw.require_account()
    query = gw.query(StatementQuery)
    limit = query.limit
    before = None if query.cursor is None else cursor_position(query.cursor)
    store = statement_store(gw)
    entries = await from_store(
        lambda: store.statement(account_id, before, limit + 1), "read the statement"
    )
    items = [
        StatementEntryOut(e.kind, e.amount, e.balance_after, e.message_id, e.at)
        for e in entries[:limit]
    ]
    next_cursor = position_cursor(entries[limit - 1].position) if len(entries) > limit else None
    return json_response(StatementPage(items, next_cursor))
