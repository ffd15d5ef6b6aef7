"""SchedulerState: nothing lost or served twice (paging included), deficit round robin by
segments, express first by deadline, send rates that pace without dropping."""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.engine.mailboxes import LIGHT_SCAN, START, FifoState, SchedulerState
from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import (
    SHARDS,
    Entry,
    micros,
    shard_of,
    slots,
    stream_account,
    stream_key,
    stream_parts,
)

SETTINGS = settings(max_examples=150, deadline=None)
T0 = 1_700_000_000.0
MAX_SEGMENTS = 10


def make_sms(
    n: int,
    account_id: int,
    express: bool = False,
    deadline: float | None = None,
    *,
    segments: int = 1,
    created_at: float | None = None,
    attempts: int = 0,
) -> OutboundSms:
    return OutboundSms(
        id=f"{n:08d}-0000-7000-8000-000000000000",
        account_id=account_id,
        to="+4915123456789",
        sender="ACME",
        text=f"message {n}",
        segments=segments,
        price=5 * segments,
        express=express,
        created_at=T0 + n / 1000 if created_at is None else created_at,
        deadline=deadline,
        attempts=attempts,
    )


def drain(state: SchedulerState, now: float = 0.0) -> list[OutboundSms | Entry]:
    popped = []
    while (item := state.pop(now)) is not None:
        popped.append(item)
    return popped


def ident(item: OutboundSms | Entry) -> str:
    return item.id if isinstance(item, OutboundSms) else item[1]


def account_of(item: OutboundSms | Entry, accounts: dict[str, int]) -> int:
    return accounts[ident(item)]


def push_all(messages: list[OutboundSms], **kwargs: int) -> SchedulerState:
    state = SchedulerState(**kwargs)  # type: ignore[arg-type]
    for sms in messages:
        state.push(sms)
    return state


# (account, express, deadline, segments): deadlines from a small set so that ties happen.
spec = st.tuples(
    st.integers(min_value=1, max_value=6),
    st.booleans(),
    st.one_of(st.none(), st.sampled_from([10.0, 20.0, 30.0, 40.0])),
    st.integers(min_value=1, max_value=MAX_SEGMENTS),
)
specs = st.lists(spec, max_size=80)


def build(items: list[tuple[int, bool, float | None, int]]) -> list[OutboundSms]:
    return [make_sms(n, a, e, d, segments=s) for n, (a, e, d, s) in enumerate(items)]


@SETTINGS
@given(specs)
def test_no_message_is_lost_or_served_twice(
    items: list[tuple[int, bool, float | None, int]],
) -> None:
    pushed = build(items)
    state = push_all(pushed)
    assert len(state) == len(pushed)
    popped = drain(state)
    assert Counter(ident(s) for s in popped) == Counter(s.id for s in pushed)
    assert len(state) == 0 and state.bulk_size == 0 and state.in_memory == 0
    assert not state.mailboxes and not state.ring
    assert state.pop(0.0) is None


@SETTINGS
@given(specs)
def test_express_goes_before_bulk_in_earliest_deadline_order(
    items: list[tuple[int, bool, float | None, int]],
) -> None:
    pushed = build(items)
    popped = drain(push_all(pushed))
    lanes = [isinstance(s, OutboundSms) for s in popped]
    # Every express message comes out before any bulk message.
    assert lanes == sorted(lanes, reverse=True)
    express = [s for s in popped if isinstance(s, OutboundSms)]
    keys = [math.inf if s.deadline is None else s.deadline for s in express]
    assert keys == sorted(keys)
    arrival = {s.id: n for n, s in enumerate(pushed)}
    for a, b in itertools.pairwise(express):
        if a.deadline == b.deadline:
            assert arrival[a.id] < arrival[b.id]


@SETTINGS
@given(specs, st.integers(min_value=0, max_value=20))
def test_an_express_message_arriving_later_still_jumps_the_bulk_queue(
    items: list[tuple[int, bool, float | None, int]], pops: int
) -> None:
    state = push_all([make_sms(n, a, segments=s) for n, (a, _, _, s) in enumerate(items)])
    for _ in range(pops):
        state.pop(0.0)
    late = make_sms(10_000, 99, True, 5.0)
    state.push(late)
    assert state.pop(0.0) == late


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 6), st.floats(0.0, 50.0)), max_size=30), st.floats(0, 60))
def test_the_express_lane_counts_its_segments_as_it_fills_and_empties(
    lane: list[tuple[int, float]], at: float
) -> None:
    """What express admission reads of the lane: its messages' window slots (segments)."""
    state = push_all([make_sms(n, 1, True, d, segments=s) for n, (s, d) in enumerate(lane)])
    assert state.express_slots == sum(slots(s) for s, _ in lane)
    left = [s for s, d in lane if d > at]
    state.expired_express(at)
    assert state.express_slots == sum(slots(s) for s in left)
    while state.pop_express() is not None:
        pass
    assert state.express_slots == 0


def test_expired_express_messages_are_taken_out_earliest_first() -> None:
    state = push_all([make_sms(n, 1, True, d) for n, d in enumerate([30.0, 10.0, 20.0, None])])
    assert [s.deadline for s in state.expired_express(25.0)] == [10.0, 20.0]
    assert state.next_deadline() == 30.0
    assert [s.deadline for s in drain(state)] == [30.0, None]  # type: ignore[union-attr]


# --- deficit round robin ---------------------------------------------------------------------

# Each account's backlog: a list of message sizes in segments.
backlogs = st.lists(
    st.lists(st.integers(min_value=1, max_value=MAX_SEGMENTS), min_size=1, max_size=40),
    min_size=1,
    max_size=8,
)


def turns(served: list[int]) -> list[tuple[int, int]]:
    """(account, messages) for each run of consecutive pops of one account."""
    return [(a, len(list(run))) for a, run in itertools.groupby(served)]


@SETTINGS
@given(backlogs, st.integers(min_value=MAX_SEGMENTS, max_value=3 * MAX_SEGMENTS))
def test_backlogged_accounts_get_segments_within_one_quantum_of_each_other(
    sizes: list[list[int]], quantum: int
) -> None:
    """All accounts backlogged from the start: at the end of every round in which all are
    still backlogged, the segments served to any two differ by at most one quantum."""
    pushed = [
        make_sms(100 * a + i, a, segments=s)
        for a, seg in enumerate(sizes)
        for i, s in enumerate(seg)
    ]
    pushed.sort(key=lambda s: s.created_at)
    accounts = {s.id: s.account_id for s in pushed}
    segments = {s.id: s.segments for s in pushed}
    state = push_all(pushed, quantum=quantum)
    remaining = Counter(s.account_id for s in pushed)
    served: Counter[int] = Counter()
    order: list[int] = []
    while (entry := state.pop(0.0)) is not None:
        a = account_of(entry, accounts)
        order.append(a)
        served[a] += segments[ident(entry)]
        remaining[a] -= 1
        round_done = len(set(order)) == len(sizes) and len(turns(order)) % len(sizes) == 0
        if round_done and all(remaining[x] > 0 for x in range(len(sizes))):
            values = [served[x] for x in range(len(sizes))]
            assert max(values) - min(values) <= quantum, values
    assert sum(served.values()) == sum(map(sum, sizes))


# A mix of pushes (account, segments) and pops (None), to check rounds while work arrives.
operations = st.lists(
    st.one_of(
        st.tuples(
            st.integers(min_value=1, max_value=5), st.integers(min_value=1, max_value=MAX_SEGMENTS)
        ),
        st.none(),
    ),
    max_size=150,
)


@SETTINGS
@given(operations)
def test_every_account_with_work_is_served_within_one_round(
    ops: list[tuple[int, int] | None],
) -> None:
    """From the moment an account has work, no other account gets two turns before it is
    served: a flooding account cannot make anyone wait longer than one round."""
    state = SchedulerState(quantum=MAX_SEGMENTS)
    pending: Counter[int] = Counter()
    accounts: dict[str, int] = {}
    served: list[int] = []
    waiting_since: dict[int, int] = {}  # account -> index into `served` when its work came
    for n, op in enumerate(ops):
        if op is None:
            entry = state.pop(0.0)
            if entry is None:
                assert sum(pending.values()) == 0
                continue
            a = account_of(entry, accounts)
            assert pending[a] > 0
            pending[a] -= 1
            served.append(a)
            if a in waiting_since:
                others = turns(served[waiting_since.pop(a) : -1])
                counts = Counter(x for x, _ in others)
                # The turn in progress when it arrived may finish, plus one more each.
                assert all(c <= 2 for c in counts.values()), (a, others)
                assert all(c <= 1 for x, c in counts.items() if x != others[0][0]), (a, others)
        else:
            a, segments = op
            sms = make_sms(n, a, segments=segments)
            accounts[sms.id] = a
            if pending[a] == 0:
                waiting_since[a] = len(served)
            state.push(sms)
            pending[a] += 1
        assert len(state) == sum(pending.values())
    assert len(drain(state)) == sum(pending.values())


@SETTINGS
@given(st.lists(st.integers(min_value=1, max_value=8), max_size=80))
def test_bulk_is_fifo_within_one_account(accounts: list[int]) -> None:
    pushed = [make_sms(n, a) for n, a in enumerate(accounts)]
    popped = drain(push_all(pushed))
    per_account: dict[int, list[str]] = defaultdict(list)
    owner = {s.id: s.account_id for s in pushed}
    for item in popped:
        per_account[owner[ident(item)]].append(ident(item))
    for account_id, ids in per_account.items():
        assert ids == [s.id for s in pushed if s.account_id == account_id]


@SETTINGS
@given(
    st.lists(st.integers(min_value=1, max_value=6), max_size=80),
    st.lists(st.booleans(), min_size=1, max_size=40),
    st.integers(min_value=0, max_value=5),
)
def test_light_only_pops_serve_light_accounts_and_lose_nothing(
    accounts: list[int], light_only: list[bool], light_backlog: int
) -> None:
    """Pops for the window's light reserve, mixed with ordinary ones, take only from accounts
    that have had at most `light_backlog` waiting since they last had none, and together
    still serve everything exactly once."""
    pushed = [make_sms(n, a) for n, a in enumerate(accounts)]
    state = push_all(pushed, light_backlog=light_backlog)
    most = Counter(accounts)  # nothing is popped before all is pushed: the peak is the count
    for account_id, mailbox in state.mailboxes.items():
        assert mailbox.heavy == (most[account_id] > light_backlog)
    served: list[str] = []
    for light in itertools.cycle(light_only):
        if not state.bulk_size:
            break
        popped = state.pop_bulk_of(0.0, light) if light else state.pop_bulk_of(0.0)
        if popped is None:
            assert light and all(m.heavy for m in state.mailboxes.values())
            popped = state.pop_bulk_of(0.0)
        elif light:
            assert most[popped[0]] <= light_backlog
        assert popped is not None
        served.append(popped[1][1])
    assert Counter(served) == Counter(s.id for s in pushed)
    assert not state.mailboxes and not state.ring


def test_a_mailbox_is_light_again_once_it_has_been_empty() -> None:
    state = SchedulerState(light_backlog=2)
    for n in range(3):
        state.push(make_sms(n, 1))
    state.push(make_sms(10, 2))
    assert state.mailboxes[1].heavy and not state.mailboxes[2].heavy
    popped = state.pop_bulk_of(5.0, True)
    assert popped is not None and popped[0] == 2 and state.light_served_at == 5.0
    while state.pop_bulk_of(6.0) is not None:  # account 1 drains: its mailbox goes
        pass
    assert state.light_served_at == 5.0  # heavy work does not count as light
    state.push(make_sms(20, 1))
    assert not state.mailboxes[1].heavy
    state.push(make_sms(30, 3, attempts=1))  # a retry does not make an account light
    assert state.mailboxes[3].heavy


def test_a_light_pop_looks_at_the_newest_mailboxes_only_and_keeps_the_round() -> None:
    state = SchedulerState(light_backlog=2)
    n = 0
    state.push(make_sms(n, 1))  # light, but older than the LIGHT_SCAN newest mailboxes
    for account_id in range(2, 2 + LIGHT_SCAN):
        for _ in range(3):
            n += 1
            state.push(make_sms(n, account_id))
    assert state.pop_bulk_of(0.0, True) is None  # bounded work: account 1 waits its turn
    state.push(make_sms(n + 1, 999))
    order = list(state.ring)
    popped = state.pop_bulk_of(0.0, True)
    assert popped is not None and popped[0] == 999
    assert list(state.ring) == order[:-1]  # its mailbox went; nobody else moved
    assert state.pop_bulk_of(0.0)[0] == 1  # type: ignore[index]  # the round is unchanged


def test_a_three_segment_message_costs_three_times_a_one_segment_message() -> None:
    heavy = [make_sms(n, 1, segments=3) for n in range(0, 60, 2)]
    light = [make_sms(n, 2, segments=1) for n in range(1, 61, 2)]
    state = push_all(sorted(heavy + light, key=lambda s: s.created_at), quantum=MAX_SEGMENTS)
    popped = [state.pop(0.0) for _ in range(26)]  # two rounds: 3 x 3 + 1 x 10 segments each
    owner = {s.id: s.account_id for s in heavy + light}
    counts = Counter(owner[ident(p)] for p in popped if p is not None)
    assert counts == {1: 6, 2: 20}


@SETTINGS
@given(st.lists(st.integers(min_value=1, max_value=8), max_size=80), st.integers(1, 5))
def test_largest_backlogs_reports_the_longest_mailboxes(accounts: list[int], n: int) -> None:
    state = push_all([make_sms(i, a) for i, a in enumerate(accounts)])
    top = state.largest_backlogs(n)
    counts = Counter(accounts)
    assert len(top) == min(n, len(counts))
    assert all(counts[a] == size for size, a in top)
    assert [size for size, _ in top] == sorted(counts.values(), reverse=True)[:n]


# --- send rates --------------------------------------------------------------------------------


@SETTINGS
@given(
    st.integers(min_value=1, max_value=60),
    st.sampled_from([0.5, 1.0, 2.0, 5.0]),
    st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.7, 1.0, 2.0]), min_size=1, max_size=80),
)
def test_a_send_rate_paces_an_account_without_dropping_its_work(
    count: int, rate: float, steps: list[float]
) -> None:
    """Over any stretch of time the paced account gets at most burst + rate x time messages;
    another account is not held back; nothing is lost."""
    state = SchedulerState()
    state.set_send_rate(1, rate, 0.0)
    burst = max(1.0, rate)
    for n in range(count):
        state.push(make_sms(n, 1))
    state.push(make_sms(10_000, 2))
    now = 0.0
    got: list[tuple[float, int]] = []
    for step in itertools.cycle(steps):
        while (entry := state.pop_bulk(now)) is not None:
            got.append((now, 1 if entry[1] != make_sms(10_000, 2).id else 2))
        if sum(1 for _, a in got if a == 1) == count:
            break
        assert state.next_ready(now) > now
        now += step if step > 0 else state.next_ready(now) - now
    paced = [t for t, a in got if a == 1]
    assert len(paced) == count
    assert (0.0, 2) in got  # the unpaced account went at once
    for i, start in enumerate(paced):
        for j in range(i, len(paced)):
            assert j - i + 1 <= burst + rate * (paced[j] - start) + 1e-6


# --- bounded memory and paging --------------------------------------------------------------


class FakeStore:
    """Every committed bulk message by account, as PostgreSQL would page them: after the
    cursor, in (created_at, id) order, whether or not the Scheduler already dispatched them
    (their rows stay `queued` until an outcome commits)."""

    def __init__(self) -> None:
        self.rows: dict[int, list[Entry]] = defaultdict(list)

    def commit(self, account_id: int, entry: Entry) -> None:
        self.rows[account_id].append(entry)

    def page(self, account_id: int, cursor: tuple[int, str], size: int) -> list[Entry]:
        after = sorted(e for e in self.rows[account_id] if (e[0], e[1]) > cursor)
        return after[:size]


paging_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(1, 4), st.integers(0, 3)),  # account, lateness
        st.tuples(st.just("pop"), st.just(0), st.just(0)),
        st.tuples(st.just("ask"), st.just(0), st.just(0)),  # the pager takes requests
        st.tuples(st.just("answer"), st.just(0), st.just(0)),  # one answer comes back
        st.tuples(st.just("retry"), st.just(0), st.just(0)),  # a dispatched one comes back
        # Committed now, told later: another node's hand-off, which a page may see first.
        st.tuples(st.just("handoff"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("arrive"), st.just(0), st.just(0)),  # the oldest hand-off arrives
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    paging_ops,
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=1, max_value=3),
)
def test_paging_loses_nothing_and_serves_nothing_twice(
    ops: list[tuple[str, int, int]], account_bound: int, memory_bound: int, page_size: int
) -> None:
    """With small bounds, most messages spill and are paged back in; page answers arrive late
    (after more messages), messages commit out of order, and dispatched ones come back for a
    retry. Every message is dispatched, and apart from retries, exactly once, except that a
    hand-off a page read back before it arrived may be dispatched once more (the pool keeps
    the two from being in flight together; the operator's idempotency key does the rest)."""
    store = FakeStore()
    state = SchedulerState(
        account_bound=account_bound,
        memory_bound=memory_bound,
        body_budget=2,
        page_size=page_size,
    )
    committed: dict[str, OutboundSms] = {}
    dispatched: Counter[str] = Counter()
    retried: Counter[str] = Counter()
    answers: list[tuple[int, list[Entry], int]] = []
    handoffs: list[OutboundSms] = []
    read_before_told: set[str] = set()
    paged_ids: set[str] = set()  # every id a page query returned
    # Messages told to the Scheduler behind their account's cursor (committed late, or a
    # hand-off arriving after newer ones): no page would return them, so they go into memory
    # past the bound, until they are dispatched.
    behind_cursor = 0

    def tell(sms: OutboundSms) -> None:
        nonlocal behind_cursor
        if (micros(sms.created_at), sms.id) <= state.cursors.get(sms.account_id, START):
            behind_cursor += 1
        state.push(sms)

    n = 0
    for op, account, lateness in ops:
        if op in ("push", "handoff"):
            n += 1
            # A late commit: created a little before messages already committed.
            sms = make_sms(n, account, created_at=T0 + (n - lateness) / 1000)
            committed[sms.id] = sms
            store.commit(account, (micros(sms.created_at), sms.id, sms.segments))
            if op == "push":
                tell(sms)
            else:
                handoffs.append(sms)
        elif op == "arrive" and handoffs:
            sms = handoffs.pop(0)
            if sms.id in paged_ids:
                read_before_told.add(sms.id)
            tell(sms)
        elif op == "pop":
            entry = state.pop_bulk(0.0)
            if entry is not None:
                dispatched[entry[1]] += 1
        elif op == "ask":
            for account_id, cursor, size in state.take_page_requests(2):
                # The snapshot is taken now; the answer comes back later.
                rows = store.page(account_id, cursor, size)
                paged_ids.update(r[1] for r in rows)
                answers.append((account_id, rows, size))
        elif op == "answer" and answers:
            account_id, rows, size = answers.pop(0)
            state.paged(account_id, rows, size)
        elif op == "retry" and dispatched:
            message_id = sorted(dispatched)[len(dispatched) // 2]
            if retried[message_id] < dispatched[message_id]:
                retried[message_id] += 1
                state.push(msgspec_replace(committed[message_id], attempts=1 + retried[message_id]))
        assert (
            state.in_memory
            <= max(memory_bound, 0) + len(state.mailboxes) + sum(retried.values()) + behind_cursor
        )
    # Let everything drain: answer, ask again, pop, until nothing is left.
    for sms in handoffs:
        if sms.id in paged_ids:
            read_before_told.add(sms.id)
        state.push(sms)
    for _ in range(10_000):
        while answers:
            account_id, rows, size = answers.pop(0)
            state.paged(account_id, rows, size)
        for account_id, cursor, size in state.take_page_requests(10):
            rows = store.page(account_id, cursor, size)
            paged_ids.update(r[1] for r in rows)
            answers.append((account_id, rows, size))
        while (entry := state.pop_bulk(0.0)) is not None:
            dispatched[entry[1]] += 1
        if not answers and not state.page_wanted and state.bulk_size == 0:
            break
    assert state.bulk_size == 0 and state.spilled == 0 and not state.mailboxes
    assert set(dispatched) == set(committed)
    for message_id, times in dispatched.items():
        extra = 1 if message_id in read_before_told else 0
        assert 1 + retried[message_id] <= times <= 1 + retried[message_id] + extra, message_id


def msgspec_replace(sms: OutboundSms, **changes: object) -> OutboundSms:
    import msgspec

    return msgspec.structs.replace(sms, **changes)


def test_recovered_backlogs_are_paged_in_from_the_start() -> None:
    store = FakeStore()
    messages = [make_sms(n, 7) for n in range(5)]
    for sms in messages:
        store.commit(7, (micros(sms.created_at), sms.id, sms.segments))
    state = SchedulerState(account_bound=2, memory_bound=10, body_budget=0)
    state.add_backlog(7, 5)
    assert state.bulk_size == 5 and state.pop_bulk(0.0) is None
    got = []
    while state.bulk_size:
        for account_id, cursor, size in state.take_page_requests(10):
            state.paged(account_id, store.page(account_id, cursor, size), size)
        while (entry := state.pop_bulk(0.0)) is not None:
            got.append(entry[1])
    assert got == [s.id for s in messages]
    assert not state.bodies


def test_a_page_that_reads_a_message_before_its_hand_off_arrives_leaves_nothing_behind() -> None:
    """A page can see a committed message the Scheduler has not been told of yet (another
    node's hand-off on its way). Counted by what it was told, the Scheduler then thinks the
    backlog empty with a message still in the store: that message must still be paged in."""
    store = FakeStore()
    state = SchedulerState(account_bound=1, memory_bound=10, body_budget=0)
    first, untold, counted = (make_sms(n, 7, created_at=T0 + n) for n in range(3))
    for sms in (first, untold, counted):
        store.commit(7, (micros(sms.created_at), sms.id, sms.segments))
    state.push(first)  # in memory: the account's bound is 1
    state.push(counted)  # spilled, counted
    got = [state.pop_bulk(0.0)]
    for _ in range(10):
        for account_id, cursor, size in state.take_page_requests(10):
            state.paged(account_id, store.page(account_id, cursor, size), size)
        while (entry := state.pop_bulk(0.0)) is not None:
            got.append(entry)
    state.push(untold)  # the hand-off arrives after a page read it back
    while (entry := state.pop_bulk(0.0)) is not None:
        got.append(entry)
    assert {e[1] for e in got if e is not None} == {first.id, untold.id, counted.id}
    assert state.bulk_size == 0


def test_upcoming_names_the_front_of_each_mailbox_in_serving_order_without_cached_bodies() -> None:
    """What a body read takes along: the next entries of each account in ring order, those
    whose bodies are not cached, up to the limit."""
    state = SchedulerState(account_bound=100, memory_bound=100, body_budget=2)
    pushed = [
        make_sms(10 * n + account, account, created_at=T0 + n)
        for n in range(6)
        for account in (1, 2)
    ]
    for sms in pushed:
        state.push(sms)
    cached = set(state.bodies)
    assert len(cached) == 2
    ahead = state.upcoming(limit=5, per_account=2)
    by_account = {1: [s.id for s in pushed if s.account_id == 1], 2: [
        s.id for s in pushed if s.account_id == 2]}  # fmt: skip
    expected = [i for i in [*by_account[1][:2], *by_account[2][:2]] if i not in cached]
    assert ahead == expected[:5]
    assert (
        state.upcoming(limit=1, per_account=6) == [i for i in by_account[1] if i not in cached][:1]
    )


@SETTINGS
@given(specs)
def test_the_fifo_baseline_serves_bulk_in_arrival_order_and_loses_nothing(
    items: list[tuple[int, bool, float | None, int]],
) -> None:
    pushed = build(items)
    state = FifoState()
    for sms in pushed:
        state.push(sms)
    popped = drain(state)
    assert Counter(ident(s) for s in popped) == Counter(s.id for s in pushed)
    bulk = [ident(s) for s in popped if not isinstance(s, OutboundSms)]
    assert bulk == [s.id for s in pushed if not s.express]  # whoever sent it
    assert state.bulk_size == 0 and not state.mailboxes and not state.order
    assert state.pop_bulk_of(0.0, light_only=True) is None  # one queue: no light accounts


def test_the_fifo_baseline_pages_in_a_recovered_backlog() -> None:
    """Recovery counts bulk for every strategy: the baseline pages it in too, and what
    arrives meanwhile waits behind its account's older messages."""
    store = FakeStore()
    messages = [make_sms(n, 7) for n in range(5)]
    for sms in messages:
        store.commit(7, (micros(sms.created_at), sms.id, sms.segments))
    state = FifoState()
    state.add_backlog(7, 5)
    later = make_sms(9, 7)
    store.commit(7, (micros(later.created_at), later.id, later.segments))
    state.push(later)
    got = []
    while state.bulk_size:
        for account_id, cursor, size in state.take_page_requests(10):
            state.paged(account_id, store.page(account_id, cursor, size), size)
        while (entry := state.pop_bulk(0.0)) is not None:
            got.append(entry[1])
    assert got == [s.id for s in [*messages, later]]


def test_a_send_rate_counts_segments() -> None:
    """At 4 segments a second (a burst of 4), 2-segment messages go two at once, then one
    every half second; a 6-segment one goes on one token and its debt is then waited out."""
    state = SchedulerState()
    state.set_send_rate(1, 4.0, 0.0)
    for n in range(4):
        state.push(make_sms(n, 1, segments=2))
    assert state.pop_bulk(0.0) is not None and state.pop_bulk(0.0) is not None
    assert state.pop_bulk(0.0) is None
    assert state.next_ready(0.0) == 0.25  # one token: the next message may start
    assert state.pop_bulk(0.25) is not None  # and takes the next one in debt
    assert state.pop_bulk(0.5) is None and state.next_ready(0.5) == 0.75
    assert state.pop_bulk(0.75) is not None
    state.push(make_sms(9, 1, segments=6))
    assert state.pop_bulk(1.0) is None and state.next_ready(1.0) == 1.25
    assert state.pop_bulk(1.25) is not None  # 1 token: it goes, 5 in debt
    state.push(make_sms(10, 1))
    assert state.next_ready(1.25) == 2.75  # the debt and one token: 6 / 4 s


# --- streams: an account's bulk under several dispatch shards ---------------------------------


def test_a_stream_key_names_the_account_and_its_dispatch_shard() -> None:
    for account_id in (1, 7, 12_345, 2**40 + 3):
        own = shard_of(account_id)
        assert stream_key(account_id, None) == stream_key(account_id, own) == account_id
        assert stream_parts(account_id) == (account_id, own)
        for shard in {0, 255, (own + 1) % SHARDS}:
            key = stream_key(account_id, shard)
            assert stream_account(key) == account_id
            assert stream_parts(key) == (account_id, shard)
            assert (key == account_id) == (shard == own)


def in_stream(n: int, account_id: int, shard: int | None, **kwargs: float) -> OutboundSms:
    return msgspec.structs.replace(make_sms(n, account_id, **kwargs), shard=shard)  # type: ignore[arg-type]


def test_an_accounts_streams_are_mailboxes_of_their_own_summed_per_account() -> None:
    """Bulk this node dispatches under its home shard for an account whose shard another node
    leases is a mailbox apart from the account's own: each pages on its own cursor. What the
    node reports and bounds per account (admission, pressure) adds them up."""
    home = (shard_of(7) + 1) % SHARDS
    state = SchedulerState()
    for n in range(3):
        state.push(make_sms(n, 7))
    for n in range(3, 8):
        state.push(in_stream(n, 7, home))
    state.push(make_sms(8, 9))
    assert set(state.mailboxes) == {7, stream_key(7, home), 9}
    assert state.accounts_waiting == 2
    assert state.backlog(7) == 8 and state.backlog(9) == 1
    assert state.largest_backlogs(1) == [(8, 7)]
    got = drain(state)
    assert len(got) == 9 and state.bulk_size == 0
    assert not state.mailboxes and not state.streams


def test_a_send_rate_paces_all_of_an_accounts_streams_together() -> None:
    home = (shard_of(7) + 1) % SHARDS
    state = SchedulerState()
    state.set_send_rate(7, 2.0, 0.0)  # a burst of 2, then 2 a second
    for n in range(10):
        state.push(make_sms(n, 7) if n % 2 else in_stream(n, 7, home))
    now, sent = 0.0, []
    while True:
        while state.pop_bulk(now) is not None:
            sent.append(now)
        if len(sent) == 10:
            break
        now = state.next_ready(now)
        assert now < math.inf
    # 2 at once, then one every half second, whichever stream they are in.
    assert sent[:2] == [0.0, 0.0]
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(sent[1:]))


def test_each_stream_pages_from_its_own_cursor() -> None:
    """A takeover gives a node a stream of an account whose own stream it pages already, and
    the new stream's messages are older than that stream's cursor: each is read back after
    its own cursor, so none is left behind."""
    home = (shard_of(7) + 1) % SHARDS
    store = FakeStore()
    old = [in_stream(n, 7, home, created_at=T0 + n) for n in range(4)]  # a dead node's queue
    new = [make_sms(n, 7, created_at=T0 + 100 + n) for n in range(10, 14)]
    for sms in [*old, *new]:
        store.commit(stream_key(7, sms.shard), (micros(sms.created_at), sms.id, sms.segments))
    state = SchedulerState(account_bound=2, memory_bound=100, body_budget=0)
    for sms in new:
        state.push(sms)  # two in memory, two spilled; the own stream's cursor is T0 + 101
    state.add_backlog(stream_key(7, home), len(old))  # recovered at the takeover
    got = []
    for _ in range(20):
        for key, cursor, size in state.take_page_requests(10):
            state.paged(key, store.page(key, cursor, size), size)
        while (entry := state.pop_bulk(0.0)) is not None:
            got.append(entry[1])
    assert sorted(got) == sorted(s.id for s in [*old, *new])
    assert state.bulk_size == 0


def test_a_shard_that_leaves_and_comes_back_is_paged_from_the_start() -> None:
    """A stream paged half way, its shard lost (the entries in memory will never be sent from
    here) and taken back: the recovery's count pages it from the start, so the messages the
    node held before the loss are read again, not passed over by the old cursor. A page out
    when the shard left is dropped when it comes back."""
    store = FakeStore()
    messages = [make_sms(n, 7, created_at=T0 + n) for n in range(8)]
    for sms in messages:
        store.commit(7, (micros(sms.created_at), sms.id, sms.segments))
    state = SchedulerState(account_bound=2, memory_bound=100, body_budget=0)
    state.add_backlog(7, len(messages))
    [(key, cursor, size)] = state.take_page_requests(10)
    state.paged(key, store.page(key, cursor, size), size)  # two in memory, six in the store
    first = state.pop_bulk_of(0.0)  # sent before the loss: its outcome ends it in the store
    assert first is not None and first[0] == 7
    store.rows[7].remove(first[1])
    state.push(make_sms(20, 9))  # another shard's account: untouched
    [(key, cursor, size)] = [r for r in state.take_page_requests(10) if r[0] == 7]
    assert cursor > START
    out = store.page(key, cursor, size)  # a page read while the shard leaves
    assert state.forget_shards({shard_of(7)}) == 1
    assert 7 not in state.cursors and state.backlog(7) == 0 and state.backlog(9) == 1
    state.add_backlog(7, len(messages) - 1)  # taken back: recovered from the start
    assert state.take_page_requests(10) == []  # the old page is still out
    state.paged(key, out, size)  # and comes back: dropped
    got = [first[1][1]]
    for _ in range(20):
        for key, cursor, size in state.take_page_requests(10):
            state.paged(key, store.page(key, cursor, size), size)
        while (entry := state.pop_bulk(0.0)) is not None:
            got.append(entry[1])
    assert sorted(got) == sorted([s.id for s in messages] + [make_sms(20, 9).id])
    assert state.bulk_size == 0 and not state.cursors.keys() - {7, 9}


def test_forgetting_a_shard_drops_its_streams_only() -> None:
    home = (shard_of(7) + 1) % SHARDS
    state = SchedulerState()
    for n in range(3):
        state.push(make_sms(n, 7))
        state.push(in_stream(10 + n, 7, home))
    assert state.forget_shards({home}) == 3
    assert set(state.mailboxes) == {7} and not state.streams
    assert stream_key(7, home) not in state.cursors and stream_key(7, home) not in state.ring
    assert state.backlog(7) == 3 and len(drain(state)) == 3
