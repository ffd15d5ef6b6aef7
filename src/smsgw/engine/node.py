"""Engine: builds one node's actors, wires them together and puts them under a supervisor."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import trio

from smsgw.engine.actor import Inbox
from smsgw.engine.callbacks import CallbackPolicy, CallbackPoster, CallbackSender, DlrReconciler
from smsgw.engine.messages import (
    Accept,
    AcceptResult,
    Account,
    CreateAccount,
    DeliveryReport,
    DeliveryResult,
    Enqueue,
    OutboundSms,
    RecordDeliveries,
    SchedulerMessage,
    TopUp,
)
from smsgw.engine.pool import ProviderPool, RetryPolicy
from smsgw.engine.ports import CallbackStore, ClusterStore, MessageStore, Provider
from smsgw.engine.retry import RetryTimer
from smsgw.engine.routing import RoutingConfig
from smsgw.engine.scheduler import Scheduler
from smsgw.engine.shards import LeaseConfig, ShardLeases
from smsgw.engine.supervisor import ChildSpec, Restart, Supervisor
from smsgw.engine.writer import StoreWriter


class EngineConfig(msgspec.Struct, frozen=True):
    normal_price: int = 5  # per segment, smallest currency unit
    express_price: int = 7
    express_deadline_ms: int = 2_000
    max_segments: int = 10
    # In flight at once: at 12,000 msg/s and operators answering in 50-200 ms, about 1,200
    # messages are in flight, so a smaller window would cap throughput by latency alone.
    window: int = 2_000
    max_batch: int = 100  # messages in one operator call
    retry: RetryPolicy = RetryPolicy()
    writer_capacity: int = 20_000
    writer_max_group: int = 5_000  # rows (messages, outcomes, ...) per group commit
    writer_committers: int = 2
    scheduler_capacity: int = 100_000
    accept_timeout: float = 10.0
    max_restarts: int = 5
    restart_window: float = 10.0
    # Requests per account that the HTTP door lets through (a token bucket per account): a
    # generous ceiling against runaway clients, not a price plan. Batches count once.
    api_rate_per_second: float = 1_000.0
    api_burst: int = 2_000
    # Callback URLs may name any host only in production; otherwise loopback only (a node in
    # development or a test must not call out to the world).
    production: bool = False
    callbacks: CallbackPolicy = CallbackPolicy()
    # Operator weights, windows, throughput caps, route overrides, the breakers' policy.
    routing: RoutingConfig = RoutingConfig()


class Engine:
    """One node's engine. `run` starts the supervision tree (with any extra children, such as
    the HTTP front door, started last) and recovers pending work before it reports started."""

    def __init__(
        self,
        store: MessageStore,
        providers: Sequence[tuple[Provider, int]],
        config: EngineConfig = EngineConfig(),
        *,
        clock: Any = time.time,
        seed: int | None = None,
        cluster: ClusterStore | None = None,
        leases: LeaseConfig = LeaseConfig(),
        callback_store: CallbackStore | None = None,
        callback_poster: CallbackPoster | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.ready = trio.Event()
        self._recovered = 0
        scheduler_inbox: Inbox[SchedulerMessage] = Inbox("scheduler", config.scheduler_capacity)
        scheduler_ref = scheduler_inbox.handle()
        # Among several nodes on one database, this node dispatches only the shards it leases
        # (engine/shards.py); without a cluster store it dispatches everything (one node).
        self.leases: ShardLeases | None = None
        if cluster is not None:
            self.leases = ShardLeases(
                cluster, scheduler_ref, lambda: self.pool.inflight.values(), leases
            )
            self.ready = self.leases.ready

        async def dispatch(items: Sequence[OutboundSms]) -> None:
            if self.leases is not None:
                route = self.leases.route
                items = [routed for sms in items if (routed := route(sms)) is not None]
                if not items:
                    return
            await scheduler_ref.tell(Enqueue(tuple(items)))

        self.writer = StoreWriter(
            store,
            dispatch,
            capacity=config.writer_capacity,
            max_group=config.writer_max_group,
            committers=config.writer_committers,
        )
        self.retry = RetryTimer(scheduler_ref)
        self.pool = ProviderPool(
            providers,
            self.writer.ref,
            self.retry.ref,
            scheduler_ref,
            window=config.window,
            max_batch=config.max_batch,
            policy=config.retry,
            clock=clock,
            seed=seed,
            admit=None if self.leases is None else self.leases.admit,
            routing=config.routing,
        )
        self.scheduler = Scheduler(scheduler_inbox, self.pool, self.writer.ref, clock=clock)
        # Status callbacks and late DLRs need the outbox; without one (engine-only tests) the
        # node runs without them.
        self.callbacks: CallbackSender | None = None
        self.reconciler: DlrReconciler | None = None
        if callback_store is not None and callback_poster is not None:
            self.callbacks = CallbackSender(
                callback_store, callback_poster, config.callbacks, clock=clock, seed=seed
            )
            self.reconciler = DlrReconciler(callback_store)
        self.supervisor: Supervisor | None = None

    @property
    def recovered(self) -> int:
        """Messages put back into the Scheduler at start (of the shards leased at start)."""
        return self.leases.recovered if self.leases is not None else self._recovered

    def children(self) -> list[ChildSpec]:
        # Among several nodes, recovery is the leases' work: at start and on every takeover.
        if self.leases is not None:
            recovery = ChildSpec(
                "shard_leases", self.leases.run, restart=Restart.PERMANENT, stats=self.leases.stats
            )
        else:
            recovery = ChildSpec(
                "recovery", self._recover, restart=Restart.TRANSIENT, stats=self._recovery_stats
            )
        return [
            ChildSpec(
                "store_writer", self.writer.run, inbox=self.writer.inbox, stats=self.writer.stats
            ),
            ChildSpec(
                "retry_timer", self.retry.run, inbox=self.retry.inbox, stats=self.retry.stats
            ),
            ChildSpec("provider_pool", self.pool.run, inbox=self.pool.inbox, stats=self.pool.stats),
            ChildSpec(
                "scheduler",
                self.scheduler.run,
                inbox=self.scheduler.inbox,
                stats=self.scheduler.stats,
            ),
            recovery,
            *self._delivery_children(),
        ]

    def _delivery_children(self) -> list[ChildSpec]:
        if self.callbacks is None or self.reconciler is None:
            return []
        return [
            ChildSpec("callback_sender", self.callbacks.run, stats=self.callbacks.stats),
            ChildSpec("dlr_reconciler", self.reconciler.run, stats=self.reconciler.stats),
        ]

    def _recovery_stats(self) -> dict[str, Any]:
        return {"recovered": self.recovered, "done": self.ready.is_set()}

    async def _recover(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Put every message that is not final back into the Scheduler, once, at start.

        It reports started only when done, so the HTTP door (started after it) accepts nothing
        that the recovery query could also return: no message is enqueued twice."""
        if not self.ready.is_set():
            pending = await self.store.pending()
            for start in range(0, len(pending), 1_000):
                await self.scheduler.ref.tell(Enqueue(tuple(pending[start : start + 1_000])))
            self._recovered = len(pending)
            self.ready.set()
        task_status.started()

    async def run(
        self,
        extra: Sequence[ChildSpec] = (),
        *,
        task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.supervisor = Supervisor(
            "node",
            [*self.children(), *extra],
            max_restarts=self.config.max_restarts,
            within=self.config.restart_window,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run)
            task_status.started(self.supervisor)

    # --- the handle the HTTP front door uses ---------------------------------------------

    async def accept(self, items: Sequence[OutboundSms], *, atomic: bool) -> list[AcceptResult]:
        """Hold credit and store `items`; returns only after the commit. Raises InboxFull
        (shed load) or AskTimeout, and StoreUnavailable when the group failed to commit."""
        return await self.writer.ref.ask(
            lambda reply: Accept(tuple(items), atomic, reply), self.config.accept_timeout
        )

    async def topup(self, account_id: int, amount: int) -> int | None:
        return await self.writer.ref.ask(
            lambda reply: TopUp(account_id, amount, reply), self.config.accept_timeout
        )

    async def create_account(self, name: str, credit: int, key_hash: bytes) -> Account:
        return await self.writer.ref.ask(
            lambda reply: CreateAccount(name, credit, key_hash, reply), self.config.accept_timeout
        )

    async def record_deliveries(
        self, operator: str, reports: Sequence[DeliveryReport]
    ) -> list[DeliveryResult]:
        """Apply one operator's delivery reports in a group commit; one result per report, in
        order. Raises like `accept`."""
        return await self.writer.ref.ask(
            lambda reply: RecordDeliveries(operator, tuple(reports), reply),
            self.config.accept_timeout,
        )
