"""Virtual-time runs: the real engine and simulated operators under trio's MockClock, seeded.

One process, one trio run with `MockClock(autojump_threshold=0)`: whenever every task waits,
the clock jumps to the next deadline, so a day of traffic takes as long as its work, not its
hours. The engine is the real one (`Engine`: StoreWriter, Scheduler, ProviderPool,
RetryTimer, ShardLeases, their credit and retry rules), wired to `MemCluster` (one node's
leases) and `MemStore` (the MessageStore in memory:
see its docstring for why and what that does and does not prove) and to `SimulatedOperator`s.

Cohorts. A Python process moves a few hundred thousand messages a second through the engine's
actors at best, far from the 100M of a day in minutes. So the load comes in cohorts: per
`tick_s` of the scenario, each account's messages of that tick are split into cohorts of at
most `max_cohort`, and a cohort is one engine item (an `OutboundSms` of `segments` = its size,
priced as that many one-segment messages) accepted at one instant drawn in the tick. The
scheduler, the pool window, the operators' caps (in segments), retries, the CreditBook and the
store all run per item; an operator's answer applies to the whole cohort. Every figure in the
report counts messages (an item weighs its size). With `max_cohort` 1 each item is one message.

Determinism: the load comes from a seeded numpy generator, operators and the pool from seeded
`random.Random`s, store commit times carry a seeded jitter so no two deadlines tie, and trio's
own scheduling shuffle (a module-level `random.Random` in `trio._core._run`, private) is
seeded too. The same scenario and seed give the same report, `run` (wall time) aside.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import trio
import trio.testing

from smsgw.engine.actor import InboxFull, Reply
from smsgw.engine.messages import Accept, AcceptResult, OutboundSms, Outcome
from smsgw.engine.node import Engine, EngineConfig
from smsgw.engine.ports import Provider
from smsgw.engine.scheduled import ScheduledConfig
from smsgw.engine.shards import LeaseConfig
from smsgw.sim.memcluster import MemCluster
from smsgw.sim.memstore import MemStore, weight
from smsgw.sim.operator import CountingProvider, SimulatedOperator
from smsgw.simulate.report import (
    Bucket,
    CreditCheck,
    FairnessRow,
    Live,
    RunInfo,
    SimReport,
    WaitHistogram,
    fairness_groups,
    judge,
    outages_of,
    utc_now,
)
from smsgw.simulate.scenarios import Scenario

# Virtual runs start at midnight UTC of a fixed day, so "12:00" in a scenario is noon.
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NORMAL_PRICE = 5
EXPRESS_PRICE = 7
EXPRESS_DEADLINE_S = 2.0
DRAIN_LIMIT_S = 6 * 3600.0  # virtual time allowed after the load for the backlog to clear
TIMELINE_BUCKETS = 288
# Lease timings for a node alone in virtual time (see `_main`); no sweep: MemStore's messages
# cannot strand outside the engine's actors.
VIRTUAL_LEASES = LeaseConfig(ttl=600.0, tick=120.0, poll=120.0, sweep=0.0, share_tick=120.0)


def seed_trio_scheduler(seed: int) -> None:
    """Seed the generator trio uses to shuffle each batch of runnable tasks (private API: if a
    trio release moves it, runs stay correct but may no longer repeat exactly)."""
    from trio._core import _run

    generator = getattr(_run, "_r", None)
    if isinstance(generator, random.Random):
        generator.seed(seed)


class _AcceptReply(Reply[list[AcceptResult]]):
    """The reply to one Accept; tells the run when it is answered (no task per request)."""

    __slots__ = ("_run", "_sent_at", "_sms")

    def __init__(self, run: VirtualRun, sms: OutboundSms, sent_at: float) -> None:
        super().__init__()
        self._run = run
        self._sms = sms
        self._sent_at = sent_at

    def set(self, value: list[AcceptResult]) -> None:
        if not self.done:
            super().set(value)
            self._run.on_answer(self._sms, self._sent_at, value[0])

    def fail(self, error: BaseException) -> None:
        if not self.done:
            super().fail(error)
            self._run.refused(self._sms, "store_unavailable")


class VirtualRun:
    """One scenario in virtual time; `run()` returns its report."""

    def __init__(self, scenario: Scenario, *, live: bool = True) -> None:
        self.s = scenario
        self.live_enabled = live
        self.rng = np.random.default_rng(scenario.seed)
        self.store = MemStore(seed=scenario.seed, observer=self.observe)
        self.t0 = 0.0
        self.bucket_s = max(1.0, scenario.duration_s / TIMELINE_BUCKETS)
        self.timeline: list[Bucket] = []
        self.ops: dict[str, dict[str, int]] = {}
        # Tallies in messages.
        self.offered = 0
        self.items = 0
        self.accepted = 0
        self.answered = 0  # accepted or refused
        self.finished = 0
        self.refusals: dict[str, int] = {}
        self.sent = 0
        self.failures: dict[str, int] = {}
        self.express_accepted = 0
        self.express_late = 0  # sent after its deadline, or failed deadline_exceeded
        self.accept_wait = WaitHistogram()
        self.to_sent = WaitHistogram()
        self.express_to_sent = WaitHistogram()
        groups = fairness_groups(scenario)
        self.group_names = [name for name, _ in groups]
        self.group_of_rank = np.zeros(scenario.accounts, dtype=np.int64)
        for index, (_, ranks) in enumerate(groups):
            self.group_of_rank[ranks.start : ranks.stop] = index
        self.group_waits = [WaitHistogram() for _ in groups]
        self.group_accounts = [len(ranks) for _, ranks in groups]
        self.flood_light_waits = WaitHistogram()  # whale: light accounts, during the flood
        self.engine: Engine | None = None
        self.load_done = False
        self.drained: trio.Event | None = None

    def _check_drained(self) -> None:
        if (
            self.load_done
            and self.answered >= self.offered
            and self.finished >= self.accepted
            and self.drained is not None
        ):
            self.drained.set()

    # --- clock ------------------------------------------------------------------------

    def now(self) -> float:
        """Wall-clock-shaped time for the engine: EPOCH + virtual seconds since the start."""
        return EPOCH + trio.current_time() - self.t0

    def elapsed(self) -> float:
        return trio.current_time() - self.t0

    def bucket(self) -> Bucket:
        index = int(self.elapsed() // self.bucket_s)
        while len(self.timeline) <= index:
            self.timeline.append(Bucket(t_s=len(self.timeline) * self.bucket_s, operators={}))
        return self.timeline[index]

    # --- callbacks from the engine's side ------------------------------------------------

    def on_answer(self, sms: OutboundSms, sent_at: float, result: AcceptResult) -> None:
        n = weight(sms)
        if result.accepted:
            self.answered += n
            self.accepted += n
            if sms.express:
                self.express_accepted += n
            self.bucket().accepted += n
            self.accept_wait.add(self.now() - sent_at, n)
        else:
            self.refused(sms, result.reason or "refused")
        self._check_drained()

    def refused(self, sms: OutboundSms, reason: str) -> None:
        n = weight(sms)
        self.answered += n
        self.refusals[reason] = self.refusals.get(reason, 0) + n
        self.bucket().refused += n
        self._check_drained()

    def observe(self, stored: Sequence[OutboundSms], finished: Sequence[Outcome]) -> None:
        bucket = self.bucket()
        whale = self.s.whale
        for outcome in finished:
            sms = outcome.sms
            n = weight(sms)
            self.finished += n
            wait = outcome.at - sms.created_at
            if outcome.status == "sent":
                self.sent += n
                bucket.sent += n
                self.to_sent.add(wait, n)
                rank = sms.account_id - 1
                self.group_waits[int(self.group_of_rank[rank])].add(wait, n)
                if sms.express:
                    self.express_to_sent.add(wait, n)
                    if sms.deadline is not None and outcome.at > sms.deadline:
                        self.express_late += n
                if (
                    whale is not None
                    and rank != 0
                    and whale.start_s <= sms.created_at - EPOCH < whale.end_s
                ):
                    self.flood_light_waits.add(wait, n)
            else:
                reason = outcome.reason or "failed"
                self.failures[reason] = self.failures.get(reason, 0) + n
                bucket.failed += n
                if sms.express and reason == "deadline_exceeded":
                    self.express_late += n
        self._check_drained()

    def count_attempts(self, operator: str, kind: str, n: int) -> None:
        per_bucket = self.bucket().operators.setdefault(operator, {})
        per_bucket[kind] = per_bucket.get(kind, 0) + n
        total = self.ops.setdefault(operator, {})
        total[kind] = total.get(kind, 0) + n

    # --- the run ------------------------------------------------------------------------

    def _setup_accounts(self) -> None:
        s = self.s
        weights = s.zipf_weights()
        average_price = NORMAL_PRICE * (1 - s.express_share) + EXPRESS_PRICE * s.express_share
        for rank, w in enumerate(weights):
            expected = s.messages_without_whale * w
            if rank == 0 and s.whale is not None:
                expected += s.whale.messages
            credit = s.credit_per_account or max(
                100, math.ceil(expected * average_price * s.credit_factor)
            )
            self.store.add_account(f"sim-{rank}", credit)

    async def _load(self) -> None:
        s = self.s
        engine = self.engine
        assert engine is not None
        writer = engine.writer.ref
        weights = np.asarray(s.zipf_weights(), dtype=np.float64)
        ticks = math.ceil(s.duration_s / s.tick_s)
        carry = 0.0
        whale_carry = 0.0
        remaining = s.messages_without_whale
        whale_remaining = s.whale.messages if s.whale else 0
        seq = 0
        for k in range(ticks):
            start = k * s.tick_s
            end = min(s.duration_s, start + s.tick_s)
            last = k == ticks - 1
            expected = s.expected_load(start, end) + carry
            n = remaining if last else min(remaining, int(expected))
            carry = expected - n
            remaining -= n
            counts = self.rng.multinomial(n, weights) if n else np.zeros(s.accounts, np.int64)
            if s.whale is not None:
                w = s.whale
                overlap = max(0.0, min(end, w.end_s) - max(start, w.start_s))
                whale_expected = w.messages * overlap / (w.end_s - w.start_s) + whale_carry
                whale_n = whale_remaining if last else min(whale_remaining, int(whale_expected))
                whale_carry = whale_expected - whale_n
                whale_remaining -= whale_n
                counts[0] += whale_n
            express = self.rng.binomial(counts, s.express_share)
            bulk = counts - express
            cohorts = _cohorts(bulk, express, s.max_cohort)
            if not cohorts[0].size:
                continue
            ranks, sizes, is_express = cohorts
            # Arrivals land on a grid of `arrival_step_s`: the engine then handles each
            # step's items together (one group commit, full operator batches), as it does
            # under real load, instead of one scheduling pass per item.
            step = s.arrival_step
            slots = np.floor(self.rng.random(ranks.size) * ((end - start) / step))
            times = start + slots * step
            order = np.argsort(times, kind="stable")
            for i in order.tolist():
                at = float(times[i])
                if at > self.elapsed():
                    await trio.sleep_until(self.t0 + at)
                size = int(sizes[i])
                express_item = bool(is_express[i])
                seq += 1
                created = self.now()
                sms = OutboundSms(
                    id=f"v{seq:012d}",
                    account_id=int(ranks[i]) + 1,
                    to="+4915100000000",
                    sender="SMSGW",
                    text="sim",
                    segments=size,
                    price=size * (EXPRESS_PRICE if express_item else NORMAL_PRICE),
                    express=express_item,
                    created_at=created,
                    deadline=created + EXPRESS_DEADLINE_S if express_item else None,
                )
                self.offered += size
                self.items += 1
                try:
                    writer.tell_nowait(Accept((sms,), False, _AcceptReply(self, sms, created)))
                except InboxFull:
                    self.refused(sms, "overloaded")

    async def _monitor(self, live: Live | None, done: trio.Event) -> None:
        """Close a timeline bucket every `bucket_s`: the backlog, and the live summary. It
        counts buckets itself: deriving the next one from the clock could, by float rounding,
        sleep until a time already past and spin."""
        k = 1
        while not done.is_set():
            await trio.sleep_until(self.t0 + k * self.bucket_s)
            while len(self.timeline) <= k:
                self.timeline.append(Bucket(t_s=len(self.timeline) * self.bucket_s, operators={}))
            self.timeline[k - 1].backlog = self.accepted - self.finished
            k += 1
            if live is not None:
                t = self.elapsed()
                live.update(
                    self.finished,
                    f"t={int(t // 3600):02d}:{int(t % 3600 // 60):02d} virtual"
                    f"  backlog {self.accepted - self.finished:,}"
                    f"  sent {self.sent:,}",
                )

    async def _main(self) -> None:
        s = self.s
        self.t0 = trio.current_time()
        self._setup_accounts()
        providers: list[tuple[Provider, int]] = []
        for profile, w in zip(s.operators, s.weights, strict=True):
            operator = SimulatedOperator(profile, remember=100_000, origin=self.t0)
            providers.append((CountingProvider(operator, self.count_attempts), w))
        config = EngineConfig(
            # The window counts segments, and an item weighs its cohort's messages: 2,000
            # messages in flight, as in a real node.
            window=2_000,
            express_deadline_ms=int(EXPRESS_DEADLINE_S * 1000),
            scheduler_capacity=1_000_000,
            writer_capacity=1_000_000,
            # Scheduled sends wake at the send_at of each one the node accepts; the poll is
            # for other nodes' accepts, and a virtual node is alone.
            scheduled=ScheduledConfig(poll=120.0),
        )
        # The node leases its shards as `serve`'s do (its sends are fenced and admitted, its
        # recovery is theirs), at a pace a day of virtual time can afford: alone, it never
        # loses a lease, so the heartbeat's rate changes nothing else.
        self.engine = Engine(
            self.store,
            providers,
            config,
            clock=self.now,
            seed=s.seed,
            cluster=MemCluster(self.store),
            leases=VIRTUAL_LEASES,
            lease_clock=trio.current_time,
        )
        self.drained = trio.Event()
        live = Live(f"simulate {s.name}", s.messages) if self.live_enabled else None
        done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.engine.run)
                await self.engine.ready.wait()
                nursery.start_soon(self._monitor, live, done)
                await self._load()
                with trio.move_on_after(DRAIN_LIMIT_S):
                    # By the run's own tallies: every item answered, every accepted message
                    # final (an actor may hold a message it took from its inbox).
                    self.load_done = True
                    self._check_drained()
                    await self.drained.wait()
                self.bucket()  # the timeline reaches the end of the drain
                self.timeline[-1].backlog = self.accepted - self.finished
                done.set()
                nursery.cancel_scope.cancel()
        finally:
            if live is not None:
                live.close(
                    self.finished, f"sent {self.sent:,}  failed {self.finished - self.sent:,}"
                )

    def run(self) -> SimReport:
        started = time.perf_counter()
        started_at = utc_now()
        seed_trio_scheduler(self.s.seed)
        clock = trio.testing.MockClock(autojump_threshold=0)
        trio.run(self._main, clock=clock)
        return self.report(time.perf_counter() - started, started_at)

    # --- the report -------------------------------------------------------------------

    def _credit(self) -> CreditCheck:
        broken = self.store.broken_accounts()
        credits = self.store.credit.values()
        return CreditCheck(
            accounts=len(self.store.credit),
            matching=len(self.store.credit) - len(broken),
            topped_up=sum(c.topped_up for c in credits),
            captured=sum(c.captured for c in credits),
            held=sum(c.held for c in credits),
            refunded=sum(x.release for x in self.store.ledger.values()),
            balance=sum(c.balance for c in credits),
            broken={str(a): b for a, b in list(broken.items())[:20]},
        )

    def report(self, wall_s: float, started_at: str) -> SimReport:
        s = self.s
        credit = self._credit()
        not_final = sum(weight(m) for m in self.store.pending_messages.values())
        stored_final = sum(self.store.final.values())
        lost = self.accepted - stored_final - not_final
        failed_total = sum(self.failures.values())
        totals: dict[str, int] = {
            "offered": self.offered,
            "accepted": self.accepted,
            **{f"refused: {k}": v for k, v in sorted(self.refusals.items())},
            "sent": self.sent,
            "failed": failed_total,
            **{f"failed: {k}": v for k, v in sorted(self.failures.items())},
            "not_final": not_final,
            "lost": lost,
        }
        fairness = [
            FairnessRow(name, accounts, hist.count, hist.summary())
            for name, accounts, hist in zip(
                self.group_names, self.group_accounts, self.group_waits, strict=True
            )
        ]
        figures: dict[str, float] = {
            "lost": lost,
            "not_final": not_final,
            "credit_mismatches": credit.accounts - credit.matching,
            "success_rate": round(self.accepted / self.offered, 6) if self.offered else 0.0,
            "sent_share": round(self.sent / self.accepted, 6) if self.accepted else 0.0,
            "express_within_deadline": (
                round(1 - self.express_late / self.express_accepted, 6)
                if self.express_accepted
                else 1.0
            ),
            "accept_p99_s": self.accept_wait.quantile(0.99),
            "to_sent_p95_s": self.to_sent.quantile(0.95),
            "express_p99_s": self.express_to_sent.quantile(0.99),
        }
        waits = [f.wait.p95_s for f in fairness if f.messages]
        if len(waits) >= 2 and waits[0] > 0:
            figures["fairness_p95_ratio"] = round(waits[-1] / waits[0], 4)
        if s.whale is not None:
            figures["light_p95_wait_s"] = self.flood_light_waits.quantile(0.95)
        targets = judge(s.targets, figures)
        cohort_note = (
            f"Virtual time, {self.items:,} engine items for {self.offered:,} messages"
            f" (cohorts of up to {s.max_cohort} messages of one account per {s.tick_s:g} s"
            " tick; see smsgw/simulate/virtual.py)."
            if s.max_cohort > 1
            else f"Virtual time, one engine item per message ({self.items:,})."
        )
        return SimReport(
            scenario=s.name,
            description=s.description,
            mode="virtual",
            scale=s.scale,
            seed=s.seed,
            duration_s=s.duration_s,
            offered=self.offered,
            totals=totals,
            figures=figures,
            latency={
                "accept": self.accept_wait.summary(),
                "accept_to_sent": self.to_sent.summary(),
                "express_to_sent": self.express_to_sent.summary(),
            },
            cdf={
                "accept": self.accept_wait.cdf(),
                "accept to sent": self.to_sent.cdf(),
                "express to sent": self.express_to_sent.cdf(),
            },
            bucket_s=self.bucket_s,
            timeline=self.timeline,
            fairness=fairness,
            operators=self.ops,
            credit=credit,
            targets=targets,
            passed=all(t.passed for t in targets),
            outages=outages_of(s.operators),
            run=RunInfo(
                wall_s=round(wall_s, 2),
                cpu_count=os.cpu_count(),
                started_at=started_at,
                items=self.items,
                commits=self.store.commits,
                note=cohort_note,
            ),
        )


def _cohorts(
    bulk: np.ndarray[Any, Any], express: np.ndarray[Any, Any], max_cohort: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(account rank, size, express) of each cohort: every account's count split into
    ceil(count / max_cohort) near-equal parts."""
    ranks_out = []
    sizes_out = []
    flags_out = []
    for counts, flag in ((bulk, False), (express, True)):
        ranks = np.nonzero(counts)[0]
        if not ranks.size:
            continue
        n = counts[ranks]
        parts = -(-n // max_cohort)  # ceil
        rank_rep = np.repeat(ranks, parts)
        n_rep = np.repeat(n, parts)
        parts_rep = np.repeat(parts, parts)
        # Index of each part within its account: 0..parts-1.
        first = np.repeat(np.cumsum(parts) - parts, parts)
        index = np.arange(rank_rep.size) - first
        sizes = n_rep // parts_rep + (index < n_rep % parts_rep)
        ranks_out.append(rank_rep)
        sizes_out.append(sizes)
        flags_out.append(np.full(rank_rep.size, flag))
    if not ranks_out:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=bool)
    return np.concatenate(ranks_out), np.concatenate(sizes_out), np.concatenate(flags_out)


def run_virtual(scenario: Scenario, *, live: bool = True) -> SimReport:
    return VirtualRun(scenario, live=live).run()
