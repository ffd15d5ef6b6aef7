"""CreditBook: credit never negative, the ledger identity holds, deltas add up to the change."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from smsgw.engine.credit import (
    CREDIT_MAX,
    AccountCredit,
    CreditBook,
    CreditDelta,
    CreditError,
    TopUpTooLarge,
    check_topups,
)

ACCOUNTS = (1, 2, 3)
amounts = st.integers(min_value=1, max_value=500)


def consistent_credit(
    topped_up: int, captured_share: int, held_share: int
) -> tuple[AccountCredit, int]:
    """A loaded row that satisfies the identity: captured and held carved out of topped_up."""
    captured = min(captured_share, topped_up)
    held = min(held_share, topped_up - captured)
    balance = topped_up - captured - held
    return AccountCredit(balance=balance, held=held, captured=captured, topped_up=topped_up), held


loaded_credit = st.builds(
    consistent_credit,
    st.integers(min_value=0, max_value=2_000),
    st.integers(min_value=0, max_value=2_000),
    st.integers(min_value=0, max_value=2_000),
)


def snapshot(credit: AccountCredit) -> AccountCredit:
    return AccountCredit(credit.balance, credit.held, credit.captured, credit.topped_up)


class CreditBookMachine(RuleBasedStateMachine):
    """Random holds, captures, releases and top-ups over several accounts, checked against a model.

    Captures and releases only ever settle a hold that is still outstanding (whole or in part),
    as the engine does: a message's hold is settled once, when it ends.
    """

    def __init__(self) -> None:
        super().__init__()
        self.book = CreditBook()
        self.loaded: dict[int, AccountCredit] = {}
        self.model: dict[int, AccountCredit] = {}
        self.holds: dict[int, list[int]] = {}  # outstanding holds per account, in the model

    @initialize(rows=st.lists(loaded_credit, min_size=len(ACCOUNTS), max_size=len(ACCOUNTS)))
    def load(self, rows: list[tuple[AccountCredit, int]]) -> None:
        for account_id, (credit, held) in zip(ACCOUNTS, rows, strict=True):
            self.book.load(account_id, credit)
            self.loaded[account_id] = snapshot(credit)
            self.model[account_id] = snapshot(credit)
            # Holds taken before this group (loaded from the row) can be settled too.
            self.holds[account_id] = [held] if held else []

    def _has_holds(self) -> bool:
        return any(self.holds.values())

    @rule(account_id=st.sampled_from(ACCOUNTS), amount=amounts)
    def hold(self, account_id: int, amount: int) -> None:
        model = self.model[account_id]
        deltas_before = {a: _fields(d) for a, d in self.book.deltas.items()}
        ok = self.book.hold(account_id, amount)
        assert ok == (model.balance >= amount)
        if ok:
            model.balance -= amount
            model.held += amount
            self.holds[account_id].append(amount)
        else:
            # A refused hold changes nothing, not even the deltas.
            assert {a: _fields(d) for a, d in self.book.deltas.items()} == deltas_before

    @rule(account_id=st.sampled_from(ACCOUNTS))
    def hold_whole_balance(self, account_id: int) -> None:
        model = self.model[account_id]
        if model.balance == 0:
            return
        assert self.book.hold(account_id, model.balance)
        self.holds[account_id].append(model.balance)
        model.held += model.balance
        model.balance = 0
        assert not self.book.hold(account_id, 1)

    def _take_hold(self, data: st.DataObject) -> tuple[int, int]:
        """Choose an outstanding hold and how much of it to settle; keep the rest outstanding."""
        account_id = data.draw(st.sampled_from([a for a in ACCOUNTS if self.holds[a]]))
        pending = self.holds[account_id]
        index = data.draw(st.integers(min_value=0, max_value=len(pending) - 1))
        amount = data.draw(st.integers(min_value=1, max_value=pending[index]))
        if amount == pending[index]:
            pending.pop(index)
        else:
            pending[index] -= amount
        return account_id, amount

    @precondition(_has_holds)
    @rule(data=st.data())
    def capture(self, data: st.DataObject) -> None:
        account_id, amount = self._take_hold(data)
        self.book.capture(account_id, amount)
        model = self.model[account_id]
        model.held -= amount
        model.captured += amount

    @precondition(_has_holds)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        account_id, amount = self._take_hold(data)
        self.book.release(account_id, amount)
        model = self.model[account_id]
        model.held -= amount
        model.balance += amount

    @rule(account_id=st.sampled_from(ACCOUNTS), amount=amounts)
    def topup(self, account_id: int, amount: int) -> None:
        model = self.model[account_id]
        model.balance += amount
        model.topped_up += amount
        assert self.book.topup(account_id, amount) == model.balance

    @rule(account_id=st.sampled_from(ACCOUNTS), extra=st.integers(min_value=1, max_value=50))
    def settle_more_than_held(self, account_id: int, extra: int) -> None:
        before = snapshot(self.book.accounts[account_id])
        too_much = before.held + extra
        with pytest.raises(CreditError):
            self.book.capture(account_id, too_much)
        with pytest.raises(CreditError):
            self.book.release(account_id, too_much)
        assert self.book.accounts[account_id] == before

    @invariant()
    def matches_model(self) -> None:
        for account_id, model in self.model.items():
            assert self.book.accounts[account_id] == model
            assert sum(self.holds[account_id]) == model.held

    @invariant()
    def never_negative_and_identity_holds(self) -> None:
        for credit in self.book.accounts.values():
            assert credit.balance >= 0
            assert credit.held >= 0
            assert credit.topped_up - credit.captured - credit.held == credit.balance
            credit.check()

    @invariant()
    def deltas_equal_change_since_load(self) -> None:
        for account_id, now in self.book.accounts.items():
            then = self.loaded[account_id]
            delta = self.book.deltas.get(account_id, CreditDelta())
            assert now.topped_up - then.topped_up == delta.topped_up
            assert now.captured - then.captured == delta.captured
            assert now.held - then.held == delta.held - delta.captured - delta.released
            assert now.balance - then.balance == delta.topped_up + delta.released - delta.held


def _fields(delta: CreditDelta) -> dict[str, int]:
    return {
        "held": delta.held,
        "captured": delta.captured,
        "released": delta.released,
        "topped_up": delta.topped_up,
    }


CreditBookMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestCreditBook = CreditBookMachine.TestCase


def book_with(balance: int, account_id: int = 7) -> CreditBook:
    book = CreditBook()
    book.load(account_id, AccountCredit(balance=balance, topped_up=balance))
    return book


@settings(max_examples=100, deadline=None)
@given(data=st.data(), balance=st.integers(min_value=1, max_value=10_000))
def test_an_account_can_spend_exactly_its_whole_balance(data: st.DataObject, balance: int) -> None:
    # Split the balance into random positive parts that sum to it exactly.
    cuts = data.draw(
        st.lists(st.integers(min_value=1, max_value=balance - 1), unique=True, max_size=20)
        if balance > 1
        else st.just([])
    )
    bounds = [0, *sorted(cuts), balance]
    parts = [b - a for a, b in itertools.pairwise(bounds)]
    assert sum(parts) == balance

    book = book_with(balance)
    for part in parts:
        assert book.hold(7, part)
    credit = book.accounts[7]
    assert (credit.balance, credit.held) == (0, balance)

    before = snapshot(credit)
    delta_before = _fields(book.deltas[7])
    assert not book.hold(7, 1)
    assert book.accounts[7] == before
    assert _fields(book.deltas[7]) == delta_before
    credit.check()


@settings(max_examples=100, deadline=None)
@given(balance=st.integers(min_value=0, max_value=1_000), excess=st.integers(1, 1_000))
def test_a_refused_hold_changes_nothing(balance: int, excess: int) -> None:
    book = book_with(balance)
    assert not book.can_hold(7, balance + excess)
    assert not book.hold(7, balance + excess)
    assert book.accounts[7] == AccountCredit(balance=balance, topped_up=balance)
    assert 7 not in book.deltas or not book.deltas[7]


@pytest.mark.parametrize("amount", [-1, -100])
def test_hold_of_less_than_nothing_raises(amount: int) -> None:
    book = book_with(100)
    with pytest.raises(CreditError):
        book.hold(7, amount)
    assert book.accounts[7] == AccountCredit(balance=100, topped_up=100)


def test_a_free_message_holds_nothing_even_on_an_empty_balance() -> None:
    book = book_with(0)
    assert book.hold(7, 0)
    book.unhold(7, 0)
    assert book.hold(7, 0)
    book.capture(7, 0)
    assert book.accounts[7] == AccountCredit(balance=0, topped_up=0)
    assert not book.deltas[7]


@pytest.mark.parametrize("amount", [0, -5])
def test_topup_of_nothing_or_less_raises(amount: int) -> None:
    book = book_with(100)
    with pytest.raises(CreditError):
        book.topup(7, amount)
    assert book.accounts[7] == AccountCredit(balance=100, topped_up=100)


def test_a_topup_past_what_the_columns_hold_is_refused_and_changes_nothing() -> None:
    # topped_up is the largest figure (balance + held + captured): it sets the room.
    book = CreditBook()
    book.load(7, AccountCredit(balance=100, held=20, captured=30, topped_up=CREDIT_MAX - 50))
    with pytest.raises(TopUpTooLarge) as refused:
        book.topup(7, 51)
    assert (refused.value.account_id, refused.value.amount, refused.value.room) == (7, 51, 50)
    assert book.accounts[7].topped_up == CREDIT_MAX - 50 and not book.deltas
    assert book.topup(7, 50) == 150  # exactly the room fits
    assert book.accounts[7].topped_up == CREDIT_MAX


def test_check_topups_counts_earlier_topups_to_the_same_account() -> None:
    credits = {7: AccountCredit(balance=0, topped_up=CREDIT_MAX - 10), 8: AccountCredit()}
    check_topups(credits, [(7, 5), (8, 10**15), (9, CREDIT_MAX), (7, 5)])  # 9: unknown
    with pytest.raises(TopUpTooLarge) as refused:
        check_topups(credits, [(7, 6), (7, 5)])
    assert (refused.value.amount, refused.value.room) == (5, 4)


@pytest.mark.parametrize("settle", ["capture", "release"])
def test_settling_more_than_held_raises_and_changes_nothing(settle: str) -> None:
    book = book_with(100)
    assert book.hold(7, 30)
    before = snapshot(book.accounts[7])
    with pytest.raises(CreditError):
        getattr(book, settle)(7, 31)
    with pytest.raises(CreditError):
        getattr(book, settle)(7, -1)
    assert book.accounts[7] == before
    assert _fields(book.deltas[7]) == {"held": 30, "captured": 0, "released": 0, "topped_up": 0}


def test_capture_and_release_settle_a_hold() -> None:
    book = book_with(100)
    assert book.hold(7, 30)
    assert book.hold(7, 20)
    book.capture(7, 30)
    book.release(7, 20)
    assert book.accounts[7] == AccountCredit(balance=70, held=0, captured=30, topped_up=100)
    assert _fields(book.deltas[7]) == {"held": 50, "captured": 30, "released": 20, "topped_up": 0}


def test_check_detects_a_broken_row() -> None:
    with pytest.raises(CreditError):
        AccountCredit(balance=-1, topped_up=-1).check()
    with pytest.raises(CreditError):
        AccountCredit(balance=10, topped_up=5).check()
    AccountCredit(balance=5, held=3, captured=2, topped_up=10).check()


def test_an_untouched_delta_is_false() -> None:
    assert not CreditDelta()
    assert CreditDelta(released=1)


def test_unhold_takes_back_a_hold_of_this_group_without_a_trace() -> None:
    book = book_with(100)
    assert book.hold(7, 30)
    assert book.hold(7, 20)
    book.unhold(7, 20)  # its message was not stored (client_ref taken meanwhile)
    assert book.accounts[7] == AccountCredit(balance=70, held=30, topped_up=100)
    assert _fields(book.deltas[7]) == {"held": 30, "captured": 0, "released": 0, "topped_up": 0}
    book.unhold(7, 30)
    assert book.accounts[7] == AccountCredit(balance=100, topped_up=100)
    assert not book.deltas[7]  # nothing for the ledger


def test_unhold_of_more_than_this_group_held_raises_and_changes_nothing() -> None:
    book = CreditBook()
    # 50 held by earlier groups: not this group's to take back.
    book.load(7, AccountCredit(balance=50, held=50, topped_up=100))
    assert book.hold(7, 10)
    before = snapshot(book.accounts[7])
    for amount in (11, -1):
        with pytest.raises(CreditError):
            book.unhold(7, amount)
    assert book.accounts[7] == before
