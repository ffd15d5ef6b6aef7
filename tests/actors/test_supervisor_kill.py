"""Supervisor.kill in virtual time: a killed child fails, and its restart policy decides."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from smsgw.engine.supervisor import ChildSpec, Restart, Supervisor, SupervisorEscalation


def serving(starts: list[float], cleaned: list[float]) -> Any:
    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        starts.append(trio.current_time())
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append(trio.current_time())

    return run


async def test_killed_permanent_child_is_restarted_and_says_why(autojump_clock: Any) -> None:
    starts: list[float] = []
    cleaned: list[float] = []
    other: list[float] = []
    sup = Supervisor(
        "s",
        [ChildSpec("a", serving(starts, cleaned)), ChildSpec("b", serving(other, []))],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        sup.kill("a", "chaos test")
        await trio.sleep(1)
        assert len(starts) == 2 and len(cleaned) == 1  # the old run was cancelled, cleanly
        assert len(other) == 1  # one_for_one: its sibling was not touched
        a, b = sup.status().children
        assert (a.state, a.restarts) == ("running", 1)
        assert a.last_failure == "ChildKilled: chaos test"
        assert a.last_failure_at is not None
        assert (b.state, b.restarts, b.last_failure) == ("running", 0, None)
        assert sup.restarts() == 1
        await sup.shutdown(1.0)
    assert sup.status().state == "stopped"


async def test_killed_temporary_child_stays_failed(autojump_clock: Any) -> None:
    starts: list[float] = []
    sup = Supervisor("s", [ChildSpec("a", serving(starts, []), restart=Restart.TEMPORARY)])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            sup.kill("a")
    (a,) = sup.status().children
    assert (a.state, a.restarts, a.last_failure) == ("failed", 0, "ChildKilled: killed")
    assert len(starts) == 1


async def test_killing_too_often_escalates(autojump_clock: Any) -> None:
    starts: list[float] = []
    sup = Supervisor("s", [ChildSpec("a", serving(starts, []))], max_restarts=2, within=60)

    async def chaos() -> None:
        for _ in range(3):
            await trio.sleep(5)  # past the backoff: running again
            sup.kill("a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chaos)
        with pytest.raises(SupervisorEscalation) as caught:
            await sup.run()
    assert caught.value.child == "a"
    assert len(starts) == 3


async def test_kill_names_a_child(autojump_clock: Any) -> None:
    sup = Supervisor("s", [ChildSpec("a", serving([], []))])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(KeyError):
            sup.kill("nobody")
        await sup.shutdown(1.0)
