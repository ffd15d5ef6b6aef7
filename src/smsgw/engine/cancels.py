"""Which messages this node must not send because their account cancelled them: the pool's
last gate before an operator (POST /v1/messages/{id}/cancel)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

CancelState = Literal["deciding", "cancelled"]


class Cancels:
    """The cancels begun on this node. PostgreSQL decides a cancel (only a `queued` row is
    cancelled); this says what the pool does meanwhile and after: a message whose cancel is
    being decided waits (the pool sends it back through the RetryTimer), a cancelled one is
    dropped unsent. The HTTP handler asks `begin` only when the message is neither in flight
    at the pool nor has an outcome waiting for its commit (`too_late`), with no await between,
    so on this node a message is either past the point of no return (the cancel answers 409)
    or cannot reach an operator until the store has decided.

    Cancelled ids are kept for the message still waiting somewhere on this node (a
    mailbox, a retry), at most `keep` of them, oldest forgotten first: one forgotten that
    is dispatched later reaches the operator, and its `sent` finds the row final, so it
    stays `cancelled` and uncharged."""

    def __init__(self, *, keep: int = 100_000) -> None:
        self._deciding: dict[str, int] = {}  # id -> cancels of it under way
        # Outcomes the pool handed to the writer and not yet committed: the row is still
        # `queued`, but the operator has answered, so it is too late to cancel.
        self._settling: set[str] = set()
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._keep = keep

    def settling(self, message_id: str) -> None:
        """The pool handed an outcome of `message_id` to the writer."""
        self._settling.add(message_id)

    def settled(self, message_id: str) -> None:
        """An outcome of `message_id` was committed (or there was none from the pool)."""
        self._settling.discard(message_id)

    def too_late(self, message_id: str) -> bool:
        """Whether an outcome of `message_id` awaits its commit."""
        return message_id in self._settling

    def begin(self, message_id: str) -> None:
        """A cancel of `message_id` is being decided: the pool holds it back until `end`."""
        self._deciding[message_id] = self._deciding.get(message_id, 0) + 1

    def end(self, message_id: str, *, cancelled: bool) -> None:
        """The store decided (or could not: `cancelled` False, and the message goes on)."""
        left = self._deciding.pop(message_id, 1) - 1
        if left > 0:
            self._deciding[message_id] = left
        if cancelled:
            self._cancelled[message_id] = None
            if len(self._cancelled) > self._keep:
                self._cancelled.popitem(last=False)

    def state(self, message_id: str) -> CancelState | None:
        """What the pool must do with `message_id`: hold it back, drop it, or (None) send."""
        if message_id in self._cancelled:
            return "cancelled"
        if message_id in self._deciding:
            return "deciding"
        return None

    def stats(self) -> dict[str, int]:
        return {
            "deciding": len(self._deciding),
            "cancelled_kept": len(self._cancelled),
            "settling": len(self._settling),
        }
