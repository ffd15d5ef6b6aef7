"""MemCluster: the shard leases of one node in memory, over a MemStore, for virtual-time runs.

A node alone on its database still leases its shards (engine/shards.py): its messages are
routed, stamped with a fencing token, admitted before each send and recovered by the same
code as among several nodes. This stands in for PostgreSQL's lease table so that the virtual
simulator runs that path too: one node, which gets every shard and keeps it. It proves the
leased path's plumbing under load, nothing about several nodes (tests/actors and the
integration tests do that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import SHARDS, Beat, Notices, dispatch_shard, stream_of
from smsgw.sim.memstore import MemStore


class MemCluster:
    """A ClusterStore for one node over `store`: leases never lapse and nobody else takes
    them, nothing is handed off, and there is no one to notify."""

    def __init__(self, store: MemStore, node_id: str = "virtual") -> None:
        self._store = store
        self._node_id = node_id
        self.leases: dict[int, int] = {}  # shard -> token
        self._tokens = 0

    @property
    def node_id(self) -> str:
        return self._node_id

    async def join(self, ttl: float) -> None:
        self.leases.clear()

    async def heartbeat(
        self, held: Mapping[int, int], ttl: float, stalled_after: float, pressure: str | None
    ) -> Beat:
        # Nobody else takes a lease here: every one held is renewed as it is.
        return Beat(1, dict(held), frozenset(), {})

    async def acquire(self, count: int, ttl: float) -> dict[int, int]:
        gained: dict[int, int] = {}
        for shard in range(SHARDS):
            if len(gained) >= count:
                break
            if shard not in self.leases:
                self._tokens += 1
                self.leases[shard] = gained[shard] = self._tokens
        return gained

    async def release(self, shards: Sequence[int]) -> None:
        for shard in shards:
            self.leases.pop(shard, None)

    async def leave(self, shards: Sequence[int]) -> None:
        await self.release(shards)

    async def load_backlog(
        self, shards: Sequence[int]
    ) -> tuple[list[OutboundSms], list[tuple[int, int]]]:
        wanted = set(shards)
        express: list[OutboundSms] = []
        counts: dict[int, int] = {}
        for sms in self._store.dispatchable():
            if dispatch_shard(sms) not in wanted:
                continue
            if sms.express:
                express.append(sms)
            else:
                key = stream_of(sms)
                counts[key] = counts.get(key, 0) + 1
        return express, sorted(counts.items())

    async def claim(self, known: Callable[[str], bool]) -> list[tuple[OutboundSms, int]]:
        return []  # a node alone accepts only its own shards' messages: no hand-offs

    async def listen(self, notices: Notices) -> None:
        await trio.sleep_forever()

    async def api_demand(self, mine: Mapping[int, int], horizon: float) -> dict[int, int]:
        return {}

    async def send_demand(self, mine: Mapping[int, int], horizon: float) -> dict[int, int]:
        return {}

    async def cluster(self, ttl: float) -> dict[str, Any]:
        return {
            "nodes": [
                {
                    "id": self._node_id,
                    "alive": True,
                    "heartbeat_age_s": 0.0,
                    "shards": len(self.leases),
                    "expired_shards": 0,
                }
            ],
            "unowned_shards": SHARDS - len(self.leases),
        }
