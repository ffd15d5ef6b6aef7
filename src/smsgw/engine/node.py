"""Engine: builds one node's actors, wires them together and puts them under a supervisor."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import trio

from smsgw.engine.actor import Inbox, InboxFull, Reply
from smsgw.engine.admission import Admission, AdmissionConfig, DrainRate, Pressure
from smsgw.engine.callbacks import CallbackPolicy, CallbackPoster, CallbackSender, DlrReconciler
from smsgw.engine.cancels import Cancels
from smsgw.engine.express import express_problem
from smsgw.engine.mailboxes import FifoState, SchedulerState
from smsgw.engine.messages import (
    DEFAULT_SETTINGS,
    Accept,
    AcceptResult,
    Account,
    AccountChanged,
    AccountSettings,
    CreateAccount,
    DeliveryReport,
    DeliveryResult,
    Enqueue,
    OutboundSms,
    Outcome,
    RecordDeliveries,
    RecordOutcome,
    SchedulerMessage,
    SendRate,
    Settled,
    TopUp,
)
from smsgw.engine.pool import ProviderPool
from smsgw.engine.ports import CallbackStore, ClusterStore, MessageStore, Provider, shard_of
from smsgw.engine.retry import RetryPolicy, RetryTimer, expired
from smsgw.engine.routing import RoutingConfig
from smsgw.engine.scheduled import ScheduledConfig, ScheduledSends
from smsgw.engine.scheduler import Capacity, Scheduler
from smsgw.engine.shards import LeaseConfig, ShardLeases, recover_into
from smsgw.engine.shares import ApiShares, SendShares
from smsgw.engine.supervisor import ChildSpec, Restart, Supervisor
from smsgw.engine.writer import StoreWriter

_settled_decoder = msgspec.json.Decoder(list[Settled])
_pressure_encoder = msgspec.json.Encoder()
_pressure_decoder = msgspec.json.Decoder(Pressure)
_NO_PRESSURE = Pressure()


@functools.lru_cache(maxsize=64)
def _decoded_pressure(published: str) -> Pressure:
    """A node's published pressure, decoded once however many of its shards' sends ask (the
    same text stands for every shard of the node)."""
    try:
        return _pressure_decoder.decode(published)
    except msgspec.DecodeError:
        return _NO_PRESSURE


_changed_decoder = msgspec.json.Decoder(AccountChanged)


class EngineConfig(msgspec.Struct, frozen=True):
    # Prices in the smallest currency unit, for accounts without their own (AccountSettings):
    # per segment, and added per segment of an express message.
    price_per_segment: int = 5
    express_surcharge: int = 2
    express_deadline_ms: int = 2_000
    max_segments: int = 10
    # In flight at once: at 12,000 msg/s and operators answering in 50-200 ms, about 1,200
    # messages are in flight, so a smaller window would cap throughput by latency alone.
    window: int = 2_000
    # Messages in one operator call, and at most an eighth of the window: a batch's slots
    # free together when it returns, so a window of one or two batches would take newly
    # arrived work only when a whole batch returns (a light account's message waited a whole
    # operator round trip for a slot behind a flood, at a window of 100).
    max_batch: int = 100
    retry: RetryPolicy = RetryPolicy()
    writer_capacity: int = 20_000
    writer_max_group: int = 5_000  # rows (messages, outcomes, ...) per group commit
    writer_committers: int = 2
    scheduler_capacity: int = 100_000
    accept_timeout: float = 10.0
    # A group commit not answered within this is in doubt: the writer learns from the store
    # whether it committed (and dispatches what it stored) before it answers anyone.
    writer_commit_timeout: float = 30.0
    max_restarts: int = 5
    restart_window: float = 10.0
    # Requests per account that the HTTP door lets through (a token bucket per account, per
    # node): a ceiling against runaway clients, above what one node serves (about 1,700
    # requests/s here), so it never refuses a customer's ordinary burst; protecting the node
    # is admission control's work. An account's own `api_rate` holds across the cluster
    # (engine/shares.py). Batches count once.
    api_rate_per_second: float = 10_000.0
    api_burst: int = 20_000
    # Callback URLs may name any host only in production; otherwise loopback only (a node in
    # development or a test must not call out to the world).
    production: bool = False
    callbacks: CallbackPolicy = CallbackPolicy()
    # --- scheduling (issue 4) ---
    # Share of the window only express messages may use: bulk never fills it, so an express
    # message finds a slot at once however deep the bulk backlog.
    express_reserve_share: float = 0.1
    # Share of the window kept for light accounts (no more than `light_backlog` bulk messages
    # waiting since they last had none) while they are sending: a flood then fills the rest,
    # and a light account's message finds a slot at once instead of waiting for one of the
    # flood's batches to return. Accounts that all send in bulk keep the whole window.
    light_reserve_share: float = 0.1
    light_backlog: int = 10
    # Deficit round robin: segments of credit an account gets per turn. At least the largest
    # message (max_segments), so every account with work is served in every round.
    drr_quantum: int = 10
    # Bulk entries in memory: per account, and in all (each entry is an id and its place in
    # the queue, about 200 bytes); the rest wait in PostgreSQL and are paged back in.
    mailbox_bound: int = 1_000
    scheduler_memory_bound: int = 200_000
    # Bulk bodies the Scheduler keeps from accept to dispatch, so that without a backlog no
    # message is read back; past it, bodies are read in one query per batch.
    body_cache: int = 20_000
    page_size: int = 500  # entries per account per page query
    page_accounts: int = 500  # accounts per page query
    # Messages per recipient number per account in an hour (a per-account setting overrides);
    # remembered for at most this many (account, number) pairs.
    recipient_limit_per_hour: int = 20
    recipient_limit_keys: int = 200_000
    # Benchmarks only (benchmarks/fairness.py's baseline): bulk first come first served
    # whatever its account (`FifoState`) instead of deficit round robin, all in memory.
    scheduler_fifo: bool = False
    # Operator weights, windows, throughput caps, route overrides, the breakers' policy.
    routing: RoutingConfig = RoutingConfig()
    # Bounds on bulk accepted and not yet dispatched, per account and per node.
    admission: AdmissionConfig = AdmissionConfig()
    # How long a one-time code (engine/otp.py) may be verified after it is sent.
    otp_ttl_s: float = 120.0
    # Scheduled sends: how often and how many at a time due ones are promoted.
    scheduled: ScheduledConfig = ScheduledConfig()


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
        lease_clock: Callable[[], float] = time.monotonic,
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
                cluster,
                scheduler_ref,
                lambda: self.pool.in_flight(),
                leases,
                clock=lease_clock,
                settled=self._settled_elsewhere,
                account_changed=self._account_changed,
                publish=self._pressure,
                # The stranded-message sweep asks what this node holds.
                unheld=self._unheld,
            )
            self.ready = self.leases.ready

        async def dispatch(items: Sequence[OutboundSms]) -> None:
            if any(sms.send_at is not None for sms in items):
                # Scheduled: stored, and left there until due (ScheduledSends).
                self.scheduled.due(min(s.send_at for s in items if s.send_at is not None))
                items = [sms for sms in items if sms.send_at is None]
                if not items:
                    return
            if self.leases is not None:
                items = self.leases.route(items)
                if not items:
                    return
            await scheduler_ref.tell(Enqueue(tuple(items)))

        # Cancels begun here: the pool sends nothing whose cancel is decided or under way.
        self.cancels = Cancels()
        self.writer = StoreWriter(
            store,
            dispatch,
            capacity=config.writer_capacity,
            max_group=config.writer_max_group,
            committers=config.writer_committers,
            commit_timeout=config.writer_commit_timeout,
            outcomes_committed=self.cancels.settled,
        )
        self.retry = RetryTimer(scheduler_ref)
        express_reserve = min(config.window - 1, int(config.window * config.express_reserve_share))
        light_room = max(0, config.window - 1 - express_reserve)  # leaves a flood one slot
        light_reserve = min(light_room, max(0, int(light_room * config.light_reserve_share)))
        max_batch = max(1, min(config.max_batch, config.window // 8))
        self.pool = ProviderPool(
            providers,
            self.writer.ref,
            self.retry.ref,
            scheduler_ref,
            window=config.window,
            max_batch=max_batch,
            policy=config.retry,
            clock=clock,
            seed=seed,
            admit=None if self.leases is None else self.leases.admit,
            still_held=None if self.leases is None else self.leases.still_held,
            routing=config.routing,
            cancels=self.cancels,
        )
        # The strategy: round robin, or the benchmarks' FIFO baseline (chosen here only).
        state = (
            FifoState(page_size=config.page_size)
            if config.scheduler_fifo
            else SchedulerState(
                quantum=config.drr_quantum,
                account_bound=config.mailbox_bound,
                memory_bound=config.scheduler_memory_bound,
                body_budget=config.body_cache,
                page_size=config.page_size,
                light_backlog=config.light_backlog,
            )
        )
        self.scheduler = Scheduler(
            scheduler_inbox,
            self.pool.ref,
            self.writer.ref,
            Capacity(config.window, express_reserve, light_reserve),
            max_batch=max_batch,
            clock=clock,
            store=store,
            state=state,
            page_accounts=config.page_accounts,
            commits=self.writer.commits,
            stamp=None if self.leases is None else self.leases.stamp,
            held=None if self.leases is None else self.leases.still_held,
            operator_rate=lambda: self.pool.figures.capacity,
        )
        # Among several nodes, an account's api_rate is split between them by demand, and a
        # paced account's send rate by where its bulk waits.
        self.api_shares: ApiShares | None = None
        self.send_shares: SendShares | None = None
        if self.leases is not None and cluster is not None:
            leased = self.leases
            self.api_shares = ApiShares(cluster, lambda: leased.live_nodes, tick=leases.share_tick)
            self.send_shares = SendShares(
                cluster, self.scheduler, lambda: leased.live_nodes, tick=leases.share_tick
            )

        async def promoted(items: Sequence[OutboundSms], tokens: Mapping[int, int] | None) -> None:
            if self.leases is not None:
                # Of shards this node still leases under the token they were promoted under.
                items = self.leases.take_promoted(items, tokens or {})
            if items:
                await scheduler_ref.tell(Enqueue(tuple(items)))

        # Scheduled messages come due from the store into the Scheduler, as room allows.
        self.scheduled = ScheduledSends(
            store,
            promoted,
            lambda: None if self.leases is None else dict(self.leases.owned),
            lambda: self.scheduler.figures,
            self.ready,
            memory_bound=config.scheduler_memory_bound,
            backlog_bound=config.admission.node_backlog // 2,
            commits=self.writer.commits,
            clock=clock,
            config=config.scheduled,
        )
        # Status callbacks and late DLRs need the outbox; without one (engine-only tests) the
        # node runs without them.
        self.callbacks: CallbackSender | None = None
        self.reconciler: DlrReconciler | None = None
        if callback_store is not None and callback_poster is not None:
            self.callbacks = CallbackSender(
                callback_store, callback_poster, config.callbacks, clock=clock, seed=seed
            )
            self.reconciler = DlrReconciler(callback_store)
        self.admission = Admission(
            config.admission,
            backlog=self.scheduler.backlog,
            node_backlog=lambda: self.scheduler.figures.bulk_waiting,
            drain_rate=DrainRate(lambda: self.scheduler.figures.dispatched, time.monotonic),
            remote=self._remote_pressure,
        )
        self.supervisor: Supervisor | None = None
        # Per-account settings this node has seen (with each API key lookup, and on a change
        # made here): read on the accept path without a query.
        self.settings: dict[int, AccountSettings] = {}
        # `"wait": true` requests: message id -> the slot its committed outcome goes to.
        self.waiters: dict[str, Reply[Settled]] = {}
        self.writer.on_outcomes = self._outcomes_committed
        # What this node's operators did with the messages those requests wait for, before
        # the commit: read at the deadline only (see `told_outcome`).
        self.told: dict[str, Settled] = {}
        self.writer.on_express_told = self._express_told
        # Told the id of an account whose key or settings changed on any node (the HTTP
        # door's key cache forgets its keys).
        self.account_listeners: list[Callable[[int], None]] = []

    @property
    def recovered(self) -> int:
        """Messages put back into the Scheduler at start (of the shards leased at start)."""
        return self.leases.recovered if self.leases is not None else self._recovered

    def children(self) -> list[ChildSpec]:
        # Among several nodes, recovery is the leases' work: at start and on every takeover.
        if self.leases is not None:
            recovery = ChildSpec(
                "shard_leases", self._run_leases, restart=Restart.PERMANENT, stats=self.leases.stats
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
                stats=self._scheduler_stats,
            ),
            recovery,
            ChildSpec("scheduled_sends", self.scheduled.run, stats=self.scheduled.stats),
            *self._delivery_children(),
            *self._cluster_children(),
        ]

    def _scheduler_stats(self) -> dict[str, Any]:
        """The Scheduler's figures, with the express deadline misses of the whole node (the
        pool counts those that ran out at an operator) and admission's."""
        stats = self.scheduler.stats()
        stats["express_deadline_misses"] = self.deadline_misses()
        return {**stats, "admission": self.admission.stats()}

    def _cluster_children(self) -> list[ChildSpec]:
        if self.api_shares is None or self.send_shares is None:
            return []
        return [
            ChildSpec("api_shares", self.api_shares.run, stats=self.api_shares.stats),
            ChildSpec("send_shares", self.send_shares.run, stats=self.send_shares.stats),
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

    async def _run_leases(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The shard leases, once the Scheduler knows which accounts it must pace or hold (a
        node among several learns the rest of their settings from key lookups and changes)."""
        assert self.leases is not None
        await self._learn_dispatch_rates()
        await self.leases.run(task_status=task_status)

    async def _learn_dispatch_rates(self) -> None:
        """Tell the Scheduler, before any message, which accounts it must pace or hold."""
        for account_id, rate in await self.store.dispatch_rates():
            await self.scheduler.ref.tell(SendRate(account_id, rate))

    async def _recover(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Put every message that is not final back into the Scheduler, once, at start.

        It reports started only when done, so the HTTP door (started after it) accepts nothing
        that the recovery query could also return: no message is enqueued twice."""
        if not self.ready.is_set():
            await self._learn_dispatch_rates()
            recovered = await self.store.recover()
            self._recovered = await recover_into(
                self.scheduler.ref, recovered.express, recovered.backlogs
            )
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

    # --- scheduling and settings ------------------------------------------------------------

    def account_settings(self, account_id: int) -> AccountSettings:
        return self.settings.get(account_id, DEFAULT_SETTINGS)

    def learn_settings(self, account_id: int, settings: AccountSettings) -> None:
        """Remember an account's settings (from a key lookup or a change) and give the
        Scheduler its send rate if that changed. Never waits: if the Scheduler's inbox is full
        the rate goes with the next lookup."""
        if settings == DEFAULT_SETTINGS:
            self.settings.pop(account_id, None)
        else:
            self.settings[account_id] = settings
        # A suspended account dispatches nothing: its rate is 0 until it resumes.
        rate = 0.0 if settings.suspended else settings.send_rate
        if self.scheduler.send_rate(account_id) != rate:
            with contextlib.suppress(InboxFull):
                self.scheduler.ref.tell_nowait(SendRate(account_id, rate))

    def express_deadline_s(self, account_id: int) -> float:
        ms = self.account_settings(account_id).express_deadline_ms
        return (self.config.express_deadline_ms if ms is None else ms) / 1000

    def express_shard(self) -> int | None:
        """The shard an express message accepted now is dispatched under, one this node
        leases (`ShardLeases.home_shard`); None: its account's shard (a lone node, or one
        that leases nothing now)."""
        return None if self.leases is None else self.leases.home_shard()

    def bulk_shard(self, account_id: int) -> int | None:
        """The shard a bulk message of `account_id` accepted now (not scheduled) is dispatched
        under. This node's home shard when another node leases the account's shard: the
        message is dispatched here, with no hand-off. None (the account's shard) when this
        node leases that shard, leases nothing (or alone), or the account is paced or
        suspended: its send rate is kept in one place, by the owner of its shard, so its bulk
        is handed there."""
        leases = self.leases
        if leases is None or shard_of(account_id) in leases.owned:
            return None
        settings = self.settings.get(account_id)
        if settings is not None and (settings.send_rate is not None or settings.suspended):
            return None
        return leases.home_shard()

    def express_problem(self, account_id: int, shard: int) -> str | None:
        """Why an express message of this account accepted now, to be dispatched under
        `shard` (`dispatch_shard`), would miss its deadline (no healthy operator, no capacity
        in time, or its dispatcher stalled), or None. In memory: no query, no wait."""
        if not self.ready.is_set():
            return "the node is still recovering"
        if self.dispatch_stalled(shard):
            return "the node that dispatches this account is not answering; another takes over"
        commit = self.writer.figures.commit_ms_ewma / 1000
        return express_problem(
            self.express_deadline_s(account_id) - commit,
            self.scheduler.figures,
            self.pool.figures.operators,
            self.pool.names,
            trio.current_time(),
        )

    def deadline_misses(self) -> int:
        """Express messages failed because their deadline passed: waiting for a slot, for an
        operator, or for a retry that could not make it."""
        return self.scheduler.figures.deadline_misses + self.pool.figures.deadline_misses

    def sending(self, message_id: str) -> bool:
        """Whether an attempt of `message_id` is in flight on this node."""
        return self.pool.sending(message_id)

    def dispatched_shards(self) -> list[int] | None:
        """The shards whose messages this node dispatches (None: all, a node without
        leases). A cancel is decided only here, where the pool can hold the message back."""
        return None if self.leases is None else list(self.leases.owned)

    def begin_cancel(self, message_id: str) -> bool:
        """Hold `message_id` back from the operators while the store decides its cancel; False
        (nothing held) when an attempt of it is in flight here already: too late. Call `end`
        on `cancels` once the store answered, whatever it answered."""
        if self.pool.sending(message_id) or self.cancels.too_late(message_id):
            return False
        self.cancels.begin(message_id)
        return True

    def _unheld(self, items: Sequence[OutboundSms]) -> list[OutboundSms]:
        """The messages of `items` (pending in the store) that nothing on this node will
        dispatch or finish: not in flight at the pool, not waiting for a retry, not waiting in
        the Scheduler. For ShardLeases.sweep; a message between two holders (an Enqueue not
        yet taken from the inbox, a batch whose bodies are being read) is unheld for that
        moment, which the sweep allows for."""
        sending = self.pool.sending
        retrying = {sms.id for sms in self.retry.waiting()}
        return self.scheduler.unheld(
            sms for sms in items if not sending(sms.id) and sms.id not in retrying
        )

    def _pressure(self) -> str | None:
        """What this node's admission refuses, for its heartbeat (None: nothing)."""
        largest = dict(self.scheduler.largest_backlogs(100))
        pressure = self.admission.pressure(largest)
        if not pressure.node_retry_s and not pressure.accounts:
            return None
        return _pressure_encoder.encode(pressure).decode()

    def _remote_pressure(self, account_id: int) -> Pressure | None:
        """The pressure published by the node that dispatches `account_id`, if another one
        (an empty one when it refuses nothing); None when this node dispatches it."""
        if self.leases is None:
            return None
        shard = shard_of(account_id)
        if shard in self.leases.owned or self.bulk_shard(account_id) is not None:
            return None
        found = self.leases.pressure.get(shard)
        return _NO_PRESSURE if found is None else _decoded_pressure(found)

    def dispatch_stalled(self, shard: int) -> bool:
        """The node that leases `shard` stopped heartbeating (dead, paused): its express
        messages will not reach an operator before another node takes the shard."""
        return self.leases is not None and shard in self.leases.stalled

    async def expire(self, sms: OutboundSms) -> None:
        """Fail `sms` as past its deadline and refund it, unless it is final already. The node
        a `wait` request waits on does this at the deadline when the message's dispatcher has
        stalled, so the answer is on time instead of after the takeover. Unfenced: whoever
        recorded an outcome first wins (a stalled owner's late one finds the row final, as the
        taker's would have). Like any outcome its waiter hears of it once committed."""
        outcome = expired(msgspec.structs.replace(sms, fence=None), self.clock())
        await self.writer.ref.tell(RecordOutcome(outcome))

    def wait_for(self, message_id: str) -> Reply[Settled]:
        """A slot that gets the message's outcome once it is committed, by whichever node
        dispatched it; call before the message is accepted, and `forget_wait` after."""
        reply: Reply[Settled] = Reply()
        self.waiters[message_id] = reply
        return reply

    def forget_wait(self, message_id: str) -> None:
        self.waiters.pop(message_id, None)
        self.told.pop(message_id, None)

    def told_outcome(self, message_id: str) -> Settled | None:
        """What an operator did with a waited-for message dispatched here, told to the writer
        and not yet committed: the answer at the deadline when the store is slow or down (the
        commit follows; the message's status is what the operator said). Only an operator's
        own answer counts: a failure decided here (an expiry) might still lose to another
        node's outcome at the commit."""
        return self.told.get(message_id)

    def _express_told(self, outcome: Outcome) -> None:
        if outcome.operator is not None and outcome.sms.id in self.waiters:
            self.told[outcome.sms.id] = Settled.of(outcome)

    def _outcomes_committed(self, outcomes: Sequence[Outcome]) -> None:
        if self.waiters:
            for outcome in outcomes:
                reply = self.waiters.pop(outcome.sms.id, None)
                if reply is not None:
                    reply.set(Settled.of(outcome))

    def _settled_elsewhere(self, body: str) -> None:
        """Express outcomes another node committed (its store NOTIFYs every node): the ones
        this node's requests wait for. No query: the notification carries the outcome."""
        if not self.waiters:
            return
        try:
            settled = _settled_decoder.decode(body)
        except msgspec.DecodeError:
            return
        for item in settled:
            reply = self.waiters.pop(item.id, None)
            if reply is not None:
                reply.set(item)

    def _account_changed(self, body: str) -> None:
        try:
            changed = _changed_decoder.decode(body)
        except msgspec.DecodeError:
            return
        self.learn_settings(changed.id, changed.settings)
        for listener in self.account_listeners:
            listener(changed.id)

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
