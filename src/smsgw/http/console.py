"""The ops console's figures: one snapshot of a node (GET /v1/ops/console) and its wire Structs.

The page at GET /ops polls this once a second. One request carries everything the page draws,
built from the snapshots the actors already publish (`Supervisor.status`, the pool's and the
scheduler's figures): a second's poll costs one status walk, not one per panel. The rates are
cumulative counters; the page keeps the last five minutes of differences itself, so the node
keeps no history for it. The nodes' view is a PostgreSQL query, shared by every open console
for `CLUSTER_TTL_S`.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import trio

from smsgw.engine.node import Engine
from smsgw.engine.ports import SHARDS


class ActorOut(msgspec.Struct):
    """One supervised actor: its state, restarts and last failure, inbox depth and size."""

    name: str
    state: str  # starting, running, restarting, stopped, failed
    restart: str  # permanent, transient, temporary
    restarts: int
    last_failure: str | None
    last_failure_at: float | None  # unix seconds
    inbox_depth: int | None
    inbox_capacity: int | None


class SupervisorOut(msgspec.Struct):
    name: str
    state: str
    restarts: int  # over all actors, since the node started
    max_restarts: int
    within_seconds: float
    actors: list[ActorOut]


class BacklogOut(msgspec.Struct):
    account_id: int
    backlog: int


class SchedulerOut(msgspec.Struct):
    """Messages waiting, by lane: `express` (earliest deadline first), `bulk` (round robin
    over accounts; `bulk_in_store` of them spilled to PostgreSQL), `retrying` (waiting for a
    retry's backoff), `waiting_for_operator` (dispatched, waiting for an operator with room).
    The window: `inflight` of `window` slots in use, `express_inflight` of them express; the
    light reserve (`light_reserve` slots kept for accounts with little backlog) is `kept`
    while such an account has sent in the last few seconds."""

    express: int
    bulk: int
    bulk_in_store: int
    retrying: int
    waiting_for_operator: int
    active_accounts: int
    largest: list[BacklogOut]
    window: int
    inflight: int
    express_inflight: int
    express_reserve: int
    light_reserve: int
    light_reserve_kept: bool
    dispatched: int


class OperatorOut(msgspec.Struct):
    """One operator as this node's pool sees it. `state` is its breaker's; `held_open` says
    why it is drained (POST /v1/ops/operators/{name}/drain) until released. `messages` and
    `throttled_attempts` are cumulative (the page turns them into rates); `error_ratio`,
    `recent_calls` and `timeouts` cover the breaker's window (10 s by default); the latency
    percentiles the last 256 calls' round trips."""

    name: str
    state: str
    state_for_s: float
    held_open: str | None
    weight: int
    inflight: int
    window: int | None  # its own in-flight cap; None: only the pool's window
    max_per_second: float | None  # its throughput cap; None: none
    capped: bool  # the cap holds its calls back now
    messages: int
    batches: int
    throttled_attempts: int
    error_ratio: float
    recent_calls: int
    timeouts: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    opens: int
    last_open_reason: str | None


class CountersOut(msgspec.Struct):
    """Cumulative since this node started: messages accepted (credit held and stored), sent,
    failed, delivery reports committed, status callbacks delivered and given up."""

    accepted: int
    sent: int
    failed: int
    dlrs: int
    callbacks: int
    callbacks_given_up: int


class ConsoleNodeOut(msgspec.Struct):
    id: str
    alive: bool
    heartbeat_age_s: float
    shards: int
    expired_shards: int


class ConsoleClusterOut(msgspec.Struct):
    """The nodes on this database with their heartbeats' ages, and which node leases each of
    the 256 shards (`shard_owners[i]`: a node id; None for a shard nobody leases, or leased
    by a node other than this one when more than one other node holds shards: a node knows
    its own leases and the others' counts). `lease_valid_for_s`: how long this node's leases
    stay trusted without a renewal. `error`: why the nodes' view is missing (PostgreSQL)."""

    node_id: str
    lease_valid_for_s: float
    shards: int
    unowned_shards: int
    nodes: list[ConsoleNodeOut]
    shard_owners: list[str | None]
    error: str | None = None


class ConsoleOut(msgspec.Struct):
    """Everything the ops console (GET /ops) draws, from the node that answered."""

    node_id: str
    at: float  # unix seconds
    ready: bool
    supervisor: SupervisorOut | None  # None while the node starts
    scheduler: SchedulerOut
    operators: list[OperatorOut]
    counters: CountersOut
    cluster: ConsoleClusterOut | None  # None: the node runs alone, without shard leases


class DrainOut(msgspec.Struct):
    """The operator after the change, on the node that made it (`node_id`): a drain holds
    that node's breaker for the operator; each node has its own."""

    node_id: str
    operator: OperatorOut


# How long one PostgreSQL read of the nodes' view serves every console polling this node.
CLUSTER_TTL_S = 1.0
# How long a console's answer waits for that read before it goes without (`cluster.error`).
CLUSTER_TIMEOUT_S = 2.0


class ClusterCache:
    """The nodes' view, read at most once per `CLUSTER_TTL_S` whoever asks (five consoles
    polling each second cost one query a second, not five)."""

    def __init__(self) -> None:
        self._at = -float("inf")
        self._view: dict[str, Any] | None = None
        self._error: str | None = None
        self._lock = trio.Lock()

    async def get(self, engine: Engine) -> tuple[dict[str, Any] | None, str | None]:
        leases = engine.leases
        assert leases is not None
        async with self._lock:
            if trio.current_time() - self._at >= CLUSTER_TTL_S:
                self._error = f"PostgreSQL: no answer within {CLUSTER_TIMEOUT_S:g} s"
                try:
                    # A console is most needed when the database is in trouble: the rest of
                    # the page must not wait on it.
                    with trio.move_on_after(CLUSTER_TIMEOUT_S):
                        self._view = await leases.store.cluster(leases.config.ttl)
                        self._error = None
                except Exception as exc:
                    self._error = f"PostgreSQL: {type(exc).__name__}: {exc}"
                self._at = trio.current_time()
            return self._view, self._error


async def snapshot(engine: Engine, cache: ClusterCache) -> ConsoleOut:
    """One node's figures for the console."""
    pool_stats = engine.pool.stats()
    operators = [
        operator_out(name, figures) for name, figures in pool_stats.get("operators", {}).items()
    ]
    figures = engine.scheduler.figures
    largest = engine.scheduler.largest_backlogs(5)
    sched = SchedulerOut(
        express=figures.express_waiting,
        bulk=figures.bulk_waiting,
        bulk_in_store=figures.bulk_in_store,
        retrying=int(engine.retry.stats().get("waiting", 0)),
        waiting_for_operator=int(pool_stats.get("messages_waiting", 0)),
        active_accounts=figures.active_accounts,
        largest=[BacklogOut(account_id=a, backlog=n) for a, n in largest],
        window=figures.window,
        inflight=figures.inflight,
        express_inflight=figures.express_inflight,
        express_reserve=figures.express_reserve,
        light_reserve=figures.light_reserve,
        light_reserve_kept=engine.clock() < figures.light_reserve_kept_until,
        dispatched=figures.dispatched,
    )
    callbacks = engine.callbacks.counts if engine.callbacks is not None else {}
    pool = engine.pool.figures
    writer = engine.writer.figures
    counters = CountersOut(
        accepted=writer.credit["held_messages"],
        sent=pool.sent,
        failed=pool.failed,
        dlrs=sum(writer.deliveries.values()),
        callbacks=callbacks.get("delivered", 0),
        callbacks_given_up=callbacks.get("given_up", 0),
    )
    cluster = None
    node_id = ""
    if engine.leases is not None:
        node_id = engine.leases.store.node_id
        view, error = await cache.get(engine)
        cluster = _cluster(engine, node_id, view, error)
    return ConsoleOut(
        node_id=node_id,
        at=time.time(),
        ready=engine.ready.is_set(),
        supervisor=_supervisor(engine),
        scheduler=sched,
        operators=operators,
        counters=counters,
        cluster=cluster,
    )


def _supervisor(engine: Engine) -> SupervisorOut | None:
    supervisor = engine.supervisor
    if supervisor is None:
        return None
    status = supervisor.status()
    return SupervisorOut(
        name=status.name,
        state=status.state,
        restarts=supervisor.restarts(),
        max_restarts=status.max_restarts,
        within_seconds=status.within_seconds,
        actors=[
            ActorOut(
                name=c.name,
                state=c.state,
                restart=c.restart,
                restarts=c.restarts,
                last_failure=c.last_failure,
                last_failure_at=c.last_failure_at,
                inbox_depth=c.inbox_depth,
                inbox_capacity=c.inbox_capacity,
            )
            for c in status.children
        ],
    )


def operator_out(name: str, f: dict[str, Any]) -> OperatorOut:
    """An operator's figures in the pool's status (`ProviderPool.stats`) as the console's."""
    return OperatorOut(
        name=name,
        state=f["state"],
        state_for_s=f["state_for_s"],
        held_open=f.get("held_open"),
        weight=f["weight"],
        inflight=f["inflight"],
        window=f["window"],
        max_per_second=f["max_per_second"],
        capped=bool(f.get("capped", False)),
        messages=f["messages"],
        batches=f["batches"],
        throttled_attempts=f.get("throttled_attempts", 0),
        error_ratio=f["recent_error_ratio"],
        recent_calls=f["recent_calls"],
        timeouts=f["recent_timeouts"],
        latency_p50_ms=f.get("latency_p50_ms"),
        latency_p99_ms=f.get("latency_p99_ms"),
        opens=f["opens"],
        last_open_reason=f["last_open_reason"],
    )


def _cluster(
    engine: Engine, node_id: str, view: dict[str, Any] | None, error: str | None
) -> ConsoleClusterOut:
    leases = engine.leases
    assert leases is not None
    owners: list[str | None] = [None] * SHARDS
    own = leases.owned
    for shard in own:
        owners[shard] = node_id
    nodes = []
    unowned = SHARDS - len(own)
    if view is not None:
        unowned = int(view["unowned_shards"])
        nodes = [
            ConsoleNodeOut(
                id=n["id"],
                alive=bool(n["alive"]),
                heartbeat_age_s=float(n["heartbeat_age_s"]),
                shards=int(n["shards"]),
                expired_shards=int(n["expired_shards"]),
            )
            for n in view["nodes"]
        ]
        others = [n for n in nodes if n.id != node_id and n.shards]
        # One other node holds every shard this one does not: the map is known whole.
        if len(others) == 1 and others[0].shards + len(own) + unowned == SHARDS and not unowned:
            owners = [owner if owner is not None else others[0].id for owner in owners]
    return ConsoleClusterOut(
        node_id=node_id,
        lease_valid_for_s=float(leases.stats()["lease_valid_for_s"]),
        shards=SHARDS,
        unowned_shards=unowned,
        nodes=nodes,
        shard_owners=owners,
        error=error,
    )
