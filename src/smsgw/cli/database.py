"""`smsgw migrate`, `smsgw accounts ...` and `smsgw rebuild-rollups`: work on the gateway's
database directly, no node needed."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from smsgw.cli.common import (
    ENV_DATABASE,
    Subcommands,
    UsageError,
    database_schema,
    positive_int,
    print_json,
    single,
)
from smsgw.storage.embedded import database_url

if TYPE_CHECKING:
    from smsgw.storage.database import Database

T = TypeVar("T")


def add_commands(sub: Any, command: Subcommands) -> None:
    """`migrate`, `accounts` and `rebuild-rollups` under `sub`."""
    migrate = command(sub, "migrate", ENV_DATABASE, help="apply database migrations")
    migrate.set_defaults(func=_migrate)
    rebuild = command(
        sub,
        "rebuild-rollups",
        ENV_DATABASE,
        help="compute the summary's rollups again from the messages (a repair): every"
        " account's, or one's; group commits that count messages wait while it runs; prints JSON",
    )
    rebuild.add_argument("--account", type=_account_id, help="only this account's rollups")
    rebuild.set_defaults(func=_rebuild_rollups)

    accounts = command(
        sub,
        "accounts",
        ENV_DATABASE,
        help="manage accounts on the database directly (no node needed); prints JSON",
    )
    accounts_sub = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    create = command(
        accounts_sub,
        "create",
        ENV_DATABASE,
        help="create an account; prints its API key and signing secret (shown only now)",
    )
    create.add_argument("name", help="the account's name")
    create.add_argument(
        "--credit", type=_credit_amount, default=0, help="its opening credit, in price units"
    )
    create.set_defaults(func=_accounts_create)
    listing = command(
        accounts_sub, "list", ENV_DATABASE, help="the accounts by id, one JSON object a line"
    )
    listing.add_argument(
        "--limit", type=positive_int, default=1000, help="at most this many accounts"
    )
    listing.set_defaults(func=_accounts_list)
    show = command(accounts_sub, "show", ENV_DATABASE, help="one account: balance and settings")
    show.add_argument("id", type=_account_id, help="the account's id")
    show.set_defaults(func=_accounts_show)
    topup = command(accounts_sub, "topup", ENV_DATABASE, help="add credit; prints the balance")
    topup.add_argument("id", type=_account_id, help="the account's id")
    topup.add_argument("amount", type=_top_up, help="credit to add, in price units (> 0)")
    topup.set_defaults(func=_accounts_topup)
    rotate = command(
        accounts_sub,
        "rotate-key",
        ENV_DATABASE,
        help="give the account a new API key (printed, shown only now); the old one stops"
        " working on every node at once",
    )
    rotate.add_argument("id", type=_account_id, help="the account's id")
    rotate.set_defaults(func=_accounts_rotate_key)
    for action, what in (
        ("suspend", "its sends are refused and its queued messages wait, on every node at once"),
        ("resume", "its sends are taken again and its queued messages go out"),
    ):
        change = command(accounts_sub, action, ENV_DATABASE, help=f"{action} the account: {what}")
        change.add_argument("id", type=_account_id, help="the account's id")
        change.set_defaults(func=_accounts_suspend)


def _credit_amount(value: str) -> int:
    """argparse type for credit: a whole number from 0 to 2^63 - 1."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number < 2**63:
        raise argparse.ArgumentTypeError(f"{value!r}: want a whole number from 0 to 2^63 - 1")
    return number


def _top_up(value: str) -> int:
    number = _credit_amount(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"{value!r}: want a whole number > 0")
    return number


def _account_id(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 0 < number < 2**63:
        raise argparse.ArgumentTypeError(f"{value!r}: want an account id (a whole number > 0)")
    return number


def _migrate(args: argparse.Namespace) -> int:
    import trio_asyncio

    from smsgw.storage.database import Database
    from smsgw.storage.migrate import migrate

    async def main() -> None:
        async with trio_asyncio.open_loop():
            db = await Database.open(database_url(), schema=database_schema())
            try:
                applied = await migrate(db)
            finally:
                await db.close()
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))

    trio.run(main)
    return 0


def _with_database(work: Callable[[Database], Awaitable[T]]) -> T:
    """Run `work` on the gateway's database (DATABASE_URL or the embedded server, schema
    SMSGW_SCHEMA), migrated first, as `serve` would."""
    import trio_asyncio

    from smsgw.storage.database import Database
    from smsgw.storage.migrate import migrate

    async def main() -> T:
        async with trio_asyncio.open_loop():
            db = await Database.open(database_url(), schema=database_schema())
            try:
                await migrate(db)
                return await work(db)
            finally:
                await db.close()

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        leaf = single(group)
        raise leaf  # noqa: B904 -- its own __cause__ kept (`from None` would clear it)


def _accounts_create(args: argparse.Namespace) -> int:
    from smsgw.http.context import hash_key, new_api_key
    from smsgw.storage.accounts import create_account

    api_key = new_api_key()
    account = _with_database(
        lambda db: create_account(db, args.name, args.credit, hash_key(api_key))
    )
    print_json({"id": account["id"], "name": account["name"], "api_key": api_key} | account)
    return 0


def _accounts_list(args: argparse.Namespace) -> int:
    from smsgw.storage.accounts import list_accounts

    for account in _with_database(lambda db: list_accounts(db, limit=args.limit)):
        print_json(account)
    return 0


def _accounts_show(args: argparse.Namespace) -> int:
    from smsgw.storage.accounts import show_account

    account = _with_database(lambda db: show_account(db, args.id))
    if account is None:
        raise UsageError(f"no account {args.id}")
    print_json(account)
    return 0


def _accounts_topup(args: argparse.Namespace) -> int:
    from smsgw.engine.credit import TopUpTooLarge
    from smsgw.storage.accounts import topup

    try:
        balance = _with_database(lambda db: topup(db, args.id, args.amount))
    except Exception as error:
        # The store raises it out of its commit (which stored nothing), as the cause.
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, TopUpTooLarge):
            cause = cause.__cause__
        if cause is None:
            raise
        raise UsageError(
            f"account {args.id}'s credit cannot hold {args.amount:,} more (2^63 - 1 in all);"
            " nothing changed"
        ) from None
    if balance is None:
        raise UsageError(f"no account {args.id}")
    print_json({"id": args.id, "balance": balance})
    return 0


def _accounts_suspend(args: argparse.Namespace) -> int:
    from smsgw.storage.accounts import set_suspended

    suspend = args.accounts_command == "suspend"
    account = _with_database(lambda db: set_suspended(db, args.id, suspend))
    if account is None:
        raise UsageError(f"no account {args.id}")
    print_json(account)
    return 0


def _accounts_rotate_key(args: argparse.Namespace) -> int:
    from smsgw.http.context import hash_key, new_api_key
    from smsgw.storage.accounts import replace_key

    api_key = new_api_key()
    if not _with_database(lambda db: replace_key(db, args.id, hash_key(api_key))):
        raise UsageError(f"no account {args.id}")
    print_json({"id": args.id, "api_key": api_key})
    return 0


def _rebuild_rollups(args: argparse.Namespace) -> int:
    from smsgw.storage.rollups import Rollups

    rows = _with_database(lambda db: Rollups(db).rebuild_rollups(args.account))
    print_json({"account": args.account, "rollup_rows": rows})
    return 0
