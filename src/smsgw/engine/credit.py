"""Prepaid credit: the pure state class that decides holds, captures, releases and top-ups.

The authoritative balances live in PostgreSQL. For each group commit the store locks the rows of
the accounts in the group, loads them into a `CreditBook`, applies the group's operations here
in arrival order, and writes each account's row back once. Keeping the arithmetic in one pure
class makes the invariants testable in isolation (tests/unit/test_credit.py):

- a balance never goes below zero;
- topped_up - captured - held == balance, for every account, after any sequence;
- an account can spend exactly its whole balance;
- no figure passes CREDIT_MAX, what the columns hold: a top-up that would is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from smsgw.engine.messages import AcceptResult, OutboundSms

# The credit columns are PostgreSQL bigints (migrations/001_initial.sql). `topped_up` is the
# largest of them (it is balance + held + captured), so a top-up that keeps it in range keeps
# them all in range.
CREDIT_MAX = 2**63 - 1


class CreditError(Exception):
    """A capture or release that does not match a hold: a bug, never a customer error."""


class TopUpTooLarge(Exception):
    """A top-up that would take an account's credit past CREDIT_MAX: the caller's mistake,
    refused before anything changed. A store raises it out of its commit, which therefore
    stored nothing of the group (the writer commits the rest of the group without it)."""

    def __init__(self, account_id: int, amount: int, room: int) -> None:
        super().__init__(f"top-up of {amount} to account {account_id}; room for {room}")
        self.account_id = account_id
        self.amount = amount
        self.room = room  # the most this account can take now


@dataclass(slots=True)
class AccountCredit:
    balance: int = 0  # available to hold
    held: int = 0  # reserved for messages not yet final
    captured: int = 0  # spent on messages the operator took
    topped_up: int = 0  # everything ever added

    def check(self) -> None:
        if self.balance < 0 or self.held < 0:
            raise CreditError(f"negative credit: {self}")
        if self.topped_up - self.captured - self.held != self.balance:
            raise CreditError(f"ledger identity broken: {self}")


@dataclass(slots=True)
class CreditDelta:
    """What one group changed on one account: written back as one row update and ledger rows."""

    held: int = 0  # amount newly held
    captured: int = 0
    released: int = 0
    topped_up: int = 0

    def __bool__(self) -> bool:
        return bool(self.held or self.captured or self.released or self.topped_up)


class CreditBook:
    """Credit for a set of accounts, changed only through the four operations."""

    def __init__(self) -> None:
        self.accounts: dict[int, AccountCredit] = {}
        self.deltas: dict[int, CreditDelta] = {}

    def load(self, account_id: int, credit: AccountCredit) -> None:
        self.accounts[account_id] = credit

    def __contains__(self, account_id: int) -> bool:
        return account_id in self.accounts

    def _delta(self, account_id: int) -> CreditDelta:
        delta = self.deltas.get(account_id)
        if delta is None:
            delta = self.deltas[account_id] = CreditDelta()
        return delta

    def can_hold(self, account_id: int, amount: int) -> bool:
        return self.accounts[account_id].balance >= amount

    def hold(self, account_id: int, amount: int) -> bool:
        """Reserve `amount` if the balance covers it; False (and no change) when it does not.
        A hold of 0 (an account whose segments are free) always succeeds and changes nothing."""
        if amount < 0:
            raise CreditError(f"hold of {amount}")
        credit = self.accounts[account_id]
        if credit.balance < amount:
            return False
        credit.balance -= amount
        credit.held += amount
        self._delta(account_id).held += amount
        return True

    def unhold(self, account_id: int, amount: int) -> None:
        """Take back a hold made earlier in this group whose message was not stored after all
        (its client_ref was taken meanwhile): as if it had never been held, so the ledger
        records neither."""
        credit = self.accounts[account_id]
        delta = self._delta(account_id)
        if amount < 0 or delta.held < amount:
            raise CreditError(f"unhold of {amount} with {delta.held} held in this group")
        credit.held -= amount
        credit.balance += amount
        delta.held -= amount

    def capture(self, account_id: int, amount: int) -> None:
        """Turn a hold into a charge: the operator took the message."""
        credit = self.accounts[account_id]
        if amount < 0 or credit.held < amount:
            raise CreditError(f"capture of {amount} with {credit.held} held")
        credit.held -= amount
        credit.captured += amount
        self._delta(account_id).captured += amount

    def release(self, account_id: int, amount: int) -> None:
        """Refund a hold: the message failed and the operator never took it."""
        credit = self.accounts[account_id]
        if amount < 0 or credit.held < amount:
            raise CreditError(f"release of {amount} with {credit.held} held")
        credit.held -= amount
        credit.balance += amount
        self._delta(account_id).released += amount

    def topup(self, account_id: int, amount: int) -> int:
        """Add `amount`; the new balance. TopUpTooLarge (and no change) past CREDIT_MAX."""
        if amount <= 0:
            raise CreditError(f"top-up of {amount}")
        credit = self.accounts[account_id]
        check_topups(self.accounts, ((account_id, amount),))
        credit.balance += amount
        credit.topped_up += amount
        self._delta(account_id).topped_up += amount
        return credit.balance


def check_topups(credits: Mapping[int, AccountCredit], topups: Iterable[tuple[int, int]]) -> None:
    """Raise TopUpTooLarge for the first of `topups` (account, amount) that would not fit,
    counting the earlier ones to the same account; accounts not in `credits` are skipped. For
    a store without a transaction, to refuse before it changes anything."""
    added: dict[int, int] = {}
    for account_id, amount in topups:
        credit = credits.get(account_id)
        if credit is None:
            continue
        total = credit.topped_up + added.get(account_id, 0)
        if total + amount > CREDIT_MAX:
            raise TopUpTooLarge(account_id, amount, CREDIT_MAX - total)
        added[account_id] = added.get(account_id, 0) + amount


def hold_items(book: CreditBook, items: Sequence[OutboundSms], atomic: bool) -> list[AcceptResult]:
    """Hold credit for each item in order; atomic: all items or none."""
    if len(items) == 1:  # POST /v1/messages: most requests, so the short way
        sms = items[0]
        if sms.account_id not in book:
            return [AcceptResult(accepted=False, reason="unknown_account")]
        held = book.hold(sms.account_id, sms.price)
        balance = book.accounts[sms.account_id].balance
        if held:
            return [AcceptResult(accepted=True, balance=balance)]
        return [AcceptResult(accepted=False, reason="insufficient_credit", balance=balance)]
    if any(sms.account_id not in book for sms in items):
        unknown = AcceptResult(accepted=False, reason="unknown_account")
        return [unknown] * len(items)
    need: dict[int, int] = {}
    for sms in items:
        need[sms.account_id] = need.get(sms.account_id, 0) + sms.price
    if all(book.can_hold(a, amount) for a, amount in need.items()):
        # Nearly every batch fits its balance: one hold per account for all of its items is
        # the same arithmetic as a hold per item, and the items share one answer.
        answers = {}
        for account_id, amount in need.items():
            book.hold(account_id, amount)
            answers[account_id] = AcceptResult(
                accepted=True, balance=book.accounts[account_id].balance
            )
        return [answers[sms.account_id] for sms in items]
    if atomic:  # and the balance cannot cover them all: none
        return [
            AcceptResult(
                accepted=False,
                reason="insufficient_credit",
                balance=book.accounts[s.account_id].balance,
            )
            for s in items
        ]
    # In order; once one hold fails the rest of the request fails too, even an item cheap
    # enough to fit: "the balance ran out at item k" is what a batch client can act on.
    results = []
    spent = False
    for sms in items:
        if not spent and book.hold(sms.account_id, sms.price):
            results.append(AcceptResult(accepted=True))
        else:
            spent = True
            results.append(AcceptResult(accepted=False, reason="insufficient_credit"))
    balances = {sms.account_id: book.accounts[sms.account_id].balance for sms in items}
    return [
        AcceptResult(accepted=r.accepted, reason=r.reason, balance=balances[s.account_id])
        for r, s in zip(results, items, strict=True)
    ]


# (account, number) -> [messages it may still take this hour, seconds until one more fits]
Room = dict[tuple[int, str], list[float]]
# (account, number) -> True when the number is on the gateway's blocklist (no message of any
# kind), False when it opted out of the account's messages (its bulk; express still goes).
Stops = dict[tuple[int, str], bool]


def stopped(stops: Stops | None, sms: OutboundSms) -> bool:
    """Whether `sms` may not be sent to its number: blocked, or opted out and bulk."""
    if not stops:
        return False
    blocked = stops.get((sms.account_id, sms.to))
    return blocked is not None and (blocked or not sms.express)


def hold_within_limits(
    book: CreditBook,
    items: Sequence[OutboundSms],
    atomic: bool,
    room: Room | None,
    stops: Stops | None = None,
) -> list[AcceptResult]:
    """hold_items after the opt-outs and the hourly limit per recipient number: an item whose
    number is `stopped` is refused `opted_out`, one whose number has no `room` left
    `recipient_rate_limited`, each with nothing held, and with it, when `atomic`, the whole
    request (`batch_rejected`). Numbers not in `room` are within their limit. Takes the room
    of the items it accepts."""
    if room is None and not stops:
        return hold_items(book, items, atomic)
    limited: dict[int, float | None] = {}  # item index -> seconds until it fits (None: never)
    taken: dict[tuple[int, str], int] = {}
    for i, sms in enumerate(items):
        if stopped(stops, sms):
            limited[i] = None
            continue
        key = (sms.account_id, sms.to)
        left = None if room is None else room.get(key)
        if left is None:
            continue
        if left[0] - taken.get(key, 0) >= 1:
            taken[key] = taken.get(key, 0) + 1
        else:
            limited[i] = max(left[1], 1.0)
    if not limited:
        results = hold_items(book, items, atomic)
    else:

        def refused(i: int, sms: OutboundSms) -> AcceptResult:
            credit = book.accounts.get(sms.account_id)
            balance = None if credit is None else credit.balance
            if i in limited:
                wait = limited[i]
                if wait is None:
                    return AcceptResult(False, "opted_out", balance=balance)
                return AcceptResult(
                    False, "recipient_rate_limited", balance=balance, retry_after=wait
                )
            return AcceptResult(False, "batch_rejected", balance=balance)

        if atomic:
            return [refused(i, sms) for i, sms in enumerate(items)]
        rest = [(i, sms) for i, sms in enumerate(items) if i not in limited]
        held = iter(hold_items(book, [sms for _, sms in rest], False) if rest else ())
        results = [refused(i, sms) if i in limited else next(held) for i, sms in enumerate(items)]
    if room is not None:
        for sms, result in zip(items, results, strict=True):
            left = room.get((sms.account_id, sms.to))
            if left is not None and result.accepted:
                left[0] -= 1
    return results
