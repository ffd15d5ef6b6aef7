"""Bulk hand-offs told to their owners at most every `linger` seconds, several groups' worth
in one NOTIFY transaction (GroupCommit tells this after each group commits).

A hand-off's NOTIFY only saves its message the wait for the owner's poll: the shard_inbox row
written with the message is the durable record. Told one group at a time, a node among two
paid a NOTIFY transaction for about every other accept at a light load, and its owner woke,
decoded and dispatched each alone: the most of what a second node cost (`bench nodes`). So
bulk hand-offs linger here: the first after a quiet spell goes at once (no delay at a light
load), those that come within `linger` of it wait for the next, which carries them all.
Express hand-offs never wait (GroupCommit sends them at once, with whatever waits here)."""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import asyncpg
import trio

from smsgw.engine.messages import OutboundSms
from smsgw.storage.database import Database
from smsgw.storage.payloads import handoff_notices

log = logging.getLogger("smsgw.storage")

NOTIFY = "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)"


async def _notify(conn: asyncpg.Connection, told: tuple[list[str], list[str]]) -> None:
    await conn.execute(NOTIFY, *told)


class HandoffAnnouncer:
    def __init__(self, db: Database, channel: str, linger: float) -> None:
        self.db = db
        self.channel = channel  # the schema's hand-off channel: each owner has its own of it
        self.linger = linger
        self._pending: dict[str, list[OutboundSms]] = {}
        self._wake = trio.Event()
        self._last = -math.inf
        self.counts = {"notifies": 0, "messages": 0, "failures": 0}

    def tell(self, handed: dict[str, list[OutboundSms]]) -> None:
        """Bulk messages just committed for their owners (owner -> messages)."""
        for owner, items in handed.items():
            if owner:  # '': a shard in transit, recovered by whoever takes it
                self._pending.setdefault(owner, []).extend(items)
        if self._pending:
            self._wake.set()

    def take(self) -> dict[str, list[OutboundSms]]:
        """What waits, for a NOTIFY that goes now (an express hand-off's)."""
        pending, self._pending = self._pending, {}
        return pending

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "waiting": sum(len(items) for items in self._pending.values())}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep_until(self._last + self.linger)
            pending = self.take()
            if not pending:
                continue  # an express hand-off took them
            self._last = trio.current_time()
            told = handoff_notices(self.channel, pending)
            try:
                await self.db.run(functools.partial(_notify, told=told))
            except Exception as exc:
                # The owners' polls claim them (shard_inbox) within their poll interval.
                self.counts["failures"] += 1
                log.warning("could not notify hand-offs (the owners' polls take them): %s", exc)
                continue
            self.counts["notifies"] += 1
            self.counts["messages"] += sum(len(items) for items in pending.values())
