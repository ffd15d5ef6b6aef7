"""ApiShares: each node's share of an account's API rate follows where its requests arrive."""

from __future__ import annotations

from typing import Any

from smsgw.engine.mailboxes import PAUSED_RATE, SchedulerState
from smsgw.engine.messages import SendShare
from smsgw.engine.shares import ApiShares, SendShares


def shares(live: int = 3) -> ApiShares:
    store: Any = None  # `apply` and `share` never reach the store
    return ApiShares(store, lambda: live)


def test_before_any_demand_is_published_a_node_takes_an_even_share() -> None:
    assert shares(live=3).share(7) == 1 / 3
    assert shares(live=0).share(7) == 1.0  # a node that has not counted the nodes yet


def test_shares_follow_demand_and_add_up_to_the_whole_rate() -> None:
    nodes = [shares(), shares(), shares()]
    demand = [30, 10, 0]
    totals = sum(demand)
    for node, mine in zip(nodes, demand, strict=True):
        node.apply({7: mine} if mine else {}, {7: totals - mine})
    assert nodes[0].share(7) == 0.75
    assert nodes[1].share(7) == 0.25
    # The node that had no requests gets an even share for the first one, until next tick.
    assert nodes[2].share(7) == 1 / 3


def test_an_account_that_calls_one_node_gets_its_whole_rate_there() -> None:
    node = shares()
    node.apply({7: 50}, {})
    assert node.share(7) == 1.0


def test_each_request_counts_towards_the_next_publication() -> None:
    node = shares()
    for _ in range(5):
        node.share(7)
    node.share(8)
    assert node._demand == {7: 5, 8: 1}


# --- SendShares: a paced account's send rate, by where its bulk waits ----------------------


class FakeScheduler:
    """What SendShares reads of the Scheduler (its state's rates, backlogs) and tells it."""

    def __init__(self, backlogs: dict[int, int], rates: dict[int, float]) -> None:
        self.state = SchedulerState()
        for account_id, rate in rates.items():
            self.state.set_send_rate(account_id, rate, 0.0)
        self.backlogs = backlogs
        self.told: list[SendShare] = []
        self.ref = self

    def backlog(self, account_id: int) -> int:
        return self.backlogs.get(account_id, 0)

    def tell_nowait(self, message: SendShare) -> None:
        self.told.append(message)


class FakeDemandStore:
    def __init__(self, others: dict[int, int]) -> None:
        self.others = others
        self.published: list[dict[int, int]] = []

    async def send_demand(self, mine: dict[int, int], horizon: float) -> dict[int, int]:
        self.published.append(dict(mine))
        return {a: n for a, n in self.others.items() if a in mine}


async def test_a_paced_accounts_rate_is_split_by_where_its_bulk_waits() -> None:
    scheduler = FakeScheduler({7: 30, 8: 0}, {7: 10.0, 8: 10.0, 9: 0.0})
    store = FakeDemandStore({7: 10, 8: 50})
    shares = SendShares(store, scheduler, lambda: 2)  # type: ignore[arg-type]
    await shares.sync()
    # 8 has nothing here: not published, and paced at an even share meanwhile. 9 is
    # suspended (rate 0): nothing to share.
    assert store.published == [{7: 30}]
    assert scheduler.told == [SendShare(7, 0.75), SendShare(8, 0.5)]
    await shares.sync()
    assert len(scheduler.told) == 2  # the same shares are not told again
    scheduler.backlogs[7] = 0
    await shares.sync()
    await shares.sync()
    # Drained: published as 0 once, for the others' shares, then no more.
    assert store.published == [{7: 30}, {7: 30}, {7: 0}]
    assert scheduler.told[-1] == SendShare(7, 0.5)


async def test_no_query_while_no_paced_account_waits_here_or_the_node_is_alone() -> None:
    store = FakeDemandStore({})
    await SendShares(store, FakeScheduler({7: 5}, {}), lambda: 3).sync()  # type: ignore[arg-type]
    await SendShares(store, FakeScheduler({}, {7: 4.0}), lambda: 3).sync()  # type: ignore[arg-type]
    alone = FakeScheduler({7: 5}, {7: 4.0})
    await SendShares(store, alone, lambda: 1).sync()  # type: ignore[arg-type]
    assert store.published == []
    assert alone.told == []  # the whole rate, as it was


def test_a_share_paces_the_account_at_that_part_of_its_rate_and_grants_no_tokens() -> None:
    state = SchedulerState()
    state.set_share(7, 0.5, 0.0)  # unpaced: nothing to share
    assert 7 not in state.buckets
    state.set_send_rate(7, 10.0, 0.0)
    bucket = state.buckets[7]
    assert (bucket.rate, bucket.tokens) == (10.0, 10.0)
    bucket.spend(0.0, 8)
    state.set_share(7, 0.25, 0.0)
    bucket = state.buckets[7]
    assert (bucket.rate, bucket.burst, bucket.tokens) == (2.5, 2.5, 2.0)
    state.set_share(7, 1.0, 1.0)
    bucket = state.buckets[7]
    # One second at 2.5 a second refilled it to its burst (2.5); the rise grants nothing more.
    assert (bucket.rate, bucket.tokens) == (10.0, 2.5)
    state.set_send_rate(7, 0.0, 1.0)  # suspended
    assert state.buckets[7].rate == PAUSED_RATE
    state.set_send_rate(7, 10.0, 2.0)  # resumed: a full burst
    assert state.buckets[7].tokens == 10.0
