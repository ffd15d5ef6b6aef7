"""ApiShares: each node's share of an account's API rate follows where its requests arrive."""

from __future__ import annotations

from typing import Any

from smsgw.engine.shares import ApiShares


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
