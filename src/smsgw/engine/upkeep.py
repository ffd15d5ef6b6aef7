"""StoreUpkeep: the stored days of messages, kept by the node that holds the upkeep duty.

Messages are stored in one partition per UTC day (storage/partitions.py). About once an hour
the node on duty makes the partitions of the week ahead, drops the days past the retention
(never one that still holds a message not final), and redacts bodies past their redaction
age; every few seconds it gives the day being written new planner statistics once it has
grown several times since its last. The duty goes with the lease of shard 0 (engine/shards.py),
so exactly one live node does it, and another takes it over within a lease's ttl when that node
dies; a node alone (no leases) is always on duty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import trio

from smsgw.engine.ports import UpkeepStore

log = logging.getLogger("smsgw.upkeep")


class UpkeepConfig(msgspec.Struct, frozen=True):
    # Whole UTC days older than this are dropped (`serve --retention-days`).
    retention_days: int = 90
    # Bodies of final messages older than this many days are emptied; 0: never
    # (`serve --redact-after-days`).
    redact_after_days: int = 0
    every_s: float = 3_600.0
    # Bodies redacted per round at most: a first round after a long time off (or with
    # redaction just turned on) spreads its work over the rounds that follow rather than
    # running for hours. An hour at 100M messages a day is 4.2M: this keeps up with twice that.
    redact_per_round: int = 10_000_000
    # How often the days being written are looked at for new planner statistics.
    statistics_every_s: float = 2.0


class StoreUpkeep:
    """Runs a round at start and then every `every_s` seconds while `on_duty()`; a round that
    fails (PostgreSQL away) is logged and done again at the next tick."""

    def __init__(
        self,
        store: UpkeepStore,
        config: UpkeepConfig,
        on_duty: Callable[[], bool],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.config = config
        self._on_duty = on_duty
        self._clock = clock
        self.rounds = 0
        self.added = 0
        self.dropped = 0
        self.kept: list[str] = []  # past the retention, kept for a pending message
        self.redacted = 0
        self.analyzed = 0
        self.last_error: str | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "partitions_added": self.added,
            "partitions_dropped": self.dropped,
            "partitions_kept": list(self.kept),
            "bodies_redacted": self.redacted,
            "partitions_analyzed": self.analyzed,
            "last_error": self.last_error,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._statistics)
            while True:
                if self._on_duty():
                    await self.round()
                # Checked again soon while off duty: a node that takes the duty over does
                # the round within a minute rather than an hour.
                await trio.sleep(self.config.every_s if self._on_duty() else 60.0)

    async def _statistics(self) -> None:
        """Every few seconds on duty: the partitions of today and yesterday (the moments
        after a midnight) get new planner statistics once they have grown several times
        since their last (storage/partitions.py says why)."""
        while True:
            await trio.sleep(self.config.statistics_every_s)
            if not self._on_duty():
                continue
            today = datetime.fromtimestamp(self._clock(), UTC).date()
            try:
                grown = await self._store.analyze_grown([today - timedelta(days=1), today])
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("statistics of the days being written: %s", self.last_error)
                continue
            self.analyzed += len(grown)

    async def round(self) -> None:
        """Partitions ahead, retention, redaction, in that order."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        try:
            self.added += len(await self._store.add_partitions())
            before = now.date() - timedelta(days=self.config.retention_days)
            result = await self._store.drop_partitions(before)
            self.dropped += len(result.dropped)
            self.kept = result.kept
            if self.config.redact_after_days > 0:
                self.redacted += await self._store.redact_bodies(
                    now - timedelta(days=self.config.redact_after_days),
                    self.config.redact_per_round,
                )
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("store upkeep failed (tried again next round): %s", self.last_error)
        self.rounds += 1
