"""The interfaces the engine needs from the outside: a store and operators (Protocols)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from smsgw.engine.messages import AcceptResult, Account, OutboundSms, Outcome, SendResult


class Provider(Protocol):
    """An operator connection.

    `send_batch` submits a window of messages and returns one result per message, in order;
    each message's id is its idempotency key, so the operator can drop a repeat after a crash.
    It must honour trio cancellation: the pool times a batch out, and a cancelled batch counts
    as a temporary failure for every message in it.
    """

    @property
    def name(self) -> str: ...

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]: ...


class WriteGroup:
    """One group commit's work, in arrival order; the store does it in one transaction."""

    __slots__ = ("accepts", "creates", "outcomes", "topups")

    def __init__(self) -> None:
        self.accepts: list[tuple[Sequence[OutboundSms], bool]] = []
        self.outcomes: list[Outcome] = []
        self.topups: list[tuple[int, int]] = []
        self.creates: list[tuple[str, int, bytes]] = []


class GroupResult:
    __slots__ = ("accepts", "creates", "topups")

    def __init__(
        self,
        accepts: list[list[AcceptResult]],
        topups: list[int | None],
        creates: list[Account],
    ) -> None:
        self.accepts = accepts
        self.topups = topups
        self.creates = creates


class MessageStore(Protocol):
    """Durable state. Every write goes through `commit_group`, one transaction per call."""

    async def commit_group(self, group: WriteGroup) -> GroupResult: ...

    async def pending(self) -> list[OutboundSms]:
        """Every message not yet final, for Recovery."""
        ...


class Reads(Protocol):
    """What the HTTP front door reads directly (one query each; none is on the accept path)."""

    async def account_by_key_hash(self, key_hash: bytes) -> Account | None: ...

    async def account(self, account_id: int) -> Account | None: ...

    async def message(self, account_id: int, message_id: str) -> dict[str, Any] | None: ...

    async def ping(self) -> bool: ...
