"""Scheduled sends through a whole node in virtual time (MemStore, MemCluster): nothing is
sent before its `send_at`, everything within a second after it (express too: its deadline
counts from the send_at), and a crowd of messages due at once enters the Scheduler only as
its memory has room, the rest waiting in the store."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import trio
import trio.testing

from smsgw.engine.messages import OutboundSms, SendResult
from smsgw.engine.node import Engine, EngineConfig
from smsgw.engine.ports import Provider
from smsgw.engine.scheduled import ScheduledConfig
from smsgw.engine.shards import LeaseConfig
from smsgw.sim.memcluster import MemCluster
from smsgw.sim.memstore import MemStore

T0 = 1_800_000_000.0  # the wall clock at virtual time 0
LEASES = LeaseConfig(ttl=600.0, tick=60.0, poll=60.0, sweep=0.0, share_tick=60.0)


def wall() -> float:
    return T0 + trio.current_time()


class Recorder:
    """An operator that takes everything after `latency` and notes when each message came."""

    def __init__(self, latency: float = 0.02) -> None:
        self.latency = latency
        self.arrived: dict[str, float] = {}  # id -> wall clock
        self.more = trio.Event()  # set when messages arrive, then replaced

    @property
    def name(self) -> str:
        return "recorder"

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        now = wall()
        for sms in batch:
            self.arrived[sms.id] = now
        self.more.set()
        self.more = trio.Event()
        await trio.sleep(self.latency)
        return [SendResult("sent", f"op-{sms.id}") for sms in batch]


def message(
    account_id: int, send_at: float | None, *, express: bool = False, deadline_s: float = 2.0
) -> OutboundSms:
    now = wall()
    start = now if send_at is None else send_at
    return OutboundSms(
        id=str(uuid.uuid4()),
        account_id=account_id,
        to="+4915123456789",
        sender="t",
        text="x",
        segments=1,
        price=7 if express else 5,
        express=express,
        created_at=now,
        deadline=start + deadline_s if express else None,
        send_at=send_at,
    )


async def run_node(
    store: MemStore,
    operator: Provider,
    config: EngineConfig,
    nursery: trio.Nursery,
    *,
    cluster: MemCluster | None = None,
    leases: LeaseConfig = LEASES,
) -> Engine:
    """A whole node on `store` in virtual time, leasing its shards from `cluster` (default: a
    MemCluster that never takes them away), ready."""
    engine = Engine(
        store,
        [(operator, 1)],
        config,
        clock=wall,
        seed=1,
        cluster=MemCluster(store) if cluster is None else cluster,
        leases=leases,
        lease_clock=trio.current_time,
    )
    await nursery.start(engine.run)
    await engine.ready.wait()
    return engine


async def accept(engine: Engine, items: list[OutboundSms]) -> None:
    for start in range(0, len(items), 1_000):
        results = await engine.accept(items[start : start + 1_000], atomic=False)
        assert all(r.accepted for r in results), results[:3]


async def until_sent(operator: Recorder, count: int, within: float) -> None:
    with trio.fail_after(within):
        while len(operator.arrived) < count:
            await operator.more.wait()


def test_sent_at_send_at_not_before_and_within_a_second() -> None:
    """Bulk and express messages scheduled at three moments, among messages sent at once:
    each reaches the operator at or after its send_at and less than a second after it, the
    express ones inside their deadline (2 s from their send_at, not from the accept)."""

    async def main() -> None:
        store = MemStore(cost=None)
        accounts = [store.add_account(f"a{i}", 10**9).id for i in range(3)]
        operator = Recorder()
        async with trio.open_nursery() as nursery:
            engine = await run_node(store, operator, EngineConfig(), nursery)
            now = wall()
            moments = [now + 30.25, now + 600.0, now + 3_600.5]
            items = [
                message(accounts[i % 3], moments[i % 3], express=i % 10 == 0) for i in range(600)
            ]
            await accept(engine, items)
            immediate = [message(a, None) for a in accounts]
            await accept(engine, immediate)
            await until_sent(operator, len(immediate), 5)
            assert engine.scheduled.promoted == 0
            await until_sent(operator, len(items) + len(immediate), 4_000)
            for sms in items:
                assert sms.send_at is not None
                late = operator.arrived[sms.id] - sms.send_at
                assert 0 <= late < 1.0, (sms, late)
            assert engine.scheduled.promoted == len(items)
            assert engine.deadline_misses() == 0
            assert store.scheduled_ids == set()
            nursery.cancel_scope.cancel()
        assert store.broken_accounts() == {}

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_crowd_due_at_once_waits_in_the_store_for_room() -> None:
    """20,000 messages of 20 accounts due at one moment, sent at 2,000 a second, with the
    Scheduler's memory bounded at 1,000 entries: the Scheduler never holds more than its
    bound and one promotion, the others stay `scheduled` in the store until it has room,
    and every message is sent, none before its time."""
    bound, page = 1_000, 200

    async def main() -> None:
        store = MemStore(cost=None)
        accounts = [store.add_account(f"a{i}", 10**9).id for i in range(20)]
        operator = Recorder()
        config = EngineConfig(
            window=40,  # 40 in flight, 20 ms each: 2,000 a second
            scheduler_memory_bound=bound,
            mailbox_bound=100,
            scheduled=ScheduledConfig(page=page, per_shard=page),
        )
        async with trio.open_nursery() as nursery:
            engine = await run_node(store, operator, config, nursery)
            when = wall() + 60.0
            items = [message(accounts[i % 20], when) for i in range(20_000)]
            await accept(engine, items)
            # A second later each account sends one message at once: its paging cursor is
            # then past the scheduled messages' accept time, and promoted ones enter memory
            # directly (accepts take no virtual time here: at the same instant, the random
            # ids would order them).
            await trio.sleep(1.0)
            await accept(engine, [message(a, None) for a in accounts])
            await until_sent(operator, len(accounts), 5)
            state = engine.scheduler.state
            most = 0
            waiting_due = None  # still scheduled a second after their time
            with trio.fail_after(120):
                while len(operator.arrived) < len(items) + len(accounts):
                    most = max(most, state.in_memory)
                    if waiting_due is None and wall() >= when + 1.0:
                        waiting_due = len(store.scheduled_ids)
                    await trio.sleep(0.001)
            assert most <= bound + page, most
            # At most what was sent and what the Scheduler could hold had left the store.
            assert waiting_due is not None and waiting_due > 15_000, waiting_due
            assert engine.scheduled.waits_for_room > 0
            assert min(operator.arrived[s.id] for s in items) >= when
            nursery.cancel_scope.cancel()
        assert store.broken_accounts() == {}

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
