"""The account statement: the ledger rows a group commit writes, message by message, and the
pages of GET /v1/account/statement read back from them (migration 015).

A ledger row is one account's credit move of one kind in one group commit (or one top-up); it
names the messages it covers in the order it applied them, with their prices, and the
account's balance once it applied. The rows of one account are written while its row is
locked, so their ids follow the order its balance changed, and within one group the exact
way's order: captures, releases, top-ups, holds. The statement is those rows unrolled, one
entry per message, newest first: an entry's balance is its row's, less what the row's later
messages moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import asyncpg
import msgspec

from smsgw.engine.credit import CreditBook
from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import StatementEntry
from smsgw.storage.database import StorePart

Kind = Literal["topup", "hold", "capture", "release"]


class LedgerRow(msgspec.Struct):
    """One credit_ledger row as commit_sql's `_UPDATE_ACCOUNTS` reads it (JSON)."""

    account_id: int
    kind: Kind
    amount: int
    messages: int
    balance_after: int
    message_ids: list[str] | None = None
    prices: list[int] | None = None


class Settled(NamedTuple):
    """What a group's outcomes captured and released on one account, message by message in
    id order (commit_sql.lock_and_finish)."""

    captured_ids: list[str]
    captured_prices: list[int]
    released_ids: list[str]
    released_prices: list[int]

    @classmethod
    def of(cls, r: asyncpg.Record) -> Settled:
        return cls(
            r["captured_ids"] or [],
            r["captured_prices"] or [],
            r["released_ids"] or [],
            r["released_prices"] or [],
        )


def ledger_rows(
    book: CreditBook,
    settled: Mapping[int, Settled],
    topups: Sequence[tuple[int, int]],
    held: Sequence[OutboundSms],
) -> list[LedgerRow]:
    """The ledger rows of a group the exact way applied: for each account `book` changed, its
    captures and releases (`settled`), each of its `topups` (account, amount) in order, and
    the holds of the messages stored (`held`, in id order, as one_statement writes them), each
    with the balance once it applied."""
    holds: dict[int, list[OutboundSms]] = {}
    for sms in held:
        if sms.price > 0:  # a free message moves no credit: no ledger entry
            holds.setdefault(sms.account_id, []).append(sms)
    credited: dict[int, list[int]] = {}
    for account_id, amount in topups:
        credited.setdefault(account_id, []).append(amount)
    rows: list[LedgerRow] = []
    for account_id, delta in book.deltas.items():
        if not delta:
            continue
        # The balance before the group: the outcomes' releases, the top-ups and the holds
        # taken back out of the balance after it.
        balance = book.accounts[account_id].balance
        balance += delta.held - delta.released - delta.topped_up
        done = settled.get(account_id)
        if done is not None and delta.captured:
            rows.append(
                LedgerRow(
                    account_id,
                    "capture",
                    delta.captured,
                    len(done.captured_ids),
                    balance,
                    done.captured_ids,
                    done.captured_prices,
                )
            )
        if done is not None and delta.released:
            balance += delta.released
            rows.append(
                LedgerRow(
                    account_id,
                    "release",
                    delta.released,
                    len(done.released_ids),
                    balance,
                    done.released_ids,
                    done.released_prices,
                )
            )
        for amount in credited.get(account_id, ()):
            balance += amount
            rows.append(LedgerRow(account_id, "topup", amount, 0, balance))
        if delta.held:
            mine = sorted(holds[account_id], key=_by_id)
            balance -= delta.held
            rows.append(
                LedgerRow(
                    account_id,
                    "hold",
                    delta.held,
                    len(mine),
                    balance,
                    [s.id for s in mine],
                    [s.price for s in mine],
                )
            )
    return rows


def _by_id(sms: OutboundSms) -> str:
    return sms.id


# One page of an account's statement, newest first, after the entry at position ($2, $3):
# ledger row $2, place $3 in it (the first page: $2 past every row).
#
# `picked` walks the account's rows newest first by credit_ledger_statement and keeps those
# that hold the page's entries, counting each row's entries without reading its arrays (a row
# of the old form, its message_ids NULL, is one entry; the row at the position, those before
# it): at most one row more than the page has entries, since only that one may have none left.
# The account is written as a range, so only that index gives the walk's order: no statistics
# can make a walk of the primary key, past other accounts' rows, look cheaper. Only the picked
# rows' arrays are read, each row by its primary key (a join could walk the ids between them),
# and unrolled. An entry's balance is its row's, less what the row's later entries moved
# (`later`): a hold lowered the balance, a release or a top-up raised it, a capture left it.
STATEMENT_PAGE = """
WITH picked AS (
    SELECT p.id FROM (
        SELECT r.id, sum(n.entries) OVER (ORDER BY r.account_id DESC, r.id DESC
                                          ROWS UNBOUNDED PRECEDING) - n.entries AS before
        FROM credit_ledger r
        CROSS JOIN LATERAL (
            SELECT CASE WHEN r.id = $2 THEN $3 - 1
                        WHEN r.message_ids IS NULL THEN 1
                        ELSE r.messages END AS entries
        ) n
        WHERE (r.account_id, r.id) <= ($1, $2) AND r.account_id >= $1
        ORDER BY r.account_id DESC, r.id DESC
        LIMIT $4 + 1
    ) p
    WHERE p.before < $4
)
SELECT r.id, e.place, r.kind, e.amount, e.message_id::text, r.at,
       r.balance_after + CASE r.kind WHEN 'hold' THEN e.later
                                     WHEN 'capture' THEN 0
                                     ELSE -e.later END AS balance_after
FROM credit_ledger r
CROSS JOIN LATERAL (
    SELECT u.message_id, u.amount, u.place,
           coalesce(sum(u.amount) OVER (ORDER BY u.place DESC
                                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                    0)::bigint AS later
    FROM unnest(coalesce(r.message_ids, ARRAY[NULL]::uuid[]),
                coalesce(r.prices::bigint[], ARRAY[r.amount]))
         WITH ORDINALITY AS u(message_id, amount, place)
) e
WHERE r.id = ANY (ARRAY(SELECT id FROM picked)) AND (r.id < $2 OR e.place < $3)
ORDER BY r.id DESC, e.place DESC
LIMIT $4
"""

# Past every ledger row's id (a bigint): the first page's position.
NEWEST = (2**63 - 1, 0)


class Statements(StorePart):
    """PgStore's side of GET /v1/account/statement."""

    async def statement(
        self, account_id: int, before: tuple[int, int] | None, limit: int
    ) -> list[StatementEntry]:
        """Up to `limit` entries of the account's statement, newest first, from just before
        `before` (a `position` of an earlier page; None: from the newest). Only the account's
        own entries, whatever the position."""
        row, place = NEWEST if before is None else before
        rows = await self.db.run(
            lambda c: c.fetch(STATEMENT_PAGE, account_id, row, place, limit), name="statement"
        )
        return [
            StatementEntry(
                kind=r["kind"],
                amount=r["amount"],
                balance_after=r["balance_after"],
                message_id=r["message_id"],
                at=r["at"],
                position=(r["id"], r["place"]),
            )
            for r in rows
        ]
