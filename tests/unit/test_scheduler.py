"""SchedulerState: nothing lost or served twice, express first by deadline, bulk round robin."""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.engine.messages import OutboundSms
from smsgw.engine.scheduler import SchedulerState

SETTINGS = settings(max_examples=150, deadline=None)


def make_sms(n: int, account_id: int, express: bool, deadline: float | None) -> OutboundSms:
    return OutboundSms(
        id=f"m{n}",
        account_id=account_id,
        to="+4915123456789",
        sender="ACME",
        text=f"message {n}",
        segments=1,
        price=5,
        express=express,
        created_at=1_700_000_000.0,
        deadline=deadline,
    )


# (account, express, deadline): deadlines from a small set so that ties happen.
spec = st.tuples(
    st.integers(min_value=1, max_value=6),
    st.booleans(),
    st.one_of(st.none(), st.sampled_from([10.0, 20.0, 30.0, 40.0])),
)
specs = st.lists(spec, max_size=80)
bulk_specs = st.lists(st.integers(min_value=1, max_value=8), max_size=80)


def build(items: list[tuple[int, bool, float | None]]) -> list[OutboundSms]:
    return [make_sms(n, a, e, d) for n, (a, e, d) in enumerate(items)]


def drain(state: SchedulerState) -> list[OutboundSms]:
    popped = []
    while (sms := state.pop()) is not None:
        popped.append(sms)
    return popped


def push_all(messages: list[OutboundSms]) -> SchedulerState:
    state = SchedulerState()
    for sms in messages:
        state.push(sms)
    return state


@SETTINGS
@given(specs)
def test_no_message_is_lost_or_served_twice(items: list[tuple[int, bool, float | None]]) -> None:
    pushed = build(items)
    state = push_all(pushed)
    assert len(state) == len(pushed)
    popped = drain(state)
    assert Counter(s.id for s in popped) == Counter(s.id for s in pushed)
    assert len(state) == 0
    assert state.bulk_size == 0
    assert not state.mailboxes
    assert not state.ring
    assert state.pop() is None


@SETTINGS
@given(specs)
def test_express_goes_before_bulk_in_earliest_deadline_order(
    items: list[tuple[int, bool, float | None]],
) -> None:
    pushed = build(items)
    popped = drain(push_all(pushed))
    lanes = [s.express for s in popped]
    # Every express message comes out before any bulk message.
    assert lanes == sorted(lanes, reverse=True)
    express = [s for s in popped if s.express]
    keys = [math.inf if s.deadline is None else s.deadline for s in express]
    assert keys == sorted(keys)
    # Equal deadlines keep their arrival order.
    arrival = {s.id: n for n, s in enumerate(pushed)}
    for a, b in itertools.pairwise(express):
        if a.deadline == b.deadline:
            assert arrival[a.id] < arrival[b.id]


@SETTINGS
@given(specs)
def test_an_express_message_arriving_later_still_jumps_the_bulk_queue(
    items: list[tuple[int, bool, float | None]],
) -> None:
    state = push_all([make_sms(n, a, False, None) for n, (a, _, _) in enumerate(items)])
    first = state.pop()
    late = make_sms(10_000, 99, True, None)
    state.push(late)
    assert first is None or not first.express
    assert state.pop() == late


@SETTINGS
@given(bulk_specs)
def test_bulk_is_round_robin_over_backlogged_accounts(accounts: list[int]) -> None:
    state = push_all([make_sms(n, a, False, None) for n, a in enumerate(accounts)])
    remaining = Counter(accounts)
    popped: list[int] = []
    backlogged_before: list[int] = []
    while (sms := state.pop()) is not None:
        backlogged_before.append(sum(1 for n in remaining.values() if n > 0))
        popped.append(sms.account_id)
        remaining[sms.account_id] -= 1
    assert len(popped) == len(accounts)
    # While k accounts are backlogged, the next k pops serve k distinct accounts.
    for i, k in enumerate(backlogged_before):
        window = popped[i : i + k]
        assert len(window) == k
        assert len(set(window)) == k, (i, k, window)


@SETTINGS
@given(bulk_specs)
def test_bulk_is_fifo_within_one_account(accounts: list[int]) -> None:
    pushed = [make_sms(n, a, False, None) for n, a in enumerate(accounts)]
    popped = drain(push_all(pushed))
    per_account: dict[int, list[str]] = defaultdict(list)
    for sms in popped:
        per_account[sms.account_id].append(sms.id)
    for account_id, ids in per_account.items():
        assert ids == [s.id for s in pushed if s.account_id == account_id]


# A mix of pushes (account) and pops (None), to check fairness while work keeps arriving.
operations = st.lists(st.one_of(st.integers(min_value=1, max_value=5), st.none()), max_size=120)


@SETTINGS
@given(operations)
def test_between_two_turns_of_an_account_no_other_is_served_twice(
    ops: list[int | None],
) -> None:
    state = SchedulerState()
    pending: Counter[int] = Counter()
    served: list[int] = []
    still_backlogged: list[bool] = []  # did the account have more waiting after this turn?
    for n, op in enumerate(ops):
        if op is None:
            sms = state.pop()
            if sms is None:
                assert sum(pending.values()) == 0
                continue
            assert pending[sms.account_id] > 0
            pending[sms.account_id] -= 1
            served.append(sms.account_id)
            still_backlogged.append(pending[sms.account_id] > 0)
        else:
            sms = make_sms(n, op, False, None)
            state.push(sms)
            pending[op] += 1
        assert len(state) == sum(pending.values())
    # A flooding account gets one turn per round: between its consecutive turns while it stays
    # backlogged, every other account is served at most once.
    last_turn: dict[int, int] = {}
    for i, account_id in enumerate(served):
        if account_id in last_turn and still_backlogged[last_turn[account_id]]:
            between = served[last_turn[account_id] + 1 : i]
            assert all(n == 1 for n in Counter(between).values()), (account_id, between)
        last_turn[account_id] = i
    assert len(drain(state)) == sum(pending.values())


@SETTINGS
@given(bulk_specs, st.integers(min_value=1, max_value=5))
def test_largest_backlogs_reports_the_longest_mailboxes(accounts: list[int], n: int) -> None:
    state = push_all([make_sms(i, a, False, None) for i, a in enumerate(accounts)])
    top = state.largest_backlogs(n)
    counts = Counter(accounts)
    assert len(top) == min(n, len(counts))
    assert all(counts[a] == size for size, a in top)
    assert [size for size, _ in top] == sorted(counts.values(), reverse=True)[:n]
