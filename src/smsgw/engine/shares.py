"""ApiShares: this node's share of each account's API request rate, split among the nodes by
where the account's requests arrive.

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

from smsgw.engine.ports import ClusterStore


class ApiShares:
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
        self._demand: dict[int, int] = {}  # rate-limited account -> requests this tick
        self._shares: dict[int, float] = {}  # from the last publication
        self.syncs = 0
        self.failed_syncs = 0
        self.last_error: str | None = None

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
            mine, self._demand = self._demand, {}
            if not mine and not self._shares:
                continue
            try:
                others = await self._store.api_demand(mine, self.horizon) if mine else {}
            except Exception as exc:  # the store is down: keep the last shares, try again
                self.failed_syncs += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                continue
            self.syncs += 1
            self.apply(mine, others)
