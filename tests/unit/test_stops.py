"""hold_within_limits with opt-outs and the blocklist (engine/credit.py): a stopped item is
refused `opted_out` with nothing held; an account's opt-out stops bulk, not express; the
blocklist stops both; atomic requests are refused whole."""

from __future__ import annotations

from smsgw.engine.credit import AccountCredit, CreditBook, Stops, hold_within_limits
from smsgw.engine.messages import OutboundSms

OPTED = "+989121234567"
BLOCKED = "+4915123456789"
FREE = "+12125550100"
STOPS: Stops = {(1, OPTED): False, (1, BLOCKED): True}


def book(balance: int = 100) -> CreditBook:
    b = CreditBook()
    b.load(1, AccountCredit(balance=balance, topped_up=balance))
    return b


def sms(to: str, express: bool = False, n: int = 0) -> OutboundSms:
    return OutboundSms(f"m{n}", 1, to, "smsgw", "hi", 1, 5, express, 0.0)


def reasons(items: list[OutboundSms], atomic: bool = False, b: CreditBook | None = None) -> list:
    results = hold_within_limits(b or book(), items, atomic, None, STOPS)
    return [r.reason if not r.accepted else "ok" for r in results]


def test_an_opt_out_stops_bulk_but_not_express() -> None:
    assert reasons([sms(OPTED)]) == ["opted_out"]
    assert reasons([sms(OPTED, express=True)]) == ["ok"]


def test_the_blocklist_stops_both() -> None:
    assert reasons([sms(BLOCKED)]) == ["opted_out"]
    assert reasons([sms(BLOCKED, express=True)]) == ["opted_out"]


def test_a_stopped_item_holds_nothing_and_only_it_is_refused() -> None:
    b = book()
    items = [sms(FREE, n=0), sms(OPTED, n=1), sms(FREE, n=2)]
    assert reasons(items, b=b) == ["ok", "opted_out", "ok"]
    assert b.accounts[1].held == 10 and b.accounts[1].balance == 90


def test_an_atomic_request_with_a_stopped_item_is_refused_whole() -> None:
    b = book()
    items = [sms(FREE, n=0), sms(OPTED, n=1)]
    assert reasons(items, atomic=True, b=b) == ["batch_rejected", "opted_out"]
    assert b.accounts[1].held == 0


def test_another_accounts_opt_out_is_not_this_ones() -> None:
    other = OutboundSms("m", 2, OPTED, "smsgw", "hi", 1, 5, False, 0.0)
    b = book()
    b.load(2, AccountCredit(balance=10, topped_up=10))
    assert [r.accepted for r in hold_within_limits(b, [other], False, None, STOPS)] == [True]


def test_the_hourly_limit_and_stops_together() -> None:
    room = {(1, FREE): [1.0, 30.0]}
    items = [sms(FREE, n=0), sms(FREE, n=1), sms(OPTED, n=2)]
    results = hold_within_limits(book(), items, False, room, STOPS)
    assert [r.reason for r in results] == [None, "recipient_rate_limited", "opted_out"]
    assert results[1].retry_after == 30.0
