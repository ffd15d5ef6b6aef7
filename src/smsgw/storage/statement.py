"""The account statement: the ledger rows a group commit writes, message by message
(migration 015).

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
    id order (commit_sql.LOCK_AND_FINISH)."""

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
    the holds of the messages stored (`held`, in id order, as ONE_STATEMENT writes them), each
    with the balance once it applied."""
    holds: dict[int, list[OutboundSms]] = {}
    for sms in held:
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
