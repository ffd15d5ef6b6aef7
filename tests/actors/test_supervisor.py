"""The supervisor in virtual time: restart policies, backoff, intensity, shutdown, status."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import trio

from smsgw.engine.actor import Inbox
from smsgw.engine.supervisor import ChildSpec, Restart, Supervisor, SupervisorEscalation

Run = Callable[..., Awaitable[None]]


def scripted(script: list[str], starts: list[float]) -> Run:
    """A child that, on its nth start, does script[n] (the last step repeats):
    "crash" (raise after started), "early" (raise before started), "return", "serve"."""

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        step = script[min(len(starts), len(script) - 1)]
        starts.append(trio.current_time())
        if step == "early":
            raise OSError(f"not ready {len(starts)}")
        task_status.started()
        if step == "crash":
            raise ValueError(f"boom {len(starts)}")
        if step == "serve":
            await trio.sleep_forever()

    return run


def child(name: str, run: Run, restart: Restart = Restart.PERMANENT, **kw: Any) -> ChildSpec:
    return ChildSpec(name=name, run=run, restart=restart, **kw)


async def test_permanent_child_is_restarted_after_crashes(autojump_clock: Any) -> None:
    starts: list[float] = []
    sup = Supervisor("s", [child("a", scripted(["crash", "crash", "serve"], starts))])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(5)
        assert len(starts) == 3
        assert sup.restarts() == 2
        (status,) = sup.status().children
        assert status.state == "running"
        assert status.restarts == 2
        assert status.last_failure == "ValueError: boom 2"
        assert status.last_failure_at is not None
        await sup.shutdown(1.0)
    assert sup.status().state == "stopped"


async def test_permanent_child_that_returns_is_restarted(autojump_clock: Any) -> None:
    starts: list[float] = []
    sup = Supervisor("s", [child("a", scripted(["return", "serve"], starts))])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(1)
        assert len(starts) == 2
        assert sup.restarts() == 1
        assert sup.status().children[0].last_failure is None
        await sup.shutdown(1.0)


async def test_transient_child_that_returns_is_not_restarted(autojump_clock: Any) -> None:
    starts: list[float] = []
    sup = Supervisor("s", [child("a", scripted(["return"], starts), Restart.TRANSIENT)])
    with trio.fail_after(60):
        await sup.run()
    assert len(starts) == 1
    assert sup.restarts() == 0
    assert sup.status().children[0].state == "stopped"


async def test_transient_child_that_raises_is_restarted(autojump_clock: Any) -> None:
    starts: list[float] = []
    run = scripted(["crash", "crash", "return"], starts)
    sup = Supervisor("s", [child("a", run, Restart.TRANSIENT)])
    with trio.fail_after(60):
        await sup.run()
    assert len(starts) == 3
    assert sup.restarts() == 2
    (status,) = sup.status().children
    assert status.state == "stopped"
    assert status.last_failure == "ValueError: boom 2"


async def test_temporary_child_is_never_restarted(autojump_clock: Any) -> None:
    crashed: list[float] = []
    returned: list[float] = []
    sup = Supervisor(
        "s",
        [
            child("crashes", scripted(["crash"], crashed), Restart.TEMPORARY),
            child("returns", scripted(["return"], returned), Restart.TEMPORARY),
        ],
    )
    with trio.fail_after(60):
        await sup.run()
    assert (len(crashed), len(returned)) == (1, 1)
    assert sup.restarts() == 0
    states = [c.state for c in sup.status().children]
    assert states == ["failed", "stopped"]


async def test_past_the_intensity_run_escalates_and_cancels_siblings(autojump_clock: Any) -> None:
    starts: list[float] = []
    sibling_cancelled = trio.Event()

    async def sibling(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            sibling_cancelled.set()

    sup = Supervisor(
        "s",
        [child("steady", sibling), child("flaky", scripted(["crash"], starts))],
        max_restarts=3,
        within=10,
    )
    with pytest.raises(SupervisorEscalation) as info:
        await sup.run()
    assert info.value.child == "flaky"
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "boom 4"
    assert len(starts) == 4
    assert sup.restarts() == 3
    assert sibling_cancelled.is_set()
    assert sup.status().state == "failed"
    assert sup.status().children[1].state == "failed"


async def test_escalation_comes_out_of_a_nursery_as_one_member(autojump_clock: Any) -> None:
    sup = Supervisor("s", [child("flaky", scripted(["crash"], []))], max_restarts=1)
    with pytest.RaisesGroup(SupervisorEscalation):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)


async def test_restarts_spread_wider_than_the_window_do_not_escalate(autojump_clock: Any) -> None:
    starts: list[float] = []

    async def crash_every_6s(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        starts.append(trio.current_time())
        task_status.started()
        await trio.sleep(6)
        raise ValueError("tired")

    sup = Supervisor("s", [child("a", crash_every_6s)], max_restarts=1, within=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(60)
        await sup.shutdown(1.0)
    assert sup.restarts() >= 9
    # Each run lasted longer than `within`, so the backoff went back to its initial value.
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([6.05] * len(gaps))


async def test_backoff_doubles_up_to_its_maximum(autojump_clock: Any) -> None:
    starts: list[float] = []
    sup = Supervisor(
        "s",
        [child("a", scripted(["crash"], starts))],
        max_restarts=6,
        within=100,
        backoff_initial=0.05,
        backoff_max=0.4,
    )
    with pytest.raises(SupervisorEscalation):
        await sup.run()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.4, 0.4])


async def test_child_failing_before_started_is_restarted_without_hanging_startup(
    autojump_clock: Any,
) -> None:
    order: list[str] = []
    early: list[float] = []
    flaky = scripted(["early", "early", "serve"], early)

    async def first(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await flaky(task_status=task_status)

    async def second(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        order.append(f"second after {len(early)} starts of first")
        task_status.started()
        await trio.sleep_forever()

    sup = Supervisor("s", [child("first", first), child("second", second)])
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(sup.run)
        assert order == ["second after 3 starts of first"]
        assert sup.restarts() == 2
        assert sup.status().children[0].last_failure == "OSError: not ready 2"
        await sup.shutdown(1.0)


async def test_temporary_child_failing_before_started_does_not_hang_startup(
    autojump_clock: Any,
) -> None:
    sup = Supervisor(
        "s",
        [
            child("never", scripted(["early"], []), Restart.TEMPORARY),
            child("fine", scripted(["serve"], [])),
        ],
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(sup.run)
        assert [c.state for c in sup.status().children] == ["failed", "running"]
        await sup.shutdown(1.0)


async def test_shutdown_cancels_children_in_reverse_order_within_the_deadline(
    autojump_clock: Any,
) -> None:
    stopped: list[str] = []

    def graceful(name: str) -> Run:
        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.5)  # flush before going
                stopped.append(name)

        return run

    sup = Supervisor("s", [child(n, graceful(n)) for n in ("a", "b", "c")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        began = trio.current_time()
        await sup.shutdown(3.0)
        assert trio.current_time() - began <= 3.0
        assert stopped == ["c", "b", "a"]
    assert sup.restarts() == 0
    assert [c.state for c in sup.status().children] == ["stopped"] * 3
    assert sup.status().state == "stopped"


async def test_shutdown_returns_by_its_deadline_when_a_child_overruns(autojump_clock: Any) -> None:
    async def stubborn(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(100)

    sup = Supervisor("s", [child("stubborn", stubborn)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        began = trio.current_time()
        await sup.shutdown(2.0)
        assert trio.current_time() - began == pytest.approx(2.0)
    # run() returned once the child's own cleanup finished.
    assert trio.current_time() - began == pytest.approx(100.0)


async def test_shutdown_during_backoff_stops_restarting(autojump_clock: Any) -> None:
    starts: list[float] = []
    sup = Supervisor(
        "s",
        [child("a", scripted(["crash"], starts))],
        max_restarts=100,
        backoff_initial=10,
        backoff_max=10,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(1)
        assert sup.status().children[0].state == "restarting"
        await sup.shutdown(1.0)
    assert len(starts) == 1
    assert sup.status().children[0].state == "stopped"


async def test_status_reports_inbox_and_stats(autojump_clock: Any) -> None:
    inbox: Inbox[str] = Inbox("writer", 8)
    for message in ("x", "y", "z"):
        inbox.put_nowait(message)

    def broken_stats() -> dict[str, Any]:
        raise RuntimeError("nope")

    sup = Supervisor(
        "engine",
        [
            child("writer", scripted(["serve"], []), inbox=inbox, stats=lambda: {"batches": 4}),
            child("odd", scripted(["serve"], []), Restart.TRANSIENT, stats=broken_stats),
        ],
        max_restarts=7,
        within=30,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        status = sup.status()
        await sup.shutdown(1.0)
    assert (status.name, status.state, status.max_restarts, status.within_seconds) == (
        "engine",
        "running",
        7,
        30,
    )
    writer, odd = status.children
    assert (writer.state, writer.restart, writer.restarts) == ("running", "permanent", 0)
    assert (writer.inbox_depth, writer.inbox_capacity) == (3, 8)
    assert writer.stats == {"batches": 4}
    assert (odd.inbox_depth, odd.inbox_capacity, odd.restart) == (None, None, "transient")
    assert odd.stats == {"error": "RuntimeError: nope"}
    assert msgspec.json.decode(msgspec.json.encode(status))["children"][0]["inbox_depth"] == 3


async def test_child_raising_while_shut_down_is_recorded_not_raised(autojump_clock: Any) -> None:
    async def messy(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("cleanup failed")

    sup = Supervisor("s", [child("messy", messy)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.shutdown(1.0)
    (status,) = sup.status().children
    assert (status.state, status.restarts) == ("stopped", 0)
    assert status.last_failure == "RuntimeError: cleanup failed"


async def test_child_whose_tasks_raise_amid_cancellation_is_stopped_cleanly(
    autojump_clock: Any,
) -> None:
    async def fails_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("cleanup failed")

    async def messy(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One task raises while another lets Cancelled through: the group mixes both.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fails_on_cancel)
            nursery.start_soon(trio.sleep_forever)
            task_status.started()

    sup = Supervisor("s", [child("messy", messy)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.shutdown(1.0)
    (status,) = sup.status().children
    assert (status.state, status.restarts) == ("stopped", 0)
    assert status.last_failure is not None
    assert "cleanup failed" in status.last_failure


async def test_shutdown_before_run_makes_run_return_at_once(autojump_clock: Any) -> None:
    starts: list[float] = []
    sup = Supervisor("s", [child("a", scripted(["serve"], starts))])
    await sup.shutdown(1.0)
    with trio.fail_after(1):
        await sup.run()
    assert starts == []
