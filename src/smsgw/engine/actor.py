"""Actor primitives: a bounded inbox, a handle to it, and one-shot replies for `ask`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio

M = TypeVar("M")
M_contra = TypeVar("M_contra", contravariant=True)
R = TypeVar("R")


class InboxFull(Exception):
    """An actor's inbox is at capacity: the caller should shed load (HTTP 503 + Retry-After)."""

    def __init__(self, actor: str, capacity: int) -> None:
        super().__init__(f"inbox of {actor!r} is full ({capacity} messages)")
        self.actor = actor
        self.capacity = capacity


class AskTimeout(Exception):
    """`ask` got no reply before its deadline."""

    def __init__(self, actor: str, timeout: float) -> None:
        super().__init__(f"{actor!r} did not reply within {timeout:.3f}s")
        self.actor = actor


class Reply(Generic[R]):
    """A one-shot answer slot: the actor calls `set` or `fail` once (later calls are ignored);
    the asker awaits `wait`. A waiter that is cancelled gives up; the answer is kept."""

    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: R | None = None
        self._error: BaseException | None = None

    def set(self, value: R) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> R:
        """The answer, once given (at once if it was); raises the error given to `fail`."""
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Inbox(Generic[M]):
    """A bounded FIFO owned by one actor. It outlives restarts of the actor that reads it."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self._send, self._receive = trio.open_memory_channel[M](capacity)

    @property
    def depth(self) -> int:
        return self._send.statistics().current_buffer_used

    def handle(self) -> ActorRef[M]:
        return ActorRef(self)

    def put_nowait(self, message: M) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise InboxFull(self.name, self.capacity) from None

    async def put(self, message: M) -> None:
        """Wait for room: for actor-to-actor flow control, never for request handlers.

        When there is room it returns without a checkpoint: on hot paths a task switch per
        message costs more than the work (DESIGN.md: ~21 µs against ~1 µs).
        """
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            await self._send.send(message)

    async def get(self) -> M:
        return await self._receive.receive()

    def get_nowait(self) -> M | None:
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            return None

    async def get_batch(self, limit: int, weight: Callable[[M], int] | None = None) -> list[M]:
        """Wait for one message, then take whatever else is already waiting while the batch
        weighs less than `limit` (by `weight`, default 1 a message; the last one taken may
        carry it over).

        This is how batching actors amortise a task switch (and a database round trip) over
        many messages.
        """
        first = await self._receive.receive()
        rest = limit - (1 if weight is None else weight(first))
        return [first, *self.get_batch_nowait(rest, weight)]

    def get_batch_nowait(self, limit: int, weight: Callable[[M], int] | None = None) -> list[M]:
        """What is waiting, while the batch weighs less than `limit`; never waits."""
        batch: list[M] = []
        total = 0
        while total < limit:
            try:
                message = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            batch.append(message)
            total += 1 if weight is None else weight(message)
        return batch


class ShardedInbox(Generic[M]):
    """Several inboxes behind one address: `key(message) % shards` picks the shard.

    For an actor that runs one loop per shard and wants all messages about one key (an
    account) handled by the same loop, in order.
    """

    def __init__(self, name: str, shards: int, capacity: int, key: Callable[[M], int]) -> None:
        self.name = name
        self.shards = [Inbox[M](f"{name}[{i}]", capacity) for i in range(shards)]
        self.capacity = capacity * shards
        self._key = key

    @property
    def depth(self) -> int:
        return sum(shard.depth for shard in self.shards)

    def handle(self) -> ActorRef[M]:
        return ActorRef(self)

    def _shard(self, message: M) -> Inbox[M]:
        return self.shards[self._key(message) % len(self.shards)]

    def put_nowait(self, message: M) -> None:
        self._shard(message).put_nowait(message)

    async def put(self, message: M) -> None:
        await self._shard(message).put(message)


class Address(Protocol[M_contra]):
    """Where an ActorRef puts messages: an inbox, or several behind one address. (An
    account's queue of work is a `Mailbox`, engine/mailboxes.py: another thing.)"""

    @property
    def name(self) -> str: ...

    def put_nowait(self, message: M_contra) -> None: ...

    async def put(self, message: M_contra) -> None: ...


class InboxGauge(Protocol):
    """What the supervisor's status shows of an inbox."""

    @property
    def depth(self) -> int: ...

    @property
    def capacity(self) -> int: ...


class ActorRef(Generic[M]):
    """How other parts reach an actor: they never touch its state, only its inbox."""

    __slots__ = ("_inbox",)

    def __init__(self, inbox: Address[M]) -> None:
        self._inbox = inbox

    @property
    def name(self) -> str:
        return self._inbox.name

    def tell_nowait(self, message: M) -> None:
        """Enqueue or raise `InboxFull` at once; never blocks."""
        self._inbox.put_nowait(message)

    async def tell(self, message: M) -> None:
        await self._inbox.put(message)

    async def ask(self, build: Callable[[Reply[R]], M], timeout: float = math.inf) -> R:
        """Send the message `build(reply)` and wait for its reply.

        Raises `InboxFull` at once when the inbox is full, and `AskTimeout` when no reply comes
        within `timeout` seconds. On cancellation the message may still be processed; the reply
        is then dropped.
        """
        reply: Reply[R] = Reply()
        self._inbox.put_nowait(build(reply))
        # A bare CancelScope, not move_on_after: this runs once per request, and the
        # generator-based context manager costs more than the scope itself.
        with trio.CancelScope(deadline=trio.current_time() + timeout):
            return await reply.wait()
        raise AskTimeout(self._inbox.name, timeout)
