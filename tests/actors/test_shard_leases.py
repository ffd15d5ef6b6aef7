"""ShardLeases in virtual time against an in-memory cluster store: fair shares, takeover of a
dead node's shards, routing and fencing by token, late renewals keep their tokens."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
import trio
import trio.testing

from smsgw.engine.actor import Inbox
from smsgw.engine.messages import Backlog, Enqueue, ForgetShards, OutboundSms, SchedulerMessage
from smsgw.engine.ports import SHARDS, Beat, Notices, shard_of
from smsgw.engine.shards import LeaseConfig, ShardLeases

CONFIG = LeaseConfig(ttl=3.0, tick=0.5, poll=0.5)


class Cluster:
    """The shared tables, in memory: leases (owner, token, expiry), heartbeats, messages."""

    def __init__(self) -> None:
        self.leases: dict[int, tuple[str | None, int, float]] = {
            s: (None, 0, -1.0) for s in range(SHARDS)
        }
        self.heartbeats: dict[str, float] = {}
        self.pending: dict[str, OutboundSms] = {}
        self.tokens = 0

    def next_token(self) -> int:
        self.tokens += 1
        return self.tokens

    def owned_by(self, node: str) -> set[int]:
        now = trio.current_time()
        return {s for s, (o, _, e) in self.leases.items() if o == node and e > now}


class FakeStore:
    """One node's ClusterStore over `Cluster`; `dead` makes it hang like a killed process."""

    def __init__(self, cluster: Cluster, node_id: str) -> None:
        self.cluster = cluster
        self._node_id = node_id
        self.dead = False

    @property
    def node_id(self) -> str:
        return self._node_id

    async def _alive(self) -> None:
        if self.dead:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def join(self, ttl: float) -> None:
        await self._alive()
        self.cluster.heartbeats[self._node_id] = trio.current_time()

    async def heartbeat(
        self, held: Mapping[int, int], ttl: float, stalled_after: float, pressure: str | None
    ) -> Beat:
        await self._alive()
        now = trio.current_time()
        self.cluster.heartbeats[self._node_id] = now
        renewed = {}
        for shard, mine in held.items():
            owner, token, _ = self.cluster.leases[shard]
            if owner == self._node_id and token == mine:
                self.cluster.leases[shard] = (owner, token, now + ttl)
                renewed[shard] = token
        live = sum(1 for t in self.cluster.heartbeats.values() if t > now - ttl)
        stalled = frozenset(
            shard
            for shard, (owner, _, expires) in self.cluster.leases.items()
            if owner is not None
            and owner != self._node_id
            and (expires < now or self.cluster.heartbeats.get(owner, -1e9) < now - stalled_after)
        )
        return Beat(live, renewed, stalled, {})

    async def acquire(self, count: int, ttl: float) -> dict[int, int]:
        await self._alive()
        now = trio.current_time()
        gained = {}
        for shard, (owner, _, expires) in sorted(self.cluster.leases.items()):
            if len(gained) == count:
                break
            if owner is None or expires < now:
                token = self.cluster.next_token()
                self.cluster.leases[shard] = (self._node_id, token, now + ttl)
                gained[shard] = token
        return gained

    async def release(self, shards: Sequence[int]) -> None:
        await self._alive()
        for shard in shards:
            owner, token, _ = self.cluster.leases[shard]
            if owner == self._node_id:
                self.cluster.leases[shard] = (None, token, -1.0)

    async def leave(self, shards: Sequence[int]) -> None:
        await self.release(shards)
        self.cluster.heartbeats.pop(self._node_id, None)

    async def load(self, shards: Sequence[int]) -> list[OutboundSms]:
        await self._alive()
        wanted = set(shards)
        return [s for s in self.cluster.pending.values() if shard_of(s.account_id) in wanted]

    async def load_backlog(
        self, shards: Sequence[int]
    ) -> tuple[list[OutboundSms], list[tuple[int, int]]]:
        pending = await self.load(shards)
        counts = Counter(s.account_id for s in pending if not s.express)
        return [s for s in pending if s.express], sorted(counts.items())

    async def claim(self, known: Callable[[str], bool]) -> list[tuple[OutboundSms, int]]:
        await self._alive()
        return []

    async def listen(self, notices: Notices) -> None:
        await trio.sleep_forever()

    async def cluster(self, ttl: float) -> dict[str, Any]:
        return {}


def route_one(leases: ShardLeases, message: OutboundSms) -> OutboundSms | None:
    """`message` as the writer's dispatch routes it: stamped, or None when not this node's."""
    routed = leases.route([message])
    return routed[0] if routed else None


def sms(account_id: int, n: int = 0) -> OutboundSms:
    return OutboundSms(
        id=f"m{account_id}-{n}",
        account_id=account_id,
        to="+4915123456789",
        sender="smsgw",
        text="hi",
        segments=1,
        price=5,
        express=False,
        created_at=0.0,
    )


def node(cluster: Cluster, name: str) -> tuple[ShardLeases, FakeStore, Inbox[SchedulerMessage]]:
    store = FakeStore(cluster, name)
    inbox: Inbox[SchedulerMessage] = Inbox(f"scheduler-{name}", 100_000)
    leases = ShardLeases(store, inbox.handle(), lambda: (), CONFIG, clock=trio.current_time)
    return leases, store, inbox


class Pair(NamedTuple):
    """Two nodes that have split the shards between them, and an account of b's."""

    a: ShardLeases
    store_a: FakeStore
    inbox_a: Inbox[SchedulerMessage]
    b: ShardLeases
    store_b: FakeStore
    on_b: int


async def two_nodes(cluster: Cluster, nursery: trio.Nursery) -> Pair:
    a, store_a, inbox_a = node(cluster, "a")
    b, store_b, _ = node(cluster, "b")
    await nursery.start(a.run)
    await nursery.start(b.run)
    await trio.sleep(10)
    on_b = next(acc for acc in range(1, 1000) if shard_of(acc) in b.owned)
    return Pair(a, store_a, inbox_a, b, store_b, on_b)


def drained(inbox: Inbox[SchedulerMessage]) -> list[OutboundSms]:
    """The messages told to the Scheduler whole (bulk recovered is only counted)."""
    items: list[OutboundSms] = []
    while (message := inbox.get_nowait()) is not None:
        if isinstance(message, Enqueue):
            items.extend(message.items)
    return items


def counted(inbox: Inbox[SchedulerMessage]) -> dict[int, int]:
    """The bulk backlogs (account -> messages) told to the Scheduler to page in."""
    counts: dict[int, int] = {}
    while (message := inbox.get_nowait()) is not None:
        if isinstance(message, Backlog):
            for account_id, n in message.counts:
                counts[account_id] = counts.get(account_id, 0) + n
    return counts


async def test_start_up_recovery_counts_bulk_for_paging_and_loads_express_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A backlog of millions must not be loaded whole at start: bulk is counted per account
    (the Scheduler pages it in), express comes whole and stamped (its deadline cannot wait
    for a page)."""
    cluster = Cluster()
    bulk = [sms(a, n) for a in (1, 2) for n in range(3)]
    express = msgspec.structs.replace(sms(3), express=True)
    cluster.pending = {s.id: s for s in (*bulk, express)}
    a, _, inbox = node(cluster, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        told = []
        while (message := inbox.get_nowait()) is not None:
            told.append(message)
        assert a.recovered == 7
        [enqueue] = [m for m in told if isinstance(m, Enqueue)]
        assert [s.id for s in enqueue.items] == [express.id] and a.admit(enqueue.items[0])
        [backlog] = [m for m in told if isinstance(m, Backlog)]
        assert backlog.counts == ((1, 3), (2, 3))
        nursery.cancel_scope.cancel()


async def test_a_lone_node_leases_every_shard_and_recovers_them_at_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = Cluster()
    bulk = [sms(a) for a in range(1, 301)]
    express = [msgspec.structs.replace(sms(a, 1), express=True) for a in range(1, 31)]
    cluster.pending = {s.id: s for s in (*bulk, *express)}
    a, _, inbox = node(cluster, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        assert a.ready.is_set() and len(a.owned) == SHARDS
        told = []
        while (message := inbox.get_nowait()) is not None:
            told.append(message)
        recovered = [s for m in told if isinstance(m, Enqueue) for s in m.items]
        assert {s.id for s in recovered} == {s.id for s in express}
        # Stamped with their shard's token: the pool sends them, the store records them.
        assert all(s.fence == a.owned[shard_of(s.account_id)] for s in recovered)
        assert all(a.admit(s) for s in recovered)
        counts = [c for m in told if isinstance(m, Backlog) for c in m.counts]
        assert sorted(counts) == [(s.account_id, 1) for s in bulk]
        assert a.recovered == 330
        nursery.cancel_scope.cancel()
    # A clean stop hands every shard back at once.
    assert cluster.owned_by("a") == set()


async def test_nodes_split_the_shards_and_route_only_their_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = Cluster()
    a, _, _ = node(cluster, "a")
    b, _, _ = node(cluster, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        await trio.sleep(10)
        assert len(a.owned) == len(b.owned) == SHARDS // 2
        assert set(a.owned).isdisjoint(b.owned)
        assert cluster.owned_by("a") == set(a.owned)
        for account in range(1, 200):
            routed_a, routed_b = route_one(a, sms(account)), route_one(b, sms(account))
            # Exactly one node takes each message, stamped with its lease's token.
            assert (routed_a is None) != (routed_b is None)
            mine = routed_a or routed_b
            assert mine is not None and mine.fence == cluster.leases[shard_of(account)][1]
        nursery.cancel_scope.cancel()


async def test_a_dead_nodes_shards_are_taken_over_and_its_stamps_fenced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        a, _, inbox_a, b, store_b, on_b = await two_nodes(cluster, nursery)
        stamped_by_b = route_one(b, sms(on_b))
        assert stamped_by_b is not None and b.admit(stamped_by_b)
        cluster.pending = {stamped_by_b.id: sms(on_b)}  # queued in the database
        counted(inbox_a)

        store_b.dead = True  # killed: no more renewals, no clean release
        died = trio.current_time()
        while len(a.owned) < SHARDS:  # noqa: ASYNC110 (virtual time: polling costs nothing)
            await trio.sleep(0.1)
        # Taken over after the lease ran out: about ttl + tick after B's last renewal.
        assert trio.current_time() - died <= CONFIG.ttl + 2 * CONFIG.tick
        # A recovered B's queued message (counted, to page in under its own token) ...
        assert counted(inbox_a) == {on_b: 1}
        # ... and B, if it ever ran again, could not send its own copy: its lease is not
        # trusted past 0.8 of the ttl, and the token is no longer the shard's.
        assert not b.admit(stamped_by_b)
        assert cluster.leases[shard_of(on_b)][1] != stamped_by_b.fence
        nursery.cancel_scope.cancel()


async def test_a_late_renewal_nobody_took_over_keeps_its_tokens_and_reloads_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A node whose renewal came late (a busy loop, a pause) with its leases expired but not
    taken: sends wait while the lease is not trusted, then go on under the same tokens. Nothing
    is fenced off or read again: a reload here put every queued message in the Scheduler a
    second time and fenced off every outcome in flight, a spiral on a busy node."""
    cluster = Cluster()
    a, _, inbox = node(cluster, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        old = route_one(a, sms(7))
        assert old is not None and a.admit(old)
        cluster.pending = {old.id: sms(7)}
        shard = shard_of(old.account_id)
        owner, token, _ = cluster.leases[shard]
        cluster.leases[shard] = (owner, token, trio.current_time() - 1)  # expired in the table
        a.valid_until = trio.current_time() - 1  # as if the last renewal were long ago
        assert not a.admit(old)
        drained(inbox)
        await trio.sleep(CONFIG.tick * 2)
        assert a.counts["lapses"] == 1
        assert a.admit(old)  # trusted again, under the same token
        assert cluster.leases[shard][1] == old.fence and cluster.leases[shard][2] > 0
        assert drained(inbox) == [] and counted(inbox) == {}  # nothing read again
        nursery.cancel_scope.cancel()


async def test_a_late_renewal_loses_the_shards_another_node_took_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Expired and taken by another node before this one renewed: the lease is lost, and a
    message stamped under the old token is never sent from here."""
    cluster = Cluster()
    a, _, _ = node(cluster, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        old = route_one(a, sms(7))
        assert old is not None
        shard = shard_of(old.account_id)
        cluster.leases[shard] = ("b", cluster.next_token(), trio.current_time() + 60)
        a.valid_until = trio.current_time() - 1
        await trio.sleep(CONFIG.tick * 2)
        assert shard not in a.owned and a.counts["lost"] >= 1
        assert not a.admit(old) and not a.still_held(old)
        nursery.cancel_scope.cancel()


async def test_a_takeover_pages_the_backlog_and_holds_what_is_routed_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A takeover while accepts are routed here counts the taken shards' bulk for paging
    (memory does not follow a dead node's backlog) and passes on what was routed during the
    read only after the counts: no message enters an account's queue ahead of its older
    backlog, and none twice."""
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        a, _, inbox_a, _, store_b, on_b = await two_nodes(cluster, nursery)
        old = [sms(on_b, n) for n in range(5)]
        express = msgspec.structs.replace(sms(on_b, 99), express=True)
        newer = sms(on_b, 100)
        cluster.pending = {s.id: s for s in (*old, express)}
        while inbox_a.get_nowait() is not None:
            pass
        routed: list[list[OutboundSms]] = []
        original = a.store.load_backlog

        async def load_while_accepting(
            shards: Sequence[int],
        ) -> tuple[list[OutboundSms], list[tuple[int, int]]]:
            # Accepted here while the recovery reads: a newer bulk message and, racing the
            # snapshot, the express one it also reads.
            routed.append(a.route([newer, express]))
            return await original(shards)

        a.store.load_backlog = load_while_accepting  # type: ignore[method-assign]
        store_b.dead = True
        while shard_of(on_b) not in a.owned:  # noqa: ASYNC110 (virtual time)
            await trio.sleep(0.1)
        await trio.sleep(1)
        assert routed == [[]]  # held, not passed on while the recovery read
        told = []
        while (message := inbox_a.get_nowait()) is not None:
            told.append(message)
        backlog_at = next(i for i, m in enumerate(told) if isinstance(m, Backlog))
        assert (on_b, 5) in told[backlog_at].counts  # bulk counted, to page, not loaded
        enqueued = [(i, s) for i, m in enumerate(told) if isinstance(m, Enqueue) for s in m.items]
        assert sorted(s.id for _, s in enqueued) == sorted([express.id, newer.id])
        [at_newer] = [i for i, s in enqueued if s.id == newer.id]
        assert at_newer > backlog_at  # after its account's older backlog was counted
        assert all(a.admit(s) for _, s in enqueued)
        nursery.cancel_scope.cancel()


async def test_a_notified_hand_off_is_dispatched_once_whatever_else_brings_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A hand-off arrives in its notification and again in the owner's claim (the poll): the
    Scheduler gets it once, stamped; a shard not leased here is left to its recovery."""
    cluster = Cluster()
    a, store, inbox = node(cluster, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        mine = sms(5)
        body = msgspec.json.encode([mine]).decode()
        a.deliver(body)
        a.deliver(body)
        [got] = drained(inbox)
        assert got.id == mine.id and a.admit(got)
        claimed: list[tuple[OutboundSms, int]] = [(mine, a.owned[shard_of(5)])]

        async def claim(known: Callable[[str], bool]) -> list[tuple[OutboundSms, int]]:
            assert known(mine.id)
            return claimed

        store.claim = claim  # type: ignore[method-assign]
        a.wake()
        await trio.sleep(CONFIG.poll)
        assert drained(inbox) == []
        # An empty list asks for a claim; a shard leased elsewhere is not dispatched here.
        del a.owned[shard_of(6)]
        a.deliver(msgspec.json.encode([sms(6)]).decode())
        assert drained(inbox) == []
        nursery.cancel_scope.cancel()


def test_hand_off_payloads_fit_a_notify() -> None:
    from smsgw.storage.payloads import handoff_payloads

    small = [sms(i, n) for i in range(1, 4) for n in range(40)]
    huge = msgspec.structs.replace(sms(9), text="\u0001" * 1_600)  # escaped: over 8,000 bytes
    wide = [msgspec.structs.replace(sms(7, n), text="ж" * 600) for n in range(20)]  # 2 bytes each
    told = handoff_payloads({"b": [*small, huge, *wide], "": [sms(2)]})
    assert {owner for owner, _ in told} == {"b"}  # nobody's shard: no notification
    payloads = [p for _, p in told]
    assert all(len(p.encode()) < 8_000 for p in payloads)
    assert all(p.startswith("b\n") for p in payloads)
    carried = [m.id for p in payloads for m in msgspec.json.decode(p[2:], type=list[OutboundSms])]
    assert carried == [m.id for m in small + wide]
    assert payloads[-1] == "b\n[]"  # the one too large for a payload: "claim now"


def test_each_node_hears_its_hand_offs_on_a_channel_of_its_own() -> None:
    from smsgw.storage.cluster import channel_and_lock_class
    from smsgw.storage.payloads import owner_channel

    base, _ = channel_and_lock_class("smsgw")
    names = {owner_channel(base, node) for node in ("a", "b", "host-0", "host-1", "x" * 200)}
    assert len(names) == 5
    assert all(n.startswith(base) and len(n.encode()) <= 63 for n in names)  # an identifier
    assert owner_channel(base, "a") == owner_channel(base, "a")
    assert owner_channel(channel_and_lock_class("other")[0], "a") != owner_channel(base, "a")


async def test_a_body_read_back_is_stamped_with_its_shards_token_or_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bodies the Scheduler reads from the store (paged entries) come without a token: they
    get the shard's current one, so a paged message is fenced like any other; a shard this
    node does not lease gives None (its owner recovers the message)."""
    cluster = Cluster()
    a, _, _ = node(cluster, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        mine = sms(7)
        stamped = a.stamp(mine)
        assert stamped is not None and stamped.fence == a.owned[shard_of(7)] and a.admit(stamped)
        del a.owned[shard_of(7)]
        assert a.stamp(mine) is None
        nursery.cancel_scope.cancel()


async def test_a_slow_recovery_does_not_hold_up_the_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A takeover whose recovery reads for 10 s (a large backlog on a busy database): the node
    goes on renewing its leases every tick meanwhile, so none lapses and no other node can
    take them. Recovered inside the tick, the renewal waited for the read, the leases expired
    after 3 s and two nodes draining a backlog took shards from each other in turn."""
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        a, store_a, inbox_a, _, store_b, on_b = await two_nodes(cluster, nursery)
        cluster.pending = {s.id: s for s in (sms(on_b, n) for n in range(5))}
        original = store_a.load_backlog

        async def slow_load(
            shards: Sequence[int],
        ) -> tuple[list[OutboundSms], list[tuple[int, int]]]:
            await trio.sleep(10)
            return await original(shards)

        store_a.load_backlog = slow_load  # type: ignore[method-assign]
        drained(inbox_a)
        store_b.dead = True
        while shard_of(on_b) not in a.owned:  # noqa: ASYNC110 (virtual time)
            await trio.sleep(0.1)
        ticks = a.counts["ticks"]
        await trio.sleep(12)
        assert a.counts["ticks"] >= ticks + 20  # a tick every 0.5 s while the read went on
        assert a.counts["lapses"] == 0 and a.counts["lost"] == 0
        assert counted(inbox_a).get(on_b) == 5  # and the recovery told its counts after it
        nursery.cancel_scope.cancel()


async def test_a_restarted_lease_actor_recovers_its_shards_from_a_clean_slate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A restart of ShardLeases releases its leases without telling the Scheduler; when it
    takes them again, its recovery first has the Scheduler forget their streams (cursors from
    the earlier lease would pass over messages it held then), then tells the backlog."""
    cluster = Cluster()
    a, _, inbox = node(cluster, "a")
    with trio.CancelScope() as first:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            first.cancel()
    assert not a.owned
    account = 7
    cluster.pending = {s.id: s for s in (sms(account, n) for n in range(3))}
    while inbox.get_nowait() is not None:
        pass
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        while shard_of(account) not in a.owned:  # noqa: ASYNC110 (virtual time)
            await trio.sleep(0.1)
        await trio.sleep(1)
        told = []
        while (message := inbox.get_nowait()) is not None:
            told.append(message)
        forgot = next(i for i, m in enumerate(told) if isinstance(m, ForgetShards))
        counts = next(i for i, m in enumerate(told) if isinstance(m, Backlog))
        assert shard_of(account) in told[forgot].shards and forgot < counts
        assert (account, 3) in told[counts].counts
        nursery.cancel_scope.cancel()
