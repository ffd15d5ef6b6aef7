"""Actor primitives: bounded inbox, tell_nowait when full, ask with a reply or a timeout."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from smsgw.engine.actor import ActorRef, AskTimeout, Inbox, InboxFull, Reply


class Ping:
    def __init__(self, n: int, reply: Reply[int]) -> None:
        self.n = n
        self.reply = reply


def test_tell_nowait_raises_inbox_full_naming_the_actor() -> None:
    inbox: Inbox[int] = Inbox("credit_writer", 2)
    ref = inbox.handle()
    ref.tell_nowait(1)
    ref.tell_nowait(2)
    assert inbox.depth == 2
    with pytest.raises(InboxFull, match="credit_writer") as caught:
        ref.tell_nowait(3)
    assert caught.value.actor == "credit_writer"
    assert caught.value.capacity == 2
    # The refused message was not enqueued; the others are untouched and in order.
    assert inbox.depth == 2
    assert [inbox.get_nowait(), inbox.get_nowait(), inbox.get_nowait()] == [1, 2, None]


def test_a_handle_names_its_actor() -> None:
    inbox: Inbox[int] = Inbox("scheduler", 1)
    ref = inbox.handle()
    assert isinstance(ref, ActorRef)
    assert ref.name == "scheduler"


async def serve_pings(inbox: Inbox[Ping], *, delay: float = 0.0) -> None:
    while True:
        ping = await inbox.get()
        await trio.sleep(delay)
        ping.reply.set(ping.n * 2)


async def test_ask_returns_the_reply(autojump_clock: trio.testing.MockClock) -> None:
    inbox: Inbox[Ping] = Inbox("doubler", 4)
    ref = inbox.handle()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_pings, inbox)
        assert await ref.ask(lambda reply: Ping(21, reply), timeout=1.0) == 42
        assert await ref.ask(lambda reply: Ping(5, reply)) == 10
        nursery.cancel_scope.cancel()


async def test_ask_waits_for_a_slow_reply_within_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Inbox[Ping] = Inbox("slow", 4)
    ref = inbox.handle()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_pings(inbox, delay=4.0))
        start = trio.current_time()
        assert await ref.ask(lambda reply: Ping(1, reply), timeout=5.0) == 2
        assert trio.current_time() - start == pytest.approx(4.0)
        nursery.cancel_scope.cancel()


async def test_ask_raises_ask_timeout_when_nobody_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Inbox[Ping] = Inbox("silent", 4)
    ref = inbox.handle()
    start = trio.current_time()
    with pytest.raises(AskTimeout, match="silent") as caught:
        await ref.ask(lambda reply: Ping(1, reply), timeout=30.0)
    assert caught.value.actor == "silent"
    assert trio.current_time() - start == pytest.approx(30.0)
    # The message was delivered; only the answer is missing.
    assert inbox.depth == 1


async def test_ask_raises_ask_timeout_when_the_reply_is_too_slow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Inbox[Ping] = Inbox("slow", 4)
    ref = inbox.handle()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_pings(inbox, delay=10.0))
        start = trio.current_time()
        with pytest.raises(AskTimeout):
            await ref.ask(lambda reply: Ping(1, reply), timeout=2.0)
        assert trio.current_time() - start == pytest.approx(2.0)
        nursery.cancel_scope.cancel()


async def test_ask_raises_inbox_full_at_once(autojump_clock: trio.testing.MockClock) -> None:
    inbox: Inbox[Ping] = Inbox("busy", 1)
    ref = inbox.handle()
    ref.tell_nowait(Ping(0, Reply()))
    start = trio.current_time()
    with pytest.raises(InboxFull, match="busy"):
        await ref.ask(lambda reply: Ping(1, reply), timeout=10.0)
    assert trio.current_time() == start


async def test_ask_raises_the_error_the_actor_fails_with(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Inbox[Ping] = Inbox("failing", 4)
    ref = inbox.handle()

    async def fail_all() -> None:
        while True:
            (await inbox.get()).reply.fail(ValueError("no such account"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail_all)
        with pytest.raises(ValueError, match="no such account"):
            await ref.ask(lambda reply: Ping(1, reply), timeout=1.0)
        nursery.cancel_scope.cancel()


async def test_a_reply_is_set_once() -> None:
    reply: Reply[int] = Reply()
    assert not reply.done
    reply.set(1)
    reply.set(2)
    reply.fail(RuntimeError("late"))
    assert reply.done
    assert await reply.wait() == 1


async def test_a_reply_set_before_the_wait_is_answered_at_once() -> None:
    reply: Reply[int] = Reply()
    reply.set(7)
    assert reply.done
    assert await reply.wait() == 7


async def test_a_reply_wakes_its_waiter(autojump_clock: trio.testing.MockClock) -> None:
    reply: Reply[int] = Reply()
    got: list[int] = []

    async def waiter() -> None:
        got.append(await reply.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1)
        assert got == []
        reply.set(3)
    assert got == [3]


async def test_an_answer_after_the_waiter_gave_up_wakes_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reply: Reply[int] = Reply()
    with trio.move_on_after(1) as scope:
        await reply.wait()
    assert scope.cancelled_caught
    reply.fail(RuntimeError("late"))  # nobody waits any more: nothing to wake
    assert reply.done
    with pytest.raises(RuntimeError, match="late"):
        await reply.wait()


async def test_every_waiter_of_a_reply_gets_the_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reply: Reply[int] = Reply()
    got: list[int] = []

    async def waiter() -> None:
        got.append(await reply.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.sleep(1)
        reply.set(5)
    assert got == [5, 5]


async def test_get_batch_takes_everything_waiting_up_to_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Inbox[int] = Inbox("writer", 10)
    for n in range(5):
        inbox.put_nowait(n)
    assert await inbox.get_batch(3) == [0, 1, 2]
    assert await inbox.get_batch(10) == [3, 4]
    assert inbox.depth == 0


async def test_get_batch_waits_for_the_first_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inbox: Inbox[int] = Inbox("writer", 10)

    async def arrive_later() -> None:
        await trio.sleep(3.0)
        inbox.put_nowait(7)
        inbox.put_nowait(8)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrive_later)
        start = trio.current_time()
        # Woken by the first message: the second, put in the same step, comes along.
        assert await inbox.get_batch(10) == [7, 8]
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_put_waits_for_room(autojump_clock: trio.testing.MockClock) -> None:
    inbox: Inbox[int] = Inbox("bounded", 1)
    inbox.put_nowait(1)

    async def take_later() -> None:
        await trio.sleep(2.0)
        assert inbox.get_nowait() == 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_later)
        start = trio.current_time()
        await inbox.put(2)
        assert trio.current_time() - start == pytest.approx(2.0)
    assert inbox.get_nowait() == 2
