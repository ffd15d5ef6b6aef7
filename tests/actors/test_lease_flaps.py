"""A shard lost and taken back mid-backlog, through a whole node in virtual time (MemStore, a
MemCluster whose leases can be taken away): every queued message is still sent, without the
stranded-message sweep.

Seen in `benchmarks/throughput.py --workers 2`: two nodes draining 430,000 messages renewed
their leases seconds late, lost shards to each other and took them back; 7,457 messages were
still queued 300 s later, the sweep finding 1,000 every 10 s. Three ways to strand one, each
failing this test alone: the Scheduler kept a lost stream's paging cursor, so the messages it
had held before the loss (dropped at the send check) lay behind it, where no page reads; a
retry of the old lease, queued while the shard was away, moved that cursor again; and a message
paged again under the new lease while its old attempt was still out was dropped by the pool as
a duplicate, and the old attempt's retry was fenced off.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import pytest
import trio
import trio.testing

from smsgw.engine.messages import OutboundSms, SendResult
from smsgw.engine.node import EngineConfig
from smsgw.engine.ports import Beat, shard_of
from smsgw.engine.shards import LeaseConfig
from smsgw.sim.memcluster import MemCluster
from smsgw.sim.memstore import MemStore
from tests.actors.test_scheduled import run_node, wall

# No sweep: what it would find is exactly what this test says must not happen.
LEASES = LeaseConfig(ttl=3.0, tick=0.5, poll=0.5, sweep=0.0, share_tick=60.0)


class FlappingCluster(MemCluster):
    """Leases that another node may take: `take(shards, away)` makes the next heartbeat renew
    none of them (lost), and the node gets them back, under new tokens, from its first
    acquire `away` seconds later."""

    def __init__(self, store: MemStore) -> None:
        super().__init__(store)
        self.taken: set[int] = set()
        self.away_until: dict[int, float] = {}

    def take(self, shards: set[int], away: float) -> None:
        self.taken |= shards
        for shard in shards:
            self.away_until[shard] = trio.current_time() + away

    async def heartbeat(
        self, held: Mapping[int, int], ttl: float, stalled_after: float, pressure: str | None
    ) -> Beat:
        renewed = {s: t for s, t in held.items() if s not in self.taken}
        for shard in self.taken:
            self.leases.pop(shard, None)
        self.taken = set()
        return Beat(1, renewed, frozenset(), {})

    async def acquire(self, count: int, ttl: float) -> dict[int, int]:
        now = trio.current_time()
        away = {s for s, until in self.away_until.items() if until > now}
        for shard in away:
            self.leases.setdefault(shard, 0)  # another node's meanwhile
        try:
            return await super().acquire(count, ttl)
        finally:
            for shard in away:
                if self.leases.get(shard) == 0:
                    del self.leases[shard]


class Operator:
    """Takes `rate` messages a second, one call at a time, and counts each message it is
    given."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.sent: dict[str, int] = {}
        self._line = trio.Lock()

    @property
    def name(self) -> str:
        return "op"

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        async with self._line:
            await trio.sleep(len(batch) / self.rate)
        results = []
        for sms in batch:
            if not sms.attempts and int(sms.to[-3:]) % 7 == 0:
                # Every 7th number fails its first attempt: retries wait across the flaps.
                results.append(SendResult("temporary", None, "busy"))
                continue
            self.sent[sms.id] = self.sent.get(sms.id, 0) + 1
            results.append(SendResult("sent", f"op-{sms.id}"))
        return results


def bulk(account_id: int, n: int) -> OutboundSms:
    return OutboundSms(
        id=str(uuid.uuid4()),
        account_id=account_id,
        to=f"+49151{n:08d}",
        sender="t",
        text="x",
        segments=1,
        price=5,
        express=False,
        created_at=wall(),
    )


@pytest.mark.parametrize("aways", [(0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 5.0)], ids=["at-once", "later"])
def test_a_shard_lost_and_taken_back_mid_backlog_strands_nothing(aways: tuple[float, ...]) -> None:
    """Two accounts with 6,000 queued messages each, paged through a Scheduler that holds 500
    of an account at a time, sent at 1,000 a second. One account's shard is lost and taken
    back while its backlog drains, at once or seconds later (every 7th message fails its first
    attempt, so retries wait across the losses): every message is sent (what was out at a loss
    may go twice: it is read again under the new lease, as at any takeover), the store has
    nothing pending and the credit adds up."""

    async def main() -> None:
        store = MemStore(cost=None)
        flapping, steady = (store.add_account(f"a{i}", 10**9).id for i in range(2))
        assert shard_of(flapping) != shard_of(steady)
        cluster = FlappingCluster(store)
        operator = Operator(rate=1_000)
        config = EngineConfig(mailbox_bound=500, page_size=200)
        async with trio.open_nursery() as nursery:
            engine = await run_node(
                store, operator, config, nursery, cluster=cluster, leases=LEASES
            )
            items = [bulk(a, n) for n in range(6_000) for a in (flapping, steady)]
            for start in range(0, len(items), 1_000):
                results = await engine.accept(items[start : start + 1_000], atomic=False)
                assert all(r.accepted for r in results)
            for away in aways:
                await trio.sleep(2.0)
                cluster.take({shard_of(flapping)}, away)
            with trio.move_on_after(120):
                while store.pending_count():  # noqa: ASYNC110 (virtual time)
                    await trio.sleep(1)
            assert engine.leases is not None and engine.leases.counts["lost"] == len(aways)
            assert store.pending_count() == 0, f"{store.pending_count()} stranded"
            assert set(operator.sent) == {s.id for s in items}
            nursery.cancel_scope.cancel()
        assert store.broken_accounts() == {}

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
