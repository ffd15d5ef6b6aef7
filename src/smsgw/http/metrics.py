"""GET /metrics: the node's figures in the Prometheus text format, read at scrape time.

The engine keeps plain counters and fixed-bucket histograms (no metrics library in engine/);
`NodeCollector` turns them into metric families only when Prometheus asks, so the hot paths
pay a dict increment, never a lock or a label lookup.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from smsgw.engine.breaker import BreakerState
from smsgw.engine.histogram import Histogram
from smsgw.engine.node import Engine
from smsgw.http.context import Gateway
from smsgw.http.observe import HttpStats


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [
        ("+Inf" if math.isinf(bound) else repr(bound), count)
        for bound, count in histogram.cumulative()
    ]


def _reason_label(reason: str) -> str:
    # Reasons such as "operator_error: 3 results for 4 messages" carry figures after the
    # colon; the label keeps the kind only, so label values stay few.
    return reason.split(":", 1)[0] if reason else ""


@runtime_checkable
class TimedDatabase(Protocol):
    """What /metrics reads of a store's database (storage's `Database`, the store's `db`): the
    time of each kind of round trip by name, and how many took longer than `slow_after`."""

    durations: dict[str, Histogram]
    slow: dict[str, int]
    slow_after: float


class NodeCollector(Collector):
    """Everything one node knows about itself: HTTP, credit, dispatch, operators, actors."""

    def __init__(self, gateway: Gateway, http: HttpStats) -> None:
        self._gateway = gateway
        self._http = http

    def collect(self) -> Iterator[Metric]:
        yield from self._http_metrics()
        engine = self._gateway.engine
        yield from self._credit(engine)
        yield from self._dispatch(engine)
        yield from self._admission(engine)
        yield from self._operators(engine)
        yield from self._writer(engine)
        yield from self._store()
        yield from self._delivery(engine)
        yield from self._actors(engine)

    def _http_metrics(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "smsgw_http_requests",
            "HTTP requests answered, by route, method, status and problem code",
            labels=["route", "method", "status", "code"],
        )
        for (route, method, status, code), n in list(self._http.requests.items()):
            requests.add_metric([route, method, str(status), code], n)
        yield requests
        durations = HistogramMetricFamily(
            "smsgw_http_request_duration_seconds",
            "Time to answer a request in the app, by route and method (accept latency:"
            ' route="/v1/messages" and "/v1/messages/batch", method="POST")',
            labels=["route", "method"],
        )
        for (route, method), histogram in list(self._http.durations.items()):
            durations.add_metric([route, method], _buckets(histogram), histogram.sum)
        yield durations
        limited = CounterMetricFamily(
            "smsgw_rate_limited_requests",
            "Requests refused by the per-account request rate limit (429)",
        )
        limited.add_metric([], self._gateway.limiter.limited)
        yield limited

    def _credit(self, engine: Engine) -> Iterator[Metric]:
        writer = engine.writer.figures
        accepted = CounterMetricFamily(
            "smsgw_messages_accepted",
            "Messages whose credit hold and row were committed (202)",
        )
        accepted.add_metric([], writer.credit["held_messages"])
        yield accepted
        refused = CounterMetricFamily(
            "smsgw_messages_refused",
            "Messages refused by the store's credit check, by reason (402 and the like)",
            labels=["reason"],
        )
        for reason, n in writer.refused.items():
            refused.add_metric([reason], n)
        yield refused
        amounts = CounterMetricFamily(
            "smsgw_credit_amount",
            "Credit moved, in the smallest currency unit, by kind (held, captured, released,"
            " topped_up)",
            labels=["kind"],
        )
        for kind, key in (
            ("held", "held_amount"),
            ("captured", "captured_amount"),
            ("released", "released_amount"),
            ("topped_up", "topup_amount"),
        ):
            amounts.add_metric([kind], writer.credit[key])
        yield amounts

    def _dispatch(self, engine: Engine) -> Iterator[Metric]:
        figures = engine.scheduler.figures
        depth = GaugeMetricFamily(
            "smsgw_queue_depth", "Messages waiting for dispatch, by lane", labels=["lane"]
        )
        depth.add_metric(["express"], figures.express_waiting)
        depth.add_metric(["bulk"], figures.bulk_waiting)
        yield depth
        accounts = GaugeMetricFamily(
            "smsgw_queue_accounts", "Accounts with bulk messages waiting for dispatch"
        )
        accounts.add_metric([], figures.active_accounts)
        yield accounts
        dispatched = CounterMetricFamily(
            "smsgw_dispatched_messages", "Messages handed to the provider pool"
        )
        dispatched.add_metric([], figures.dispatched)
        yield dispatched
        misses = CounterMetricFamily(
            "smsgw_express_deadline_misses",
            "Express messages failed (and refunded) because their deadline passed, waiting or"
            " at an operator",
        )
        misses.add_metric([], engine.deadline_misses())
        yield misses
        retry = engine.retry.stats()
        waiting = GaugeMetricFamily(
            "smsgw_retry_waiting", "Messages waiting for their retry backoff to pass"
        )
        waiting.add_metric([], retry.get("waiting", 0))
        yield waiting
        if engine.leases is not None:
            swept = CounterMetricFamily(
                "smsgw_stranded_messages_recovered",
                "Committed messages of this node's shards that nothing here held any more,"
                " found by the periodic sweep and dispatched (each one a lost in-memory path)",
            )
            swept.add_metric([], engine.leases.counts["swept"])
            yield swept

    def _admission(self, engine: Engine) -> Iterator[Metric]:
        admission = engine.admission
        bounds = GaugeMetricFamily(
            "smsgw_admission_backlog_bound",
            "Bulk messages accepted and not yet dispatched past which sends are refused, by"
            " scope (account: 429, node: 503)",
            labels=["scope"],
        )
        bounds.add_metric(["account"], admission.config.account_backlog)
        bounds.add_metric(["node"], admission.config.node_backlog)
        yield bounds
        refused = CounterMetricFamily(
            "smsgw_admission_refused",
            "Sends (a batch counts once) refused because a backlog was past its bound, by"
            " scope (account: 429, node: 503)",
            labels=["scope"],
        )
        refused.add_metric(["account"], admission.refused_account)
        refused.add_metric(["node"], admission.refused_node)
        yield refused
        bodies = admission.bodies
        held = GaugeMetricFamily(
            "smsgw_request_body_bytes", "Bytes of request bodies the node holds now"
        )
        held.add_metric([], bodies.held)
        yield held
        bound = GaugeMetricFamily(
            "smsgw_request_body_bytes_bound",
            "Bytes of request bodies the node holds at most; past it, requests get 503",
        )
        bound.add_metric([], bodies.bound)
        yield bound
        turned_away = CounterMetricFamily(
            "smsgw_request_bodies_refused",
            "Requests answered 503 unread because their body did not fit in the node's budget",
        )
        turned_away.add_metric([], bodies.refused)
        yield turned_away

    def _operators(self, engine: Engine) -> Iterator[Metric]:
        pool = engine.pool
        inflight = GaugeMetricFamily("smsgw_inflight_messages", "Messages at an operator now")
        inflight.add_metric([], pool.figures.inflight)
        yield inflight
        window = GaugeMetricFamily("smsgw_window_size", "How many messages may be in flight")
        window.add_metric([], engine.scheduler.figures.window)
        yield window
        attempts = CounterMetricFamily(
            "smsgw_operator_attempts",
            "Send attempts by operator and result (sent, temporary, permanent)",
            labels=["operator", "result"],
        )
        for (operator, result), n in list(pool.attempts.items()):
            attempts.add_metric([operator, result], n)
        yield attempts
        outcomes: dict[tuple[str, str, str], int] = {}
        for (operator, status, reason), n in list(pool.outcomes.items()):
            key = (operator, status, _reason_label(reason))
            outcomes[key] = outcomes.get(key, 0) + n
        finished = CounterMetricFamily(
            "smsgw_messages_finished",
            "Messages that reached a final state at an operator, by operator, status (sent,"
            " failed) and reason",
            labels=["operator", "status", "reason"],
        )
        for (operator, status, reason), n in outcomes.items():
            finished.add_metric([operator, status, reason], n)
        yield finished
        latency = HistogramMetricFamily(
            "smsgw_accept_to_sent_seconds",
            "Time from accept to the operator's `sent`, retries included",
        )
        latency.add_metric([], _buckets(pool.accept_to_sent), pool.accept_to_sent.sum)
        yield latency
        yield from self._breakers(engine)

    def _breakers(self, engine: Engine) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "smsgw_operator_breaker_state",
            "Each operator's circuit breaker: 1 for its current state (closed, open, half_open)",
            labels=["operator", "state"],
        )
        opens = CounterMetricFamily(
            "smsgw_operator_breaker_opens",
            "Times each operator's breaker opened",
            labels=["operator"],
        )
        inflight = GaugeMetricFamily(
            "smsgw_operator_inflight_messages", "Messages at each operator now", labels=["operator"]
        )
        for name, current, opened, at_operator in engine.pool.breakers():
            for each in BreakerState:
                state.add_metric([name, str(each)], float(each is current))
            opens.add_metric([name], opened)
            inflight.add_metric([name], at_operator)
        yield state
        yield opens
        yield inflight

    def _writer(self, engine: Engine) -> Iterator[Metric]:
        writer = engine.writer
        groups = CounterMetricFamily(
            "smsgw_group_commits", "Group commits, by result", labels=["result"]
        )
        groups.add_metric(["ok"], writer.figures.groups)
        groups.add_metric(["failed"], writer.figures.failed_groups)
        yield groups
        # The histograms are the writer's instruments, observed on its loop and read here.
        rows = HistogramMetricFamily(
            "smsgw_group_commit_rows", "Rows (messages, outcomes, top-ups) per committed group"
        )
        rows.add_metric([], _buckets(writer.group_rows), writer.group_rows.sum)
        yield rows
        seconds = HistogramMetricFamily(
            "smsgw_group_commit_seconds", "Time one group commit took in PostgreSQL"
        )
        seconds.add_metric([], _buckets(writer.commit_seconds), writer.commit_seconds.sum)
        yield seconds

    def _delivery(self, engine: Engine) -> Iterator[Metric]:
        writer = engine.writer.figures
        reports = CounterMetricFamily(
            "smsgw_delivery_reports",
            "Delivery reports (DLRs) committed, by operator and result (applied, duplicate,"
            " conflict, unknown)",
            labels=["operator", "result"],
        )
        for (operator, result), n in writer.deliveries.items():
            reports.add_metric([operator, result], n)
        yield reports
        moved = CounterMetricFamily(
            "smsgw_messages_delivery_status",
            "Messages moved from sent by a DLR, by new status (delivered, undelivered)",
            labels=["status"],
        )
        for status in ("delivered", "undelivered"):
            moved.add_metric([status], writer.delivered.get(status, 0))
        yield moved
        if engine.reconciler is not None:
            late = CounterMetricFamily(
                "smsgw_delivery_reports_late_applied",
                "Kept `unknown` DLRs applied once their message reached `sent`",
            )
            late.add_metric([], engine.reconciler.applied)
            yield late
        sender = engine.callbacks
        if sender is None:
            return
        callbacks = CounterMetricFamily(
            "smsgw_callbacks",
            "Status callback attempts settled, by result (delivered, retried, given_up)",
            labels=["result"],
        )
        for result in ("delivered", "retried", "given_up"):
            callbacks.add_metric([result], sender.counts[result])
        yield callbacks
        refused = CounterMetricFamily(
            "smsgw_callbacks_refused",
            "Status callbacks given up at once because their host is or resolves to an address"
            " callbacks must not reach (counted in given_up too)",
        )
        refused.add_metric([], sender.counts["refused"])
        yield refused
        in_flight = GaugeMetricFamily("smsgw_callbacks_in_flight", "Callbacks being POSTed now")
        in_flight.add_metric([], sender.stats()["in_flight"])
        yield in_flight

    def _store(self) -> Iterator[Metric]:
        db = getattr(self._gateway.reads, "db", None)
        if not isinstance(db, TimedDatabase):
            return  # a store without a database (the simulation's MemStore)
        seconds = HistogramMetricFamily(
            "smsgw_store_statement_seconds",
            "Time of each kind of PostgreSQL round trip on its connection, by statement (the"
            " store method that ran it)",
            labels=["statement"],
        )
        for name, histogram in list(db.durations.items()):
            seconds.add_metric([name], _buckets(histogram), histogram.sum)
        yield seconds
        slow = CounterMetricFamily(
            "smsgw_store_slow_statements",
            "PostgreSQL round trips that took longer than"
            " smsgw_store_slow_statement_threshold_seconds, by statement (each one is logged as"
            " a warning)",
            labels=["statement"],
        )
        for name, n in list(db.slow.items()):
            slow.add_metric([name], n)
        yield slow
        threshold = GaugeMetricFamily(
            "smsgw_store_slow_statement_threshold_seconds",
            "A PostgreSQL round trip longer than this is counted and logged as slow",
        )
        threshold.add_metric([], db.slow_after)
        yield threshold

    def _actors(self, engine: Engine) -> Iterator[Metric]:
        supervisor = engine.supervisor
        if supervisor is None:
            return
        status = supervisor.status()
        restarts = CounterMetricFamily(
            "smsgw_actor_restarts", "Restarts of each supervised actor", labels=["actor"]
        )
        up = GaugeMetricFamily(
            "smsgw_actor_up", "1 while the actor runs, 0 otherwise", labels=["actor", "state"]
        )
        depth = GaugeMetricFamily(
            "smsgw_actor_inbox_depth", "Messages waiting in an actor's inbox", labels=["actor"]
        )
        capacity = GaugeMetricFamily(
            "smsgw_actor_inbox_capacity", "Size of an actor's bounded inbox", labels=["actor"]
        )
        for child in status.children:
            restarts.add_metric([child.name], child.restarts)
            up.add_metric([child.name, child.state], 1 if child.state == "running" else 0)
            if child.inbox_depth is not None and child.inbox_capacity is not None:
                depth.add_metric([child.name], child.inbox_depth)
                capacity.add_metric([child.name], child.inbox_capacity)
        yield from (restarts, up, depth, capacity)


def registry(gateway: Gateway, http: HttpStats) -> CollectorRegistry:
    """A registry of this app's own (not the process-global one: tests run several nodes in
    one process), with the process figures (CPU, memory, open files) as well."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(gateway, http))
    ProcessCollector(registry=reg)
    return reg
