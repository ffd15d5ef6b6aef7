"""ApiShares: this node's share of each account's API request rate, split among the nodes by
where the account's requests arrive (and SendShares, below: of a paced account's send rate, by
where its bulk waits).

An account's `api_rate` is a promise for the account as a whole, but its requests reach any
node (a load balancer, SO_REUSEPORT). Each node counts the requests each rate-limited account
makes to it in a tick and publishes that demand; every node then lets through
`api_rate * mine / (mine + the others')` of the rate, so the shares add up to the account's
rate and follow the traffic: an account that calls one node gets its whole rate there, one
spread evenly over three nodes gets a third on each. A node that sees an account's first
request before any demand is published lets it through at 1 / live nodes of the rate, so a
shift of traffic costs at most one tick of imprecision. Accounts on the node's default rate
are not published: that default is a per-node ceiling against runaway clients, generous
enough never to meet a customer's ordinary load (overload is admission control's work).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from smsgw.engine.actor import InboxFull
from smsgw.engine.messages import SendShare
from smsgw.engine.ports import ClusterStore
from smsgw.engine.scheduler import Scheduler


class DemandShares:
    """Every `tick`, publish this node's demand per account and take its share of each
    account's rate from everyone's (`sync`); a store that is down keeps the last shares."""

    def __init__(
        self,
        store: ClusterStore,
        live_nodes: Callable[[], int],
        *,
        tick: float = 0.25,
        horizon: float = 1.0,
    ) -> None:
        self._store = store
        self._live_nodes = live_nodes
        self.tick = tick
        # Another node's demand counts while it was published within this many seconds.
        self.horizon = horizon
        self._shares: dict[int, float] = {}  # from the last publication
        self._demand: dict[int, int] = {}  # counted as it comes (ApiShares: requests), by account
        self.syncs = 0
        self.failed_syncs = 0
        self.last_error: str | None = None

    async def sync(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {
            "accounts": len(self._shares),
            "syncs": self.syncs,
            "failed_syncs": self.failed_syncs,
            "last_error": self.last_error,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.tick)
            try:
                await self.sync()
            except Exception as exc:  # the store is down: keep the last shares, try again
                self.failed_syncs += 1
                self.last_error = f"{type(exc).__name__}: {exc}"


class ApiShares(DemandShares):
    def share(self, account_id: int) -> float:
        """Count one request of a rate-limited account; the share of its rate this node
        lets through now."""
        self._demand[account_id] = self._demand.get(account_id, 0) + 1
        found = self._shares.get(account_id)
        return found if found is not None else 1.0 / max(1, self._live_nodes())

    def apply(self, mine: Mapping[int, int], others: Mapping[int, int]) -> None:
        """New shares from this tick's demand here (`mine`) and the others' latest."""
        self._shares = {
            account_id: n / (n + others.get(account_id, 0)) for account_id, n in mine.items()
        }

    async def sync(self) -> None:
        mine, self._demand = self._demand, {}
        if not mine and not self._shares:
            return
        others = await self._store.api_demand(mine, self.horizon) if mine else {}
        self.syncs += 1
        self.apply(mine, others)


class SendShares(DemandShares):
    """This node's share of each paced account's send rate, split among the nodes by where the
    account's bulk waits.

    A paced account's bulk is handed to the owner of its shard, which paces it
    (`Engine.bulk_shard`); but what other nodes accepted for it before it was paced stays with
    them (their home shards' streams), paced there too. So every tick each node publishes its
    backlog of each paced account it holds some of, and paces the account at
    `send_rate * mine / (mine + the others')`: the paces add up to the account's rate and
    follow the backlogs as they drain. A node that holds none of it takes 1 / live nodes
    meanwhile (it has nothing to send at that pace until its next tick). No query while no
    paced account has a backlog here."""

    def __init__(
        self,
        store: ClusterStore,
        scheduler: Scheduler,
        live_nodes: Callable[[], int],
        *,
        tick: float = 0.25,
        horizon: float = 1.0,
    ) -> None:
        super().__init__(store, live_nodes, tick=tick, horizon=horizon)
        self._scheduler = scheduler
        self._published: set[int] = set()  # accounts whose last publication was above 0

    async def sync(self) -> None:
        scheduler = self._scheduler
        mine = {
            account_id: scheduler.backlog(account_id)
            for account_id, rate in scheduler.state.send_rates.items()
            if rate > 0
        }
        # An account's backlog that went to 0 is published once more, for the others' shares.
        told = {a: n for a, n in mine.items() if n or a in self._published}
        self._shares = {a: share for a, share in self._shares.items() if a in mine}
        live = self._live_nodes()
        if not told or live == 1:
            others: Mapping[int, int] = {}  # alone: the whole rate here, and no query
            self._published = set()
        else:
            others = await self._store.send_demand(told, self.horizon)
            self.syncs += 1
            self._published = {a for a, n in told.items() if n}
        even = 1.0 / max(1, live)
        for account_id, n in mine.items():
            share = n / (n + others.get(account_id, 0)) if n else even
            if self._shares.get(account_id, 1.0) == share:
                continue
            try:
                scheduler.ref.tell_nowait(SendShare(account_id, share))
            except InboxFull:
                continue  # the next tick tells it
            self._shares[account_id] = share
