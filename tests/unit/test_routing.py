"""Router: weights, overrides, breakers, windows, throughput caps, retries on another operator;
and next_attempt, the retry policy, in virtual time."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Sequence

import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from smsgw.engine.breaker import BreakerPolicy, BreakerState
from smsgw.engine.messages import OutboundSms, SendResult
from smsgw.engine.retry import next_attempt
from smsgw.engine.routing import (
    Assignment,
    OperatorSettings,
    RouteOverride,
    Router,
    Routing,
    RoutingConfig,
)


class Named:
    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        raise AssertionError("not called")


def sms(
    i: int,
    *,
    account: int = 1,
    to: str = "+4915123456789",
    last: str | None = None,
    segments: int = 1,
):
    return OutboundSms(
        id=f"m{i}",
        account_id=account,
        to=to,
        sender="t",
        text="x",
        segments=segments,
        price=5 * segments,
        express=False,
        created_at=0.0,
        last_operator=last,
    )


def router(config: RoutingConfig = RoutingConfig(), weights=(1, 1, 1)) -> Router:
    providers = [(Named(n), w) for n, w in zip("abc", weights, strict=False)]
    return Router(providers, config, now=0.0, rng=random.Random(5))


def assign(
    r: Router, pending: Sequence[OutboundSms], now: float, max_batch: int
) -> tuple[list[Assignment], list[OutboundSms]]:
    """The calls to begin now for `pending`, and the messages that must wait."""
    calls, left = r.assign_groups(r.group(pending), now, max_batch)
    return calls, [m for _, _, messages in left for m in messages]


def break_open(r: Router, name: str, now: float = 0.0) -> None:
    route = r.by_name[name]
    for _ in range(1_000):
        if route.breaker.state is BreakerState.OPEN:
            return
        call = route.take(1, now)
        r.finish(route, call, now, [SendResult("temporary", reason="x")])
    raise AssertionError(f"{name} did not open")


def test_weights_share_the_batches() -> None:
    r = router(weights=(6, 3, 1))
    chosen: Counter[str] = Counter()
    for i in range(2_000):
        calls, waiting = assign(r, [sms(i)], 0.0, 100)
        assert not waiting
        route, _, call = calls[0]
        chosen[route.name] += 1
        r.finish(route, call, 0.0, [SendResult("sent")])
    assert 0.55 < chosen["a"] / 2_000 < 0.65 and 0.05 < chosen["c"] / 2_000 < 0.15


def test_an_open_breaker_takes_nothing_and_work_goes_elsewhere() -> None:
    r = router()
    break_open(r, "a")
    for i in range(200):
        calls, _ = assign(r, [sms(i)], 0.5, 100)
        assert calls[0][0].name != "a"
        r.finish(calls[0][0], calls[0][2], 0.5, [SendResult("sent")])


def test_a_retry_prefers_another_operator_but_takes_the_last_if_alone() -> None:
    r = router()
    for i in range(100):
        calls, _ = assign(r, [sms(i, last="b")], 0.0, 100)
        assert calls[0][0].name != "b"
        r.finish(calls[0][0], calls[0][2], 0.0, [SendResult("sent")])
    break_open(r, "a")
    break_open(r, "c")
    calls, waiting = assign(r, [sms(0, last="b")], 0.5, 100)
    assert [c[0].name for c in calls] == ["b"] and not waiting


def test_windows_and_caps_split_a_batch_and_the_rest_waits() -> None:
    config = RoutingConfig(
        operators=(
            OperatorSettings("a", window=3),
            OperatorSettings("b", window=2),
            OperatorSettings("c", max_per_second=10, burst=4),
        )
    )
    r = router(config)
    calls, waiting = assign(r, [sms(i) for i in range(20)], 0.0, 100)
    assert sorted((c[0].name, len(c[1])) for c in calls) == [("a", 3), ("b", 2), ("c", 4)]
    assert len(waiting) == 11
    # Tokens come back with time, a batch's worth at once (here the bucket's 4); the window
    # when a call ends.
    assert r.next_change(0.0, 11) == pytest.approx(0.4)
    calls, waiting = assign(r, waiting, 0.2, 100)
    assert not calls and len(waiting) == 11
    calls, waiting = assign(r, waiting, 0.4, 100)
    assert [(c[0].name, len(c[1])) for c in calls] == [("c", 4)] and len(waiting) == 7
    # A batch smaller than the bucket waits only for its own size.
    assert r.next_change(0.4, 2) == pytest.approx(0.6)


def test_a_capped_operator_takes_a_backlog_in_whole_batches_not_a_message_a_call() -> None:
    r = router(RoutingConfig(operators=(OperatorSettings("a", max_per_second=1_000),)), (1,))
    waiting = [sms(i) for i in range(1_000)]
    now, sizes = 0.0, []
    while waiting:
        calls, waiting = assign(r, waiting, now, 50)
        for route, part, call in calls:
            sizes.append(len(part))
            r.finish(route, call, now, [SendResult("sent")] * len(part))
        change = r.next_change(now, min(len(waiting), 50))
        if waiting:
            assert change is not None and change > now
            now = change
    # 1,000 messages in calls of 50, the batch size: the full bucket's 100 at once, the other
    # 900 at 1,000 a second.
    assert set(sizes) == {50} and sum(sizes) == 1_000
    assert now == pytest.approx(0.9)


def test_overrides_by_account_beat_prefixes_and_the_longest_prefix_wins() -> None:
    config = RoutingConfig(
        routes=(
            RouteOverride(("a",), prefix="+44"),
            RouteOverride(("b",), prefix="+447"),
            RouteOverride(("c",), account_id=9),
        )
    )
    r = router(config)
    for message, expected in [
        (sms(1, to="+441234"), "a"),
        (sms(2, to="+447700"), "b"),
        (sms(3, to="+447700", account=9), "c"),
    ]:
        for _ in range(20):
            calls, _ = assign(r, [message], 0.0, 100)
            assert calls[0][0].name == expected
            r.finish(calls[0][0], calls[0][2], 0.0, [SendResult("sent")])


def test_an_override_waits_for_its_operators_unless_it_falls_back() -> None:
    strict = router(RoutingConfig(routes=(RouteOverride(("a",), account_id=1),)))
    break_open(strict, "a")
    calls, waiting = assign(strict, [sms(1)], 0.5, 100)
    assert not calls and len(waiting) == 1
    loose = router(RoutingConfig(routes=(RouteOverride(("a",), account_id=1, fallback=True),)))
    break_open(loose, "a")
    calls, waiting = assign(loose, [sms(1)], 0.5, 100)
    assert calls[0][0].name in ("b", "c") and not waiting


def test_half_open_sends_small_probes_and_closes_on_success() -> None:
    policy = BreakerPolicy(cool_down_s=1.0, probe_batches=1, probe_size=2)
    r = router(RoutingConfig(breaker=policy), weights=(1, 0, 0))
    break_open(r, "a")
    for name in "bc":
        break_open(r, name, now=0.9)  # still open at 1.0
    calls, waiting = assign(r, [sms(i) for i in range(10)], 1.0, 100)
    assert [(c[0].name, len(c[1])) for c in calls] == [("a", 2)] and len(waiting) == 8
    r.finish(calls[0][0], calls[0][2], 1.1, [SendResult("sent")] * 2)
    assert r.by_name["a"].breaker.state is BreakerState.CLOSED


def test_a_breaker_state_age_counts_from_the_routers_construction() -> None:
    # trio's clock has an arbitrary origin (tens of thousands of seconds in): a router made
    # then reads its breakers' and buckets' ages from that time, not from 0.0.
    start = 76_000.0
    r = Router(
        [(Named("a"), 1)],
        RoutingConfig(operators=(OperatorSettings("a", max_per_second=10, burst=2),)),
        now=start,
        rng=random.Random(5),
    )
    stats = r.stats(start + 60.0)["a"]
    assert stats["state"] == "closed" and stats["state_for_s"] == pytest.approx(60.0)
    # The bucket starts full at `start`: a batch of two goes at once, a third waits 0.1 s.
    route = r.by_name["a"]
    route.take(2, start)
    assert route.ready_at(start, 1) == pytest.approx(start + 0.1)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="not configured"):
        router(RoutingConfig(routes=(RouteOverride(("zz",), account_id=1),)))
    with pytest.raises(ValueError, match="exactly one"):
        router(RoutingConfig(routes=(RouteOverride(("a",)),)))
    with pytest.raises(ValueError, match="prefix"):
        router(RoutingConfig(routes=(RouteOverride(("a",), prefix="44"),)))
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"operators": [{"name": "a", "wieght": 2}]}, RoutingConfig)


# --- the retry policy ------------------------------------------------------------------------

SETTINGS = settings(max_examples=300, deadline=None)


@SETTINGS
@given(
    attempts=st.integers(min_value=1, max_value=10),
    now=st.floats(min_value=0, max_value=1e5),
    left=st.floats(min_value=-10, max_value=1e5),
    express=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_a_retry_begins_before_the_message_expires_and_within_max_attempts(
    attempts: int, now: float, left: float, express: bool, seed: int
) -> None:
    expires = now + left
    delay = next_attempt(
        attempts,
        now=now,
        expires=expires,
        express=express,
        max_attempts=5,
        base=0.5,
        cap=60.0,
        rng=random.Random(seed),
    )
    if attempts >= 5 or left <= 0:
        assert delay is None
    if delay is not None:
        assert 0.0 <= delay <= min(60.0, 0.5 * 2 ** (attempts - 1))
        assert now + delay < expires
        if express:
            assert delay <= (expires - now) / 4


def test_a_message_is_retried_until_its_validity_in_virtual_time() -> None:
    """Walk one message through its retries: every attempt begins before it expires, and the
    walk ends by max attempts or by its validity, whichever comes first."""
    rng = random.Random(3)
    for validity in (1.0, 5.0, 3_600.0):
        now, attempts = 0.0, 1
        while (
            delay := next_attempt(
                attempts,
                now=now,
                expires=validity,
                express=False,
                max_attempts=8,
                base=0.5,
                cap=60.0,
                rng=rng,
            )
        ) is not None:
            now += delay
            attempts += 1
            assert now < validity
        assert attempts <= 8
        if validity > 64:  # more than every backoff together can take (0.5 + 1 + ... + 32)
            assert attempts == 8


async def test_assignments_wait_for_tokens_and_expire_what_outlives_its_time(
    autojump_clock: object,
) -> None:
    # One operator at 10/s with a bucket of 2: 6 messages take 0.4 s of waiting; those
    # that may wait only 0.15 s run out of time first and come back expired, never sent.
    r = router(RoutingConfig(operators=(OperatorSettings("a", max_per_second=10, burst=2),)), (1,))
    routing = Routing(r, clock=trio.current_time)
    batch = [sms(i) for i in range(6)]
    deadline = {m.id: 0.15 if i in (3, 5) else 60.0 for i, m in enumerate(batch)}
    sent: list[tuple[float, list[str]]] = []
    expired: list[tuple[float, str]] = []

    looks = routing.assignments(batch, lambda m: deadline[m.id], 50)
    async with contextlib.aclosing(looks):
        async for begun, out_of_time in looks:
            for route, part, call in begun:
                sent.append((trio.current_time(), [m.id for m in part]))
                routing.finish(route, call, [SendResult("sent")] * len(part))
            expired += [(trio.current_time(), m.id) for m in out_of_time]
    assert [ids for _, ids in sent] == [["m0", "m1"], ["m2", "m4"]]
    assert [i for _, i in expired] == ["m3", "m5"]
    assert all(at == pytest.approx(0.15) for at, _ in expired)
    assert sent[1][0] == pytest.approx(0.2)
    stats = routing.stats()
    assert stats["expired_waiting"] == 2 and stats["batches_waited"] == 1
    assert stats["messages_waiting"] == 0


def test_an_operators_window_and_cap_count_segments() -> None:
    """Operators count PDUs: a window of 10 takes three 3-segment messages, and a cap of 30
    a second with a burst of 9 lets three go, then three more 0.3 s later; a message longer
    than the window goes alone once nothing is in flight."""
    settings = OperatorSettings("a", window=10, max_per_second=30, burst=9)
    r = Router([(Named("a"), 1)], RoutingConfig(operators=(settings,)), now=0.0)
    calls, waiting = assign(r, [sms(i, segments=3) for i in range(5)], 0.0, 100)
    [(route, part, call)] = calls
    assert len(part) == 3 and route.inflight == 9 and len(waiting) == 2
    assert route.ready_at(0.0, 6) == pytest.approx(0.2)  # 6 tokens short, at 30 a second
    r.finish(route, call, 0.3, [SendResult("sent", "x")] * 3)
    calls, waiting = assign(r, waiting, 0.3, 100)
    assert [len(p) for _, p, _ in calls] == [2] and not waiting
    r.finish(route, calls[0][2], 0.3, [SendResult("sent", "x")] * 2)
    long = sms(9, segments=12)
    calls, waiting = assign(r, [long], 0.3, 100)
    assert not calls and waiting == [long]  # the bucket is not full yet
    calls, waiting = assign(r, [long], 1.0, 100)
    assert [p for _, p, _ in calls] == [[long]] and route.inflight == 12


class Rated(Named):
    """An operator that says how many PDUs a second it can take now (an SMPP operator)."""

    def __init__(self, name: str, rate: float) -> None:
        super().__init__(name)
        self.rate = rate

    def capacity(self) -> float:
        return self.rate


def test_an_operator_gets_no_more_than_it_clears_at_its_rate_now() -> None:
    """At 40 PDUs a second an operator is handed CLEAR_S (0.25 s) of work: 10 segments; its
    rate falling (throttled) shrinks that; one that can take nothing now (no bind up) is not
    held back here: its calls fail and the breaker moves the work."""
    op = Rated("a", 40.0)
    r = Router([(op, 1)], now=0.0)
    route = r.by_name["a"]
    calls, waiting = assign(r, [sms(i) for i in range(25)], 0.0, 100)
    assert [len(p) for _, p, _ in calls] == [10] and len(waiting) == 15
    assert r.next_change(0.0, 1) is None  # the calls in flight wake the rest as they end
    r.finish(route, calls[0][2], 0.1, [SendResult("sent", "x")] * 10)
    op.rate = 8.0  # throttled: 2 segments in 0.25 s
    calls, waiting = assign(r, waiting, 0.1, 100)
    assert [len(p) for _, p, _ in calls] == [2] and len(waiting) == 13
    r.finish(route, calls[0][2], 0.2, [SendResult("sent", "x")] * 2)
    op.rate = 0.0
    calls, waiting = assign(r, waiting, 0.2, 100)
    assert [len(p) for _, p, _ in calls] == [13] and not waiting
    assert r.stats(0.2)["a"]["clears"] is None


async def test_a_call_that_ends_wakes_only_the_waiting_batches_its_room_fits(
    autojump_clock: object,
) -> None:
    """200 one-message batches wait at an operator with a window of 10: each call's end
    wakes the batch next in line (express first), not all 200, and every batch is sent."""
    r = router(RoutingConfig(operators=(OperatorSettings("a", window=10),)), (1,))
    routing = Routing(r, clock=trio.current_time)
    looked = 0
    assign_groups = r.assign_groups

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal looked
        looked += 1
        return assign_groups(*args, **kwargs)  # type: ignore[arg-type]

    r.assign_groups = counted  # type: ignore[method-assign]
    sent: list[str] = []

    async def send(m: OutboundSms) -> None:
        looks = routing.assignments([m], lambda _: 1e9, 50)
        async with contextlib.aclosing(looks):
            async for begun, _ in looks:
                for route, part, call in begun:
                    await trio.sleep(0.1)
                    sent.append(part[0].id)
                    routing.finish(route, call, [SendResult("sent")] * len(part))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(send, sms(i))
        await trio.testing.wait_all_tasks_blocked()
        express = msgspec.structs.replace(sms(999), express=True)
        nursery.start_soon(send, express)
        await trio.testing.wait_all_tasks_blocked()
        assert routing.stats()["messages_waiting"] == 191
    assert len(sent) == 201 and sent.index("m999") < 20  # in the first round of room
    assert looked <= 2 * 201  # once when it comes, once when woken: not once a call
