"""StoreUpkeep in virtual time: rounds only on duty, hourly, with the retention's cutoff day
and the redaction's age; a failed round is tried again."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

import trio

from smsgw.engine.ports import Dropped
from smsgw.engine.upkeep import StoreUpkeep, UpkeepConfig

NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC).timestamp()


class FakeStore:
    """Records what it is asked; fails the first `failures` rounds."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[tuple[str, object]] = []

    async def add_partitions(self) -> list[str]:
        if self.failures:
            self.failures -= 1
            raise OSError("database away")
        self.calls.append(("add", None))
        return ["messages_20260317"]

    async def drop_partitions(self, before: date) -> Dropped:
        self.calls.append(("drop", before))
        return Dropped(dropped=["messages_20251209"], kept=["messages_20251201"])

    async def redact_bodies(self, before: datetime, limit: int) -> int:
        self.calls.append(("redact", before))
        return 3

    async def analyze_grown(self, days: Sequence[date]) -> list[str]:
        self.calls.append(("analyze", tuple(days)))
        return ["messages_20260310"]


async def test_rounds_run_hourly_on_duty_only(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore()
    duty = [False]
    upkeep = StoreUpkeep(store, UpkeepConfig(retention_days=90), lambda: duty[0], clock=lambda: NOW)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upkeep.run)
        await trio.sleep(3 * 3600)
        assert store.calls == []  # never on duty (nor its statistics)
        duty[0] = True
        await trio.sleep(61)  # taken over: a round within the minute
        assert upkeep.rounds == 1
        await trio.sleep(2 * 3600)
        assert upkeep.rounds == 3
        nursery.cancel_scope.cancel()
    # Whole days older than 90: the cutoff is the day 90 days before today; no redaction.
    assert ("drop", date(2025, 12, 10)) in store.calls
    assert not any(kind == "redact" for kind, _ in store.calls)
    assert ("analyze", (date(2026, 3, 9), date(2026, 3, 10))) in store.calls
    assert upkeep.stats()["partitions_dropped"] == 3
    assert upkeep.stats()["partitions_kept"] == ["messages_20251201"]


async def test_redaction_and_a_failed_round(autojump_clock: trio.abc.Clock) -> None:
    store = FakeStore(failures=1)
    upkeep = StoreUpkeep(store, UpkeepConfig(redact_after_days=30), lambda: True, clock=lambda: NOW)
    await upkeep.round()
    assert store.calls == [] and upkeep.last_error == "OSError: database away"
    await upkeep.round()
    assert ("redact", datetime(2026, 2, 8, 15, 30, tzinfo=UTC)) in store.calls
    assert upkeep.redacted == 3 and upkeep.rounds == 2


async def test_the_days_being_written_get_statistics_every_few_seconds_on_duty(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = FakeStore()
    duty = [True]
    config = UpkeepConfig(every_s=3600, statistics_every_s=2.0)
    upkeep = StoreUpkeep(store, config, lambda: duty[0], clock=lambda: NOW)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upkeep.run)
        await trio.sleep(10.5)
        # Yesterday's and today's partitions, every 2 s: the moments after a midnight too.
        asked = [days for kind, days in store.calls if kind == "analyze"]
        assert asked == [(date(2026, 3, 9), date(2026, 3, 10))] * 5
        assert upkeep.stats()["partitions_analyzed"] == 5
        duty[0] = False
        await trio.sleep(10)
        assert len([kind for kind, _ in store.calls if kind == "analyze"]) == 5
        nursery.cancel_scope.cancel()
