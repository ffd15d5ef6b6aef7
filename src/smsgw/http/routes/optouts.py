"""Opt-outs and the blocklist: numbers a send may not go to.

An account keeps its own opt-out list (`/v1/account/opt-outs`: numbers that asked it to stop;
they stop its bulk messages, not its express ones, since a person who opted out of campaigns
still needs login codes), and the gateway's admin keeps the blocklist (`/v1/blocklist`: no
message of any account, express included). Both are read by the group commit that stores the
messages (storage/commit_sql.py, `_STOPPED_ANY`), so a number added here is refused by every node's
next group, with no query of its own on the accept path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

import msgspec
from quart import Response

from smsgw.engine import numbers
from smsgw.http.api import Api, Auth
from smsgw.http.context import Gateway, gateway, json_response
from smsgw.http.params import cursor_bytes, cursor_of, invalid_cursor
from smsgw.http.problems import ProblemError, from_store
from smsgw.http.schemas import (
    ListedNumberOut,
    NumbersAddedOut,
    NumbersIn,
    NumbersPage,
    PageCursor,
    PageLimit,
)

api = Api("optouts", __name__, tag="opt-outs")
Handler = Callable[..., Awaitable[Response]]
DEFAULT_LIMIT = 100
_STOPS = (
    "An account's opt-outs stop its bulk messages, not its express ones (an opted-out person"
    " still gets login codes); the gateway's blocklist stops every message. A send to such a"
    " number is a 422 `opted_out`, nothing held. Numbers are taken as `to` is (the account's"
    " `default_country`; the blocklist: the node's) and kept as E.164."
)


class PageQuery(msgspec.Struct, frozen=True):
    """A page of a list."""

    limit: PageLimit = DEFAULT_LIMIT
    cursor: PageCursor | None = None


@runtime_checkable
class ListStore(Protocol):
    """What these routes need of the store beyond FrontDoorStore (PgStore has it).
    `account_id` None: the gateway's blocklist."""

    async def add_stops(self, account_id: int | None, numbers: Sequence[str]) -> int: ...

    async def remove_stop(self, account_id: int | None, number: str) -> bool: ...

    async def stops(
        self, account_id: int | None, after: str | None, limit: int
    ) -> list[tuple[str, datetime]]: ...


def list_store(gw: Gateway) -> ListStore:
    store = gw.reads
    if not isinstance(store, ListStore):  # a store without lists: only in tests
        raise ProblemError(503, "unavailable", "this node's store keeps no number lists")
    return store


def number_cursor(number: str) -> str:
    return cursor_of(number.encode())


def cursor_number(cursor: str) -> str:
    """The number a `next_cursor` names; a 422 for anything this API did not return."""
    raw = cursor_bytes(cursor)
    number = "" if raw is None else raw.decode("latin-1")
    if not numbers.E164.fullmatch(number):
        raise invalid_cursor()
    return number


def country(gw: Gateway, account_id: int | None) -> str:
    """Whose national forms the numbers of this list are read in."""
    if account_id is None:
        return numbers.node_country()
    return gw.engine.account_settings(account_id).default_country or numbers.node_country()


async def add(gw: Gateway, account_id: int | None) -> Response:
    data = await gw.body(NumbersIn)
    where = country(gw, account_id)
    normal: list[str] = []
    for i, number in enumerate(data.numbers):
        e164 = numbers.normalize(number, where)
        if e164 is None:
            raise ProblemError(
                422,
                "invalid_field",
                f"`numbers[{i}]` {numbers.number_problem(where)}; nothing was added",
                field=f"numbers[{i}]",
            )
        normal.append(e164)
    added = await from_store(
        lambda: list_store(gw).add_stops(account_id, sorted(set(normal))), "change the list"
    )
    return json_response(NumbersAddedOut(added, normal))


async def page(gw: Gateway, account_id: int | None) -> Response:
    query = gw.query(PageQuery)
    limit, cursor = query.limit, query.cursor
    after = None if cursor is None else cursor_number(cursor)
    rows = await from_store(
        lambda: list_store(gw).stops(account_id, after, limit + 1), "read the list"
    )
    items = [ListedNumberOut(number, at) for number, at in rows[:limit]]
    next_cursor = number_cursor(items[-1].number) if len(rows) > limit else None
    return json_response(NumbersPage(items, next_cursor))


async def remove(gw: Gateway, account_id: int | None, number: str) -> Response:
    e164 = numbers.normalize(number, country(gw, account_id))
    removed = False
    if e164 is not None:
        removed = await from_store(
            lambda: list_store(gw).remove_stop(account_id, e164), "change the list"
        )
    if not removed:
        raise ProblemError(404, "number_not_listed", f"{number} is not on the list")
    return Response(b"", status=204)


# The two lists' routes: the same three operations, for an account or for the admin.
OPT_OUTS: tuple[str, Auth, str] = (
    "/v1/account/opt-outs",
    "account",
    "the calling account's opt-out list",
)
BLOCKLIST: tuple[str, Auth, str] = ("/v1/blocklist", "admin", "the gateway's blocklist")


def adds(prefix: str, auth: Auth, who: str) -> Callable[[Handler], Handler]:
    return api.route(
        "POST",
        prefix,
        f"Add numbers to {who}",
        auth=auth,
        body=NumbersIn,
        responses={200: NumbersAddedOut},
        problems=(503,),
        idempotent=False,
        description="All or none: a number that is none is a 422 naming it. " + _STOPS,
        example={"numbers": ["0935 123 4567", "+4917612345678"]},
    )


def pages(prefix: str, auth: Auth, who: str) -> Callable[[Handler], Handler]:
    return api.route(
        "GET",
        prefix,
        f"A page of {who}, in number order",
        auth=auth,
        query=PageQuery,
        responses={200: NumbersPage},
        problems=(503,),
    )


def removes(prefix: str, auth: Auth, who: str) -> Callable[[Handler], Handler]:
    return api.route(
        "DELETE",
        prefix + "/<number>",
        f"Take a number off {who}",
        auth=auth,
        responses={204: None},
        problems=(503,),
        description="404 `number_not_listed` when it is not on it.",
    )


@adds(*OPT_OUTS)
async def add_opt_outs() -> Response:
    gw = gateway()
    return await add(gw, await gw.require_account())


@pages(*OPT_OUTS)
async def list_opt_outs() -> Response:
    gw = gateway()
    return await page(gw, await gw.require_account())


@removes(*OPT_OUTS)
async def remove_opt_out(number: str) -> Response:
    gw = gateway()
    return await remove(gw, await gw.require_account(), number)


@adds(*BLOCKLIST)
async def add_blocked() -> Response:
    gw = gateway()
    gw.require_admin()
    return await add(gw, None)


@pages(*BLOCKLIST)
async def list_blocked() -> Response:
    gw = gateway()
    gw.require_admin()
    return await page(gw, None)


@removes(*BLOCKLIST)
async def remove_blocked(number: str) -> Response:
    gw = gateway()
    gw.require_admin()
    return await remove(gw, None, number)
