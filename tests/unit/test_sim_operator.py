"""SimulatedOperator: outcome mix, reproducibility, deduplication and latency, in virtual time."""

from __future__ import annotations

import statistics

import pytest
import trio

from smsgw.engine.messages import OutboundSms, SendResult
from smsgw.engine.ports import Provider
from smsgw.sim.operator import (
    PERMANENT_REASONS,
    TEMPORARY_REASONS,
    OperatorProfile,
    SimulatedOperator,
)


def instant(seed: int = 0, p_temporary: float = 0.03, p_permanent: float = 0.02) -> OperatorProfile:
    """A profile with no latency, for tests about outcomes rather than timing."""
    return OperatorProfile(
        latency_ms_median=0.0,
        latency_ms_p99=0.0,
        seed=seed,
        p_temporary=p_temporary,
        p_permanent=p_permanent,
    )


def sms(n: int = 1) -> OutboundSms:
    return OutboundSms(
        id=f"m{n}",
        account_id=1,
        to="+447900000001",
        sender="smsgw",
        text="hello",
        segments=1,
        price=5,
        express=False,
        created_at=0.0,
    )


async def send_many(operator: SimulatedOperator, n: int) -> list[SendResult]:
    return [await operator.send(sms(i), f"k{i}") for i in range(n)]


def test_is_a_provider() -> None:
    provider: Provider = SimulatedOperator(OperatorProfile(name="op-a"))
    assert provider.name == "op-a"


async def test_outcome_mix_over_10k_sends() -> None:
    operator = SimulatedOperator(instant(seed=7))
    results = await send_many(operator, 10_000)

    kinds = [r.kind for r in results]
    # Binomial standard deviations are ~22 (sent), 17 (temporary), 14 (permanent): 100 is ~5 sd.
    assert abs(kinds.count("sent") - 9_500) < 100
    assert abs(kinds.count("temporary") - 300) < 100
    assert abs(kinds.count("permanent") - 200) < 100
    stats = operator.stats()
    assert stats["sends"] == 10_000
    assert stats["sent"] == kinds.count("sent")
    assert stats["temporary"] == kinds.count("temporary")
    assert stats["permanent"] == kinds.count("permanent")
    assert stats["duplicates_suppressed"] == 0

    sent_ids = [r.operator_message_id for r in results if r.kind == "sent"]
    assert all(i is not None and i.startswith("sim-") for i in sent_ids)
    assert len(set(sent_ids)) == len(sent_ids)
    assert {r.reason for r in results if r.kind == "temporary"} <= set(TEMPORARY_REASONS)
    assert {r.reason for r in results if r.kind == "permanent"} <= set(PERMANENT_REASONS)
    assert all(r.reason is None for r in results if r.kind == "sent")


async def test_same_seed_same_outcomes_other_seed_differs() -> None:
    first = await send_many(SimulatedOperator(instant(seed=42)), 2_000)
    again = await send_many(SimulatedOperator(instant(seed=42)), 2_000)
    other = await send_many(SimulatedOperator(instant(seed=43)), 2_000)

    assert first == again
    assert [r.kind for r in first] != [r.kind for r in other]


async def test_outcomes_do_not_depend_on_the_latency_profile(
    autojump_clock: trio.abc.Clock,
) -> None:
    no_delay = await send_many(SimulatedOperator(instant(seed=3)), 500)
    slow = await send_many(SimulatedOperator(OperatorProfile(seed=3, latency_ms_median=50)), 500)

    assert no_delay == slow


async def test_a_sent_key_is_answered_again_without_a_new_send() -> None:
    operator = SimulatedOperator(instant(p_temporary=0.0, p_permanent=0.0))

    first = await operator.send(sms(), "key-1")
    second = await operator.send(sms(), "key-1")

    assert first.kind == "sent"
    assert second == first
    assert operator.stats()["sends"] == 1
    assert operator.stats()["sent"] == 1
    assert operator.stats()["duplicates_suppressed"] == 1


async def test_failed_keys_are_not_remembered() -> None:
    operator = SimulatedOperator(instant(p_temporary=1.0, p_permanent=0.0))

    first = await operator.send(sms(), "key-1")
    second = await operator.send(sms(), "key-1")

    assert first.kind == second.kind == "temporary"
    assert operator.stats()["sends"] == 2
    assert operator.stats()["duplicates_suppressed"] == 0


async def test_concurrent_sends_of_one_key_deliver_once(autojump_clock: trio.abc.Clock) -> None:
    operator = SimulatedOperator(OperatorProfile(p_temporary=0.0, p_permanent=0.0))
    results: list[SendResult] = []

    async def attempt() -> None:
        results.append(await operator.send(sms(), "key-1"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(attempt)

    assert len(set(results)) == 1
    assert operator.stats()["sent"] == 1
    assert operator.stats()["duplicates_suppressed"] == 4


async def test_dedupe_memory_is_bounded_and_forgets_the_oldest() -> None:
    profile = instant(p_temporary=0.0, p_permanent=0.0)
    operator = SimulatedOperator(profile, remember=2)

    for key in ("a", "b", "c"):
        await operator.send(sms(), key)
    await operator.send(sms(), "c")  # still remembered
    await operator.send(sms(), "a")  # evicted by "c": a fresh send

    assert operator.stats()["sent"] == 4
    assert operator.stats()["duplicates_suppressed"] == 1


async def test_a_cancelled_send_never_reached_the_operator(autojump_clock: trio.abc.Clock) -> None:
    operator = SimulatedOperator(OperatorProfile(p_temporary=0.0, p_permanent=0.0))

    with trio.move_on_after(0.001):  # far below the 20 ms median: the send is cut short
        await operator.send(sms(), "key-1")
    retried = await operator.send(sms(), "key-1")

    assert retried.kind == "sent"
    stats = operator.stats()
    assert (stats["cancelled"], stats["sends"], stats["duplicates_suppressed"]) == (1, 1, 0)


async def test_latency_percentiles_in_virtual_time(autojump_clock: trio.abc.Clock) -> None:
    operator = SimulatedOperator(OperatorProfile(latency_ms_median=20.0, latency_ms_p99=80.0))
    latencies_ms: list[float] = []

    async def timed(i: int) -> None:
        started = trio.current_time()
        await operator.send(sms(i), f"k{i}")
        latencies_ms.append((trio.current_time() - started) * 1000.0)

    async with trio.open_nursery() as nursery:
        for i in range(5_000):
            nursery.start_soon(timed, i)

    cuts = statistics.quantiles(latencies_ms, n=100)
    assert cuts[49] == pytest.approx(20.0, rel=0.1)  # median
    assert cuts[98] == pytest.approx(80.0, rel=0.25)  # p99: fewer samples out there
    assert min(latencies_ms) > 0.0


@pytest.mark.parametrize(
    "fields",
    [
        {"p_temporary": 0.6, "p_permanent": 0.5},
        {"p_temporary": -0.1},
        {"latency_ms_median": 50.0, "latency_ms_p99": 10.0},
        {"latency_ms_median": 0.0, "latency_ms_p99": 10.0},
    ],
)
def test_impossible_profiles_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OperatorProfile(**fields)  # type: ignore[arg-type]


async def test_an_outage_window_fails_every_attempt_for_now(autojump_clock: trio.abc.Clock) -> None:
    operator = SimulatedOperator(
        OperatorProfile(latency_ms_median=0.0, latency_ms_p99=0.0, p_temporary=0.0,
                        p_permanent=0.0, outages=((10.0, 20.0),)),
        origin=trio.current_time(),
    )  # fmt: skip
    before = await operator.send_batch([sms(1), sms(2)])
    await trio.sleep(10.0)
    during = await operator.send_batch([sms(3), sms(4)])
    await trio.sleep(10.0)
    after = await operator.send_batch([sms(5)])
    assert [r.kind for r in before] == ["sent", "sent"]
    assert [(r.kind, r.reason) for r in during] == [("temporary", "operator_unavailable")] * 2
    assert [r.kind for r in after] == ["sent"]


async def test_a_throughput_cap_queues_batches_on_the_link(autojump_clock: trio.abc.Clock) -> None:
    """At 100 segments a second, two batches of 50 one-segment messages sent at once are
    answered after 0.5 s and 1 s."""
    operator = SimulatedOperator(
        OperatorProfile(latency_ms_median=0.0, latency_ms_p99=0.0, max_per_second=100.0)
    )
    started = trio.current_time()
    done: list[float] = []

    async def send(first: int) -> None:
        await operator.send_batch([sms(first + i) for i in range(50)])
        done.append(trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, 0)
        nursery.start_soon(send, 100)
    assert sorted(done) == pytest.approx([0.5, 1.0])


def test_profiles_refuse_bad_caps_and_windows() -> None:
    with pytest.raises(ValueError):
        OperatorProfile(max_per_second=-1.0)
    with pytest.raises(ValueError):
        OperatorProfile(outages=((5.0, 5.0),))


async def test_a_backed_up_link_throttles_at_once(autojump_clock: trio.abc.Clock) -> None:
    """Past `max_queue_s` behind, a batch is refused for now without waiting or queueing."""
    operator = SimulatedOperator(
        OperatorProfile(latency_ms_median=0.0, latency_ms_p99=0.0, p_temporary=0.0,
                        p_permanent=0.0, max_per_second=10.0, max_queue_s=1.0)
    )  # fmt: skip
    results: dict[str, list[SendResult]] = {}
    started = trio.current_time()

    async def send(name: str, first: int, n: int) -> None:
        results[name] = await operator.send_batch([sms(first + i) for i in range(n)])
        results[name + " at"] = [SendResult("sent", str(trio.current_time() - started))]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, "long", 0, 20)  # two seconds of link
        await trio.sleep(0.5)
        nursery.start_soon(send, "refused", 100, 5)
    assert [r.kind for r in results["long"]] == ["sent"] * 20
    assert [(r.kind, r.reason) for r in results["refused"]] == [("temporary", "throttled")] * 5
    assert float(results["refused at"][0].operator_message_id or "nan") == pytest.approx(0.5)
    stats = operator.stats()
    # The refused batch counts as throttled; the long one queued its whole two seconds.
    assert stats["throttled"] == 5
    assert stats["link_queue_max_s"] == pytest.approx(2.0)
