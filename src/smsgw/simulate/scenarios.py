"""Named, seeded simulation scenarios: the load, the operators and the targets of each run."""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from smsgw.sim.operator import OperatorProfile

Mode = Literal["virtual", "wall"]
DAY_S = 86_400.0


class Whale(msgspec.Struct, frozen=True):
    """One account (rank 0) that floods: `messages` more, spread evenly over [start, end)."""

    messages: int
    start_s: float
    end_s: float


class Target(msgspec.Struct, frozen=True):
    """A figure the report checks: `metric` names a key of the report's figures; the run
    passes this target when figure `op` value (`<=` or `>=`)."""

    metric: str
    op: Literal["<=", ">="]
    value: float
    label: str


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """One named load: who sends how much when, through which operators, judged by which
    targets. `scaled` makes it smaller (or larger) without changing its shape.

    Load: `messages` in `duration_s` (virtual seconds; a wall-clock run offers them as fast as
    `connections` closed-loop clients get answers), from `accounts` accounts with Zipf weights
    1/rank**zipf (rank 0 the heaviest), `express_share` of them express, shaped by a diurnal
    curve when `diurnal` (trough at 04:00, peak at 16:00, peak/average 1 + `diurnal_amplitude`).

    Virtual time batches messages into cohorts (see smsgw.simulate.virtual): per `tick_s` of load,
    each account's messages in that tick go in at most `max_cohort` messages a cohort, and
    cohorts arrive at instants on a grid of `arrival_step_s` / `scale`.
    """

    name: str
    description: str
    mode: Mode
    messages: int
    accounts: int
    duration_s: float
    zipf: float = 0.0
    express_share: float = 0.05
    diurnal: bool = False
    diurnal_amplitude: float = 0.7
    whale: Whale | None = None
    operators: tuple[OperatorProfile, ...] = (OperatorProfile(name="sim"),)
    weights: tuple[int, ...] = (1,)
    # Credit per account as a multiple of what its expected share of the load costs; below 1
    # some sends are refused with 402 (the smoke run shows that); it never changes `messages`.
    credit_factor: float = 2.0
    credit_per_account: int = 0  # when set, every account gets this much instead
    seed: int = 1
    tick_s: float = 1.0
    max_cohort: int = 1
    # Virtual time: arrivals are on a grid of arrival_step_s / scale (at most tick_s), so a
    # step carries as many messages at every scale: the same bursts, fewer steps when small.
    arrival_step_s: float = 1.0
    connections: int = 32  # wall clock: concurrent clients of the load generator
    checks: bool = False  # wall clock: health, single, express and OTP sends before the load
    targets: tuple[Target, ...] = ()
    scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.operators) != len(self.weights) or not self.operators:
            raise ValueError("one weight per operator, and at least one operator")
        if self.messages < 1 or self.accounts < 1 or self.duration_s <= 0:
            raise ValueError("a scenario needs messages, accounts and a duration")

    def scaled(self, scale: float, *, seed: int | None = None) -> Scenario:
        """The same shape at `scale`: messages, accounts and the whale are multiplied; time,
        shares and the operators are not. Operators keep their capacity on purpose: the
        engine's window (messages in flight) does not scale, and a scaled-down operator would
        time out behind it, which says nothing about the full-size run."""
        if not 0.0 < scale <= 10.0:
            raise ValueError("scale must be in (0, 10]")
        operators = tuple(
            msgspec.structs.replace(
                p,
                seed=p.seed if seed is None else p.seed + 1_000 * (seed - self.seed),
            )
            for p in self.operators
        )
        whale = self.whale
        if whale is not None:
            whale = msgspec.structs.replace(whale, messages=max(1, round(whale.messages * scale)))
        return msgspec.structs.replace(
            self,
            messages=max(1, round(self.messages * scale)),
            accounts=max(min(self.accounts, 10), round(self.accounts * scale)),
            connections=max(1, min(self.connections, round(self.messages * scale))),
            whale=whale,
            operators=operators,
            seed=self.seed if seed is None else seed,
            scale=self.scale * scale,
        )

    def zipf_weights(self) -> list[float]:
        """Each account's share of the (non-whale) load, heaviest first; sums to 1."""
        raw = [(rank + 1) ** -self.zipf for rank in range(self.accounts)]
        total = math.fsum(raw)
        return [w / total for w in raw]

    def expected_load(self, t0: float, t1: float) -> float:
        """Messages (not counting the whale) the scenario offers in [t0, t1): the integral
        of the rate, exact for the diurnal curve."""
        average = self.messages_without_whale / self.duration_s
        if not self.diurnal:
            return average * (t1 - t0)
        w = 2 * math.pi / DAY_S
        phase = 4 * 3600

        def integral(t: float) -> float:
            return t - self.diurnal_amplitude * math.sin(w * (t - phase)) / w

        return average * (integral(t1) - integral(t0))

    @property
    def arrival_step(self) -> float:
        """Virtual seconds between arrival instants at this scale."""
        return min(self.tick_s, self.arrival_step_s / self.scale)

    @property
    def messages_without_whale(self) -> int:
        return self.messages - (self.whale.messages if self.whale else 0)


# --- the scenarios --------------------------------------------------------------------------

_CORRECT = (
    Target("lost", "<=", 0, "no accepted message lost"),
    Target("not_final", "<=", 0, "every accepted message final"),
    Target("credit_mismatches", "<=", 0, "credit reconciles exactly"),
)

SMOKE = Scenario(
    name="smoke",
    description="A quick look: 5,000 single sends from 20 accounts with about 80% of the credit"
    " they need, so some get 402; 5% express.",
    mode="wall",
    messages=5_000,
    accounts=20,
    duration_s=60.0,
    credit_factor=0.8,
    connections=32,
    targets=_CORRECT,
)

PRODUCTION_TEST = Scenario(
    name="production-test",
    description="A production acceptance run: health, one single, one express and one OTP send,"
    " then 100 concurrent clients x 100 messages (10,000), final statuses verified, credit"
    " reconciled.",
    mode="wall",
    messages=10_000,
    accounts=100,
    duration_s=60.0,
    credit_factor=2.0,
    connections=100,
    checks=True,
    targets=(
        *_CORRECT,
        Target("success_rate", ">=", 0.999, "success >= 99.9% (2xx and final)"),
    ),
)

# Three operators with caps that add up to well above the diurnal peak (about 2,000 msg/s).
_DAY_OPERATORS = (
    OperatorProfile(
        name="op-a", latency_ms_median=30, latency_ms_p99=150, p_temporary=0.02,
        p_permanent=0.01, seed=11, max_per_second=1_500, max_queue_s=2.0,
    ),
    OperatorProfile(
        name="op-b", latency_ms_median=50, latency_ms_p99=250, p_temporary=0.03,
        p_permanent=0.01, seed=12, max_per_second=1_000, max_queue_s=2.0,
        outages=((12 * 3600.0, 12.5 * 3600.0),),
    ),
    OperatorProfile(
        name="op-c", latency_ms_median=80, latency_ms_p99=400, p_temporary=0.03,
        p_permanent=0.02, seed=13, max_per_second=800, max_queue_s=2.0,
    ),
)  # fmt: skip

DAY = Scenario(
    name="day",
    description="A whole day: 100M messages on a diurnal curve (peak 1.7x average at 16:00)"
    " from 50,000 Zipf-skewed accounts (the top 1% send about half), 5% express, three"
    " operators; op-b is down from 12:00 to 12:30.",
    mode="virtual",
    messages=100_000_000,
    accounts=50_000,
    duration_s=DAY_S,
    zipf=0.93,
    diurnal=True,
    operators=_DAY_OPERATORS,
    weights=(5, 3, 2),
    tick_s=1_800.0,
    max_cohort=50,
    arrival_step_s=0.5,
    targets=(
        *_CORRECT,
        Target("express_within_deadline", ">=", 0.99, "express within deadline >= 99%"),
        Target("fairness_p95_ratio", "<=", 2.0, "light accounts' p95 wait <= 2x the heaviest's"),
    ),
)

WHALE = Scenario(
    name="whale",
    description="One account floods (300,000 messages in 10 minutes: 500 msg/s where the"
    " operator takes 450) while 500 light accounts send 50 msg/s between them for an hour.",
    mode="virtual",
    messages=480_000,
    accounts=500,
    duration_s=3_600.0,
    express_share=0.05,
    whale=Whale(messages=300_000, start_s=600.0, end_s=1_200.0),
    operators=(
        OperatorProfile(
            name="op-a", latency_ms_median=30, latency_ms_p99=150, seed=21, max_per_second=450
        ),
    ),
    weights=(1,),
    credit_factor=3.0,
    tick_s=10.0,
    max_cohort=1,
    targets=(
        *_CORRECT,
        Target("light_p95_wait_s", "<=", 5.0, "light accounts' p95 wait <= 5 s during the flood"),
        Target("express_within_deadline", ">=", 0.99, "express within deadline >= 99%"),
    ),
)

OUTAGE = Scenario(
    name="outage",
    description="An hour at 100 msg/s from 200 accounts over two operators; the main one"
    " (weight 3) fails every attempt from minute 20 to minute 35. Until the breaker of the"
    " operators issue exists, retries with backoff are what routes around it.",
    mode="virtual",
    messages=360_000,
    accounts=200,
    duration_s=3_600.0,
    zipf=0.8,
    operators=(
        OperatorProfile(
            name="op-main",
            latency_ms_median=30,
            latency_ms_p99=150,
            seed=31,
            max_per_second=300,
            outages=((1_200.0, 2_100.0),),
        ),
        OperatorProfile(
            name="op-backup",
            latency_ms_median=60,
            latency_ms_p99=300,
            seed=32,
            max_per_second=200,
        ),
    ),
    weights=(3, 1),
    tick_s=10.0,
    max_cohort=1,
    targets=(
        *_CORRECT,
        Target("sent_share", ">=", 0.95, "sent >= 95% of accepted despite the outage"),
    ),
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (SMOKE, PRODUCTION_TEST, DAY, WHALE, OUTAGE)}


def scenario(name: str, *, scale: float = 1.0, seed: int | None = None) -> Scenario:
    """The named scenario at `scale` (and `seed`, default the scenario's own)."""
    try:
        base = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
    if scale == 1.0 and seed is None:
        return base
    return base.scaled(scale, seed=seed)
