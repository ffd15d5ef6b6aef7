"""A simulated operator: seeded outcomes, lognormal latency, and sends deduplicated by key."""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from statistics import NormalDist

import msgspec
import trio

from smsgw.engine.messages import OutboundSms, SendResult
from smsgw.engine.ports import Provider
from smsgw.sim.dlr import DlrEmitter

TEMPORARY_REASONS = ("operator_busy", "timeout", "throttled")
PERMANENT_REASONS = ("invalid_destination", "unknown_subscriber", "blocked_destination")

_UNAVAILABLE = SendResult("temporary", reason="operator_unavailable")

# The standard normal quantile at 0.99: ln(p99) = ln(median) + sigma * _Z_99 for a lognormal.
_Z_99 = NormalDist().inv_cdf(0.99)


_UNAVAILABLE = SendResult("temporary", reason="operator_unavailable")
_THROTTLED = SendResult("temporary", reason="throttled")


class OperatorProfile(msgspec.Struct, frozen=True):
    """How a simulated operator behaves. Latency is lognormal, fitted to its median and p99."""

    name: str = "sim"
    latency_ms_median: float = 20.0
    latency_ms_p99: float = 80.0
    p_temporary: float = 0.03
    p_permanent: float = 0.02
    seed: int = 0
    # Messages (segments) a second the operator's link takes; 0: no cap. Batches queue behind
    # each other on the link, so an operator past its cap answers later, then times out.
    max_per_second: float = 0.0
    # With a cap: when the link is already this many seconds behind, the operator refuses a
    # batch at once ("throttled", temporary) instead of queueing it, as an SMPP operator
    # answers ESME_RTHROTTLED; 0: it queues without bound (and the pool times out).
    max_queue_s: float = 0.0
    # Windows [start, end) in seconds from the operator's origin (see SimulatedOperator) in
    # which every attempt fails for now ("operator_unavailable"): a simulated outage.
    outages: tuple[tuple[float, float], ...] = ()
    # Windows in which the operator takes batches and never answers: every attempt times out.
    stalls: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.latency_ms_median <= self.latency_ms_p99:
            raise ValueError("latency needs 0 <= latency_ms_median <= latency_ms_p99")
        if self.latency_ms_median == 0.0 and self.latency_ms_p99 != 0.0:
            raise ValueError("a lognormal with median 0 has no spread: set latency_ms_p99 to 0")
        if not (
            0.0 <= self.p_temporary <= 1.0
            and 0.0 <= self.p_permanent <= 1.0
            and self.p_temporary + self.p_permanent <= 1.0
        ):
            raise ValueError("p_temporary and p_permanent must be probabilities summing to <= 1")
        if self.max_per_second < 0.0 or self.max_queue_s < 0.0:
            raise ValueError("max_per_second and max_queue_s must be >= 0")
        if any(not 0.0 <= start < end for start, end in (*self.outages, *self.stalls)):
            raise ValueError("outages and stalls must be windows (start, end), 0 <= start < end")


class SimulatedOperator:
    """A `Provider` that answers like an operator, reproducibly for a given seed.

    The k-th call to `send` draws the k-th outcome from a seeded generator, and latencies come
    from a second seeded generator, so the same seed and the same sequence of calls give the
    same results (in virtual time, the same timings too).

    The attempt takes effect when its latency has elapsed. A send cancelled before then (the
    dispatch pool's timeout) never reached the operator: it has no outcome, and a retry with the
    same key is a fresh attempt. Once a key has been answered "sent", a later send with that key
    (or a concurrent one that completes after it) answers the same `SendResult` after the usual
    latency, without sending again. The operator remembers the last `remember` delivered keys.
    """

    def __init__(
        self,
        profile: OperatorProfile | None = None,
        *,
        remember: int = 1_000_000,
        dlr: DlrEmitter | None = None,
        origin: float | None = None,
    ) -> None:
        if remember < 1:
            raise ValueError("remember must be at least 1")
        self.profile = profile if profile is not None else OperatorProfile()
        # Delayed delivery reports for every new `sent`, when given (see sim/dlr.py).
        self.dlr = dlr
        self._remember = remember
        self._outcomes = random.Random(self.profile.seed)
        # A separate generator: changing the latency profile leaves the outcome sequence alone.
        self._latencies = random.Random(f"{self.profile.seed}/latency")
        median_s = self.profile.latency_ms_median / 1000.0
        self._mu = math.log(median_s) if median_s > 0.0 else -math.inf
        self._sigma = (
            (math.log(self.profile.latency_ms_p99) - math.log(self.profile.latency_ms_median))
            / _Z_99
            if median_s > 0.0
            else 0.0
        )
        self._delivered: OrderedDict[str, SendResult] = OrderedDict()
        # trio time of the profile's second 0 (outage windows count from it); None: the first
        # send's time.
        self.origin = origin
        self._link_free_at = -math.inf  # when the capped link has sent everything queued
        # Set at run time (the operator server's POST /outage): "errors" or "timeouts" until
        # set back to None, whatever the windows say.
        self.outage: str | None = None
        self._stalled = 0
        self._calls = 0
        self._cancelled = 0
        self._throttled = 0  # batches' messages refused at once: the link was too far behind
        self._link_queue_max_s = 0.0  # the most any batch queued on the capped link
        self._sends = 0
        self._sent = 0
        self._temporary = 0
        self._permanent = 0
        self._duplicates_suppressed = 0

    @property
    def name(self) -> str:
        return self.profile.name

    def capacity(self) -> float:
        """Segments a second it takes (its link's cap; 0: it says nothing), as an SMPP
        operator's binds say theirs: the router hands it no more than it clears quickly."""
        return self.profile.max_per_second

    async def send(self, sms: OutboundSms, idempotency_key: str) -> SendResult:
        """Answer one attempt after a simulated round trip; see the class for the guarantees."""
        self._calls += 1
        drawn = self._draw_outcome(self._calls)
        try:
            await trio.sleep(self._draw_latency())
        except trio.Cancelled:
            self._cancelled += 1
            raise
        return self._answer(drawn, idempotency_key)

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        """Answer a window of messages after one simulated round trip, as a windowed protocol
        (SMPP submit_sm pipelining, an HTTP batch endpoint) would; each message's outcome is
        drawn on its own, and its id is its idempotency key. With `max_per_second`, the batch
        first waits for its turn on the link (its segments at that rate)."""
        now = trio.current_time()
        down = self._down(now)
        drawn = []
        for _ in batch:
            self._calls += 1
            outcome = self._draw_outcome(self._calls)
            drawn.append(_UNAVAILABLE if down == "errors" else outcome)
        if down == "timeouts":
            self._stalled += len(batch)
            try:
                await trio.sleep_forever()  # until the caller's timeout cancels it
            except trio.Cancelled:
                self._cancelled += len(batch)
                raise
        queued = 0.0
        if self.profile.max_per_second > 0.0 and not down:
            if 0.0 < self.profile.max_queue_s < self._link_free_at - now:
                drawn = [_THROTTLED] * len(batch)  # refused at once: no time on the link
                self._throttled += len(batch)
            else:
                segments = sum(sms.segments for sms in batch)
                start = max(now, self._link_free_at)
                self._link_free_at = start + segments / self.profile.max_per_second
                queued = self._link_free_at - now
                self._link_queue_max_s = max(self._link_queue_max_s, queued)
        try:
            await trio.sleep(queued + self._draw_latency())
        except trio.Cancelled:
            self._cancelled += len(batch)
            raise
        return [self._answer(d, sms.id) for d, sms in zip(drawn, batch, strict=True)]

    def _answer(self, drawn: SendResult, idempotency_key: str) -> SendResult:
        remembered = self._delivered.get(idempotency_key)
        if remembered is not None:
            self._duplicates_suppressed += 1
            return remembered
        self._sends += 1
        match drawn.kind:
            case "sent":
                self._sent += 1
                self._delivered[idempotency_key] = drawn
                if self.dlr is not None and drawn.operator_message_id is not None:
                    self.dlr.schedule(drawn.operator_message_id)
                if len(self._delivered) > self._remember:
                    self._delivered.popitem(last=False)
            case "temporary":
                self._temporary += 1
            case "permanent":
                self._permanent += 1
        return drawn

    def _down(self, now: float) -> str | None:
        """ "errors", "timeouts" or None: what outage, if any, the operator is in at `now`."""
        if self.outage is not None:
            return self.outage
        if not self.profile.outages and not self.profile.stalls:
            return None
        if self.origin is None:
            self.origin = now
        offset = now - self.origin
        if any(start <= offset < end for start, end in self.profile.outages):
            return "errors"
        if any(start <= offset < end for start, end in self.profile.stalls):
            return "timeouts"
        return None

    def stats(self) -> dict[str, float]:
        """Counters: `sends` = sent + temporary + permanent (attempts that reached the operator);
        every call is one of those, a suppressed duplicate, cancelled, or still in flight."""
        return {
            "calls": self._calls,
            "sends": self._sends,
            "sent": self._sent,
            "temporary": self._temporary,
            "permanent": self._permanent,
            "duplicates_suppressed": self._duplicates_suppressed,
            "cancelled": self._cancelled,
            "stalled": self._stalled,
            "throttled": self._throttled,
            "link_queue_max_s": round(self._link_queue_max_s, 3),
        }

    def _draw_outcome(self, call: int) -> SendResult:
        u = self._outcomes.random()
        if u < self.profile.p_permanent:
            return SendResult("permanent", reason=self._outcomes.choice(PERMANENT_REASONS))
        if u < self.profile.p_permanent + self.profile.p_temporary:
            return SendResult("temporary", reason=self._outcomes.choice(TEMPORARY_REASONS))
        return SendResult("sent", operator_message_id=f"{self.profile.name}-{call}")

    def _draw_latency(self) -> float:
        if self._mu == -math.inf:
            return 0.0
        return self._latencies.lognormvariate(self._mu, self._sigma)


class CountingProvider:
    """A `Provider` that reports each attempt's result to `count(operator, kind, messages)`
    (kind: sent, temporary, permanent, or timeout when the pool cancelled the batch): the
    simulator's operator health over time. A message weighs its segments."""

    def __init__(self, inner: Provider, count: Callable[[str, str, int], None]) -> None:
        self._inner = inner
        self._count = count

    @property
    def name(self) -> str:
        return self._inner.name

    def capacity(self) -> float:
        """The inner operator's (0.0 when it says nothing)."""
        rate = getattr(self._inner, "capacity", None)
        return float(rate()) if callable(rate) else 0.0

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        try:
            results = await self._inner.send_batch(batch)
        except trio.Cancelled:
            self._count(self.name, "timeout", sum(s.segments for s in batch))
            raise
        for sms, result in zip(batch, results, strict=False):
            self._count(self.name, result.kind, sms.segments)
        return results
