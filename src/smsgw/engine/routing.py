"""Routing: which operator takes which messages — weights, route overrides, breakers, limits.

`Router` is pure (the caller passes the time): per operator an `OperatorRoute` with its weight,
circuit breaker, in-flight window and throughput cap (a token bucket), and the rules that pick
among them. `Routing` adds the one async part: a batch waits while no operator may take it.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import msgspec
import trio

from smsgw.engine.breaker import BreakerPolicy, BreakerState, Call, OperatorBreaker
from smsgw.engine.messages import OutboundSms, SendResult
from smsgw.engine.ports import Provider, slots, slots_of
from smsgw.engine.ratelimit import TokenBucket

_UNLIMITED = 1 << 30
# An operator that says how many PDUs a second it can take now (`capacity()`: an SMPP
# operator's bound binds' rates, lowered while it throttles) gets no more in flight than it
# clears in this long: what it is handed beyond that only queues inside its client, and an
# express message then waits behind it, where no priority can reach it.
CLEAR_S = 0.25
# Tokens are floats: a bucket a rounding error short of a whole token has it.
_TOKEN_SLACK = 1e-9


class OperatorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Limits of one operator, by its name."""

    name: str
    weight: int | None = None  # None: the weight the operator was configured with
    # Operators count PDUs, a segment each, so these do too (a 3-segment message is 3):
    window: int = 0  # segments in flight at this operator at once; 0: only the pool's window
    max_per_second: float = 0.0  # segments a second sent to it; 0: no cap
    burst: float = 0.0  # tokens of the cap's bucket; 0: a tenth of a second's worth (>= 1)


class RouteOverride(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Messages of `account_id`, or to numbers starting with `prefix` (E.164 with its "+"),
    go only to `operators` (weighted among them); with `fallback`, to the others while none of
    them may take calls (breakers open). An account's route beats a prefix's; the longest
    prefix wins."""

    operators: tuple[str, ...]
    account_id: int | None = None
    prefix: str | None = None
    fallback: bool = False


class RoutingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operators: tuple[OperatorSettings, ...] = ()
    routes: tuple[RouteOverride, ...] = ()
    breaker: BreakerPolicy = BreakerPolicy()


class OperatorRoute:
    """One operator's state in the pool: the circuit breaker, in-flight segments and token
    bucket. The window and the throughput cap count segments (operators count PDUs, one a
    segment: `ports.slots`); the breaker's probes and a call's size count messages."""

    def __init__(
        self,
        provider: Provider,
        weight: int,
        settings: OperatorSettings,
        policy: BreakerPolicy,
        now: float,
    ) -> None:
        self.provider = provider
        self.name = provider.name
        rate = getattr(provider, "capacity", None)
        self._rate: Callable[[], float] | None = rate if callable(rate) else None
        self.weight = weight
        self.window = settings.window
        self.inflight = 0  # segments
        self.bucket: TokenBucket | None = None
        if settings.max_per_second > 0:
            burst = settings.burst or max(1.0, settings.max_per_second / 10)
            self.bucket = TokenBucket.start(settings.max_per_second, burst, now)
        self.breaker = OperatorBreaker(policy, now)
        # Messages one call may carry, when the operator sets it (0: the pool's batch size).
        self.max_call = 0
        self.batches = 0
        self.messages = 0

    def capacity(self, now: float, want: int) -> tuple[int, int]:
        """What one call to this operator may carry now, for a batch of `want` segments:
        (messages, segments).

        A throughput cap gives a batch its tokens all at once: the call waits until there are
        as many as the batch has segments (or the bucket holds, if fewer). Taken as they
        trickle in, a backlog would go out one message a call, each call waking every batch
        that waits."""
        messages = self.breaker.allowance(now)
        if self.max_call:
            messages = min(messages, self.max_call)
        room = _UNLIMITED
        if self.window:
            room = self.window - self.inflight
        clears = self.clears()
        if clears:
            room = min(room, clears - self.inflight)
        if self.bucket is not None:
            self.bucket.refill(now)
            tokens = int(self.bucket.tokens + _TOKEN_SLACK)
            if tokens < self._tokens_needed(want):
                return 0, 0
            room = min(room, tokens)
        return max(0, messages), max(0, room)

    def fit(self, messages: Sequence[OutboundSms], count: int, room: int) -> int:
        """How many of `messages`, at most `count`, one call may carry in `room` segments. A
        message larger than the window or the bucket goes alone, once nothing is in flight
        here and the bucket is full."""
        n = 0
        left = room
        for sms in messages[:count]:
            left -= slots(sms.segments)
            if left < 0:
                break
            n += 1
        if n == 0 and count > 0 and room > 0 and self.idle():
            return 1
        return n

    def size(
        self, messages: Sequence[OutboundSms], now: float, max_batch: int, room: int | None = None
    ) -> tuple[int, int]:
        """(how many of `messages` one call here may carry now, at most `max_batch`; the
        segments of room it counted against): `capacity`, then `fit`. `room`: count against
        this much instead of the room the operator has (what other batches were not counted
        on, `Routing._notify`), never more."""
        count, free = self.capacity(now, slots_of(messages[:max_batch]))
        if room is not None:
            free = min(free, room)
        return (self.fit(messages, min(count, max_batch), free) if count else 0), free

    def rate(self) -> float:
        """Segments a second the operator says it takes now; 0.0: it says nothing."""
        return self._rate() if self._rate is not None else 0.0

    def clears(self) -> int:
        """Segments the operator clears in CLEAR_S at the rate it says it can take now (at
        least one call's worth); 0: it says nothing, or it can take nothing now (no bind up:
        its calls then fail, and the breaker moves work elsewhere)."""
        rate = self.rate()
        if rate <= 0:
            return 0
        return max(self.max_call or 1, int(rate * CLEAR_S))

    def idle(self) -> bool:
        """Nothing in flight here, and the bucket (if any) full."""
        return self.inflight == 0 and (
            self.bucket is None or self.bucket.tokens + _TOKEN_SLACK >= self.bucket.burst
        )

    def _tokens_needed(self, want: int) -> int:
        assert self.bucket is not None
        return max(1, min(want, int(self.bucket.burst)))

    def ready_at(self, now: float, want: int) -> float | None:
        """When time alone may give this operator room for a batch of `want` (a cool-down
        ends, tokens refill)."""
        times = []
        reopens = self.breaker.reopens_at()
        if reopens is not None:
            times.append(reopens)
        if self.bucket is not None:
            self.bucket.refill(now)
            short = self._tokens_needed(want) - self.bucket.tokens
            if short > _TOKEN_SLACK:
                # At least a microsecond: a wake-up closer than the clock can tell apart
                # from now would find the tokens still short, and spin.
                times.append(now + max(1e-6, short / self.bucket.rate))
        return min(times) if times else None

    def take(self, size: int, now: float, segments: int | None = None) -> Call:
        """A call of `size` messages, `segments` in all (default: one each), begins."""
        segments = size if segments is None else segments
        call = self.breaker.begin(now, size)
        call.segments = segments
        self.inflight += segments
        if self.bucket is not None:
            self.bucket.spend(now, segments)
        self.batches += 1
        self.messages += size
        return call

    def stats(self, now: float) -> dict[str, Any]:
        if self.bucket is not None:
            self.bucket.refill(now)
        return {
            "weight": self.weight,
            "inflight": self.inflight,
            "window": self.window or None,
            "clears": self.clears() or None,
            "max_per_second": self.bucket.rate if self.bucket is not None else None,
            # Below one token: the throughput cap holds this operator's calls back now.
            "capped": self.bucket is not None and self.bucket.tokens < 1 - _TOKEN_SLACK,
            "batches": self.batches,
            "messages": self.messages,
            **self.breaker.stats(now),
        }


Assignment = tuple[OperatorRoute, list[OutboundSms], Call]
# Messages that go the same way: their route override, the operator they avoid, themselves.
Pending = tuple[RouteOverride | None, str | None, list[OutboundSms]]


class Router:
    """Picks operators for messages. Pure: the caller passes the time (a monotonic clock),
    from construction on (`now`: the breakers' states start then, on the clock their
    figures are later read with).

    For each message: its candidates (a route override's operators, else all); of those, the
    ones whose breaker lets a call begin; for a retry, not the operator that failed it last
    unless no other may take calls; then a weighted choice among those with room now (window,
    tokens, probe slots). A batch is split only where one operator lacks room for all of it.
    """

    def __init__(
        self,
        providers: Sequence[tuple[Provider, int]],
        config: RoutingConfig = RoutingConfig(),
        *,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        settings = {s.name: s for s in config.operators}
        names = [p.name for p, _ in providers]
        if len(set(names)) != len(names):
            raise ValueError(f"operator names must be unique: {names}")
        unknown = set(settings) - set(names)
        for route in config.routes:
            unknown |= set(route.operators) - set(names)
            if (route.account_id is None) == (route.prefix is None):
                raise ValueError("a route names exactly one of account_id and prefix")
            if not route.operators:
                raise ValueError("a route names at least one operator")
            if route.prefix is not None and not (
                route.prefix.startswith("+") and route.prefix[1:].isdigit()
            ):
                raise ValueError(f"a route prefix is '+' and digits, not {route.prefix!r}")
        if unknown:
            raise ValueError(f"routing names operators that are not configured: {sorted(unknown)}")
        self.routes: list[OperatorRoute] = []
        for provider, weight in providers:
            own = settings.get(provider.name, OperatorSettings(provider.name))
            # An operator that can only have so many messages outstanding (an SMPP operator's
            # binds x window) gets no more in flight than that unless the routing file says
            # otherwise: what waits inside its client waits with its batch's outcome, and a
            # crash sends again every message it had taken whose outcome was not recorded.
            limit = getattr(provider, "in_flight_limit", 0)
            if not own.window and limit:
                own = msgspec.structs.replace(own, window=limit)
            chosen = own.weight if own.weight is not None else weight
            if chosen < 0:
                raise ValueError(f"operator {provider.name}: weight must be >= 0")
            operator = OperatorRoute(provider, chosen, own, config.breaker, now)
            if limit:
                # Its calls an eighth of what it holds: a call's outcomes wait for its last
                # message, so small calls keep its windows full as each one comes back.
                operator.max_call = max(1, limit // 8)
            self.routes.append(operator)
        self.by_name = {r.name: r for r in self.routes}
        self._accounts = {r.account_id: r for r in config.routes if r.account_id is not None}
        self._prefixes = sorted(
            (r for r in config.routes if r.prefix is not None),
            key=lambda r: len(r.prefix or ""),
            reverse=True,
        )
        self._rng = rng if rng is not None else random.Random()

    def override(self, sms: OutboundSms) -> RouteOverride | None:
        route = self._accounts.get(sms.account_id)
        if route is not None:
            return route
        for route in self._prefixes:
            assert route.prefix is not None
            if sms.to.startswith(route.prefix):
                return route
        return None

    def eligible(
        self, override: RouteOverride | None, avoid: str | None, now: float
    ) -> list[OperatorRoute]:
        """The operators that may take a message of this route now or once they have room."""
        if override is None:
            candidates = self.routes
        else:
            candidates = [self.by_name[name] for name in override.operators]
        allowed = [r for r in candidates if r.breaker.allowance(now) > 0]
        if not allowed and override is not None and override.fallback:
            allowed = [r for r in self.routes if r.breaker.allowance(now) > 0]
        if avoid is not None and any(r.name != avoid for r in allowed):
            allowed = [r for r in allowed if r.name != avoid]
        return allowed

    def _pick(self, ready: list[tuple[OperatorRoute, int]]) -> tuple[OperatorRoute, int]:
        if len(ready) == 1:
            return ready[0]
        weights = [r.weight for r, _ in ready]
        if not any(weights):
            return self._rng.choice(ready)
        return self._rng.choices(ready, weights)[0]

    def group(self, pending: Sequence[OutboundSms]) -> list[Pending]:
        """`pending` by route (its override) and the operator each must avoid: what
        `assign_groups` takes. Messages keep their order within a group."""
        groups: dict[tuple[int, str | None], Pending] = {}
        for sms in pending:
            override = self.override(sms)
            key = (id(override), sms.last_operator)
            group = groups.get(key)
            if group is None:
                groups[key] = (override, sms.last_operator, [sms])
            else:
                group[2].append(sms)
        return list(groups.values())

    def assign_groups(
        self, groups: list[Pending], now: float, max_batch: int
    ) -> tuple[list[Assignment], list[Pending]]:
        """Calls to begin now (operator, its messages, the breaker's call), and what must
        wait: no eligible operator has room. Each call's slots and tokens are taken. Where no
        operator has room this costs a few steps per group, none per message: a batch that
        waits for room asks again on every change."""
        calls: list[Assignment] = []
        left: list[Pending] = []
        for override, avoid, messages in groups:
            allowed = self.eligible(override, avoid, now)
            while messages:
                ready = []
                for r in allowed:
                    size, _ = r.size(messages, now, max_batch)
                    if size:
                        ready.append((r, size))
                if not ready:
                    break
                route, size = self._pick(ready)
                part, messages = messages[:size], messages[size:]
                calls.append((route, part, route.take(size, now, slots_of(part))))
            if messages:
                left.append((override, avoid, messages))
        return calls, left

    def finish(
        self, route: OperatorRoute, call: Call, now: float, results: Sequence[SendResult] | None
    ) -> None:
        """A call ended: `results` one per message, or None for a timeout."""
        if call.done:
            return
        route.inflight -= call.segments
        if results is None:
            route.breaker.end(call, now, ok=0, failed=call.size, timed_out=True)
            return
        failed = sum(1 for r in results if r.kind == "temporary")
        route.breaker.end(call, now, ok=len(results) - failed, failed=failed, timed_out=False)

    def abandon(self, route: OperatorRoute, call: Call) -> bool:
        """A call was cancelled before its end: its slots come back, nothing is recorded.
        False when it had ended already (nothing came back)."""
        if call.done:
            return False
        route.inflight -= call.segments
        route.breaker.abandon(call)
        return True

    def next_reopening(self) -> float | None:
        """When the first open breaker lets a probe through, if one is open."""
        times = [t for r in self.routes if (t := r.breaker.reopens_at()) is not None]
        return min(times) if times else None

    def capacity(self) -> float:
        """Segments a second the operators say they take now, together; 0.0 when one of them
        says nothing or nothing (then nobody knows)."""
        total = 0.0
        for route in self.routes:
            rate = route.rate()
            if rate <= 0:
                return 0.0
            total += rate
        return total

    def next_change(self, now: float, want: int) -> float | None:
        """When time alone may let some operator take a batch of `want` segments."""
        times = [t for r in self.routes if (t := r.ready_at(now, want)) is not None]
        return min(times) if times else None

    def stats(self, now: float) -> dict[str, Any]:
        return {r.name: r.stats(now) for r in self.routes}

    def healthy(self, now: float) -> list[str]:
        return [r.name for r in self.routes if r.breaker.poll(now) is BreakerState.CLOSED]

    def drain(self, name: str, now: float, reason: str) -> OperatorRoute:
        """Hold `name`'s breaker open until `release`: no call begins there, so its messages
        go to the other eligible operators (a route override's with `fallback` too). Calls in
        flight finish. KeyError for an unknown operator."""
        route = self.by_name[name]
        route.breaker.hold_open(now, reason)
        return route

    def release(self, name: str, now: float) -> OperatorRoute:
        """End `drain`: the breaker goes half-open and probes. KeyError for an unknown name."""
        route = self.by_name[name]
        route.breaker.release(now)
        return route


class Routing:
    """The Router with waiting: `assignments` says which calls to make for a batch's messages
    as operators have room, and which messages ran out of time waiting."""

    def __init__(self, router: Router, *, clock: Callable[[], float]) -> None:
        self.router = router
        self._clock = clock  # wall clock: deadlines and validity are wall-clock times
        # The batches waiting for room, in the order they look again: express first, then
        # bulk, each oldest first (insertion-ordered dicts: O(1) to leave).
        self._waiting: tuple[dict[_Waiter, None], dict[_Waiter, None]] = ({}, {})
        self.waited = 0  # batches that had to wait for an operator
        self.waiting = 0  # messages waiting now
        self.expired = 0  # messages whose time ran out while waiting
        self._express_waiting = 0  # batches with express messages waiting now

    def _notify(self) -> None:
        """Room may have come back (a call ended, a breaker moved): wake the waiting batches
        that can use it, in order, as far as it goes. Waking every waiting batch on every
        call's end made a pool with thousands of small batches waiting at one operator spend
        its time waking them; each looks at the room it was counted on, and one that finds
        none waits for the next change."""
        now = trio.current_time()
        # A breaker that opened again has a new reopening time, which a batch that went to
        # sleep before it does not know: it looks again, and sleeps until then.
        reopens = self.router.next_reopening()
        spare: dict[int, int] = {}  # id(route) -> segments not yet counted for a batch
        routes = len(self.router.routes)
        full = False  # no operator has room left for anyone
        for queue in self._waiting:
            for waiter in queue:
                # One woken already and not yet looking counts on its room again, first.
                if (not full and self._could_go(waiter, spare, now)) or (
                    reopens is not None and reopens < waiter.wake
                ):
                    waiter.woken.set()
                elif len(spare) == routes and all(left <= 0 for left in spare.values()):
                    full = True
                    if reopens is None:
                        return

    def _could_go(self, waiter: _Waiter, spare: dict[int, int], now: float) -> bool:
        """Whether some operator has room for a call of `waiter`'s messages that the batches
        woken before it were not counted on; if so, that room is counted for it."""
        for override, avoid, messages in waiter.groups:
            for route in self.router.eligible(override, avoid, now):
                key = id(route)
                n, left = route.size(messages, now, waiter.max_batch, spare.get(key))
                if n:
                    spare[key] = left - slots_of(messages[:n])
                    return True
                spare.setdefault(key, left)
        return False

    def finish(
        self, route: OperatorRoute, call: Call, results: Sequence[SendResult] | None
    ) -> None:
        self.router.finish(route, call, trio.current_time(), results)
        # Wakes the batches waiting: for the slots freed, or (the breaker having opened) to
        # go to another operator.
        self._notify()

    def abandon(self, route: OperatorRoute, call: Call) -> None:
        if self.router.abandon(route, call):  # else `finish` has woken the waiting batches
            self._notify()

    async def assignments(
        self,
        batch: Sequence[OutboundSms],
        ends_at: Callable[[OutboundSms], float],
        max_batch: int,
    ) -> AsyncGenerator[tuple[list[Assignment], list[OutboundSms]], None]:
        """What to do with `batch`'s messages as operators have room: at each look, the calls
        to begin now (their slots and tokens taken) and the messages whose time (`ends_at`,
        wall clock) passed while they waited. Between looks it waits while no eligible
        operator may take the rest. The caller begins the calls and fails the expired ones;
        it closes the generator when done (`contextlib.aclosing`)."""
        groups = self.router.group(batch)
        # No message of the batch expires before this (a lower bound: messages leave).
        earliest = min(ends_at(s) for s in batch) if batch else math.inf
        express = any(s.express for s in batch)  # a pool's batches are all one kind
        counted = False
        while groups:
            now = trio.current_time()
            begun, groups = self.router.assign_groups(groups, now, max_batch)
            wall = self._clock()
            expired: list[OutboundSms] = []
            if groups and earliest <= wall:
                groups, expired, earliest = _split_expired(groups, ends_at, wall)
                self.expired += len(expired)
            if begun or expired:
                yield begun, expired
            if not groups:
                break
            if not counted:
                self.waited += 1
                counted = True
            size = sum(len(messages) for _, _, messages in groups)
            wake = earliest - wall + now
            change = self.router.next_change(
                now, min(slots_of(m[:max_batch]) for _, _, m in groups)
            )
            if change is not None:
                wake = min(wake, change)
            waiter = _Waiter(groups, max_batch, wake)
            queue = self._waiting[0 if express else 1]
            queue[waiter] = None
            self.waiting += size
            self._express_waiting += express
            try:
                with trio.move_on_at(wake):
                    await waiter.woken.wait()
            finally:
                del queue[waiter]
                self.waiting -= size
                self._express_waiting -= express
            if not express and self._express_waiting:
                # Woken together with express batches: let them take the room first
                # (one scheduling round later, so bulk cannot starve).
                await trio.lowlevel.checkpoint()

    def drain(self, name: str, reason: str) -> OperatorRoute:
        """`Router.drain`, and the batches waiting for an operator look again at once."""
        route = self.router.drain(name, trio.current_time(), reason)
        self._notify()
        return route

    def release(self, name: str) -> OperatorRoute:
        """`Router.release`, and the batches waiting for an operator look again at once."""
        route = self.router.release(name, trio.current_time())
        self._notify()
        return route

    def stats(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "batches_waited": self.waited,
            "messages_waiting": self.waiting,
            "expired_waiting": self.expired,
            "healthy": self.router.healthy(now),
            "operators": self.router.stats(now),
        }


class _Waiter:
    """A batch waiting in `Routing.assignments` for an operator with room."""

    __slots__ = ("groups", "max_batch", "wake", "woken")

    def __init__(self, groups: list[Pending], max_batch: int, wake: float) -> None:
        self.groups = groups
        self.max_batch = max_batch
        self.wake = wake  # trio time it looks again by itself
        self.woken = trio.Event()


def _split_expired(
    groups: list[Pending], expires_at: Callable[[OutboundSms], float], wall: float
) -> tuple[list[Pending], list[OutboundSms], float]:
    """(the groups without the messages expired at `wall`, those messages, the earliest
    expiry of the messages kept), in one pass."""
    kept: list[Pending] = []
    expired: list[OutboundSms] = []
    earliest = math.inf
    for override, avoid, messages in groups:
        alive: list[OutboundSms] = []
        for sms in messages:
            at = expires_at(sms)
            if at > wall:
                alive.append(sms)
                earliest = min(earliest, at)
            else:
                expired.append(sms)
        if alive:
            kept.append((override, avoid, alive))
    return kept, expired, earliest
