"""Scheduled sends, the pure rules: which `send_at` is taken, validity counted from it, and
MemStore's promotion (the virtual runs' stand-in for PostgreSQL's)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest
import trio

from smsgw.engine.messages import OutboundSms, Outcome
from smsgw.engine.ports import Promoted, WriteGroup, dispatch_shard, shard_of
from smsgw.engine.retry import RetryPolicy
from smsgw.http.problems import ProblemError
from smsgw.http.routes.messages import scheduled_time
from smsgw.sim.memstore import MemStore

NOW = 1_800_000_000.0
_ids = itertools.count()


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(NOW + seconds, UTC)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.5, NOW + 0.5),
        (3_600, NOW + 3_600),
        (30 * 86_400, NOW + 30 * 86_400),  # exactly 30 days ahead
        (0, None),  # now: sent at once
        (-59, None),  # a minute's slack for clocks that differ
        (-60, None),
    ],
)
def test_send_at_taken(seconds: float, expected: float | None) -> None:
    assert scheduled_time(at(seconds), NOW) == expected


@pytest.mark.parametrize("seconds", [-61, -86_400, 30 * 86_400 + 1, 365 * 86_400])
def test_send_at_refused_naming_the_field(seconds: float) -> None:
    with pytest.raises(ProblemError) as refused:
        scheduled_time(at(seconds), NOW)
    assert refused.value.status == 422
    assert refused.value.extra["field"] == "send_at"


def test_offsets_are_the_same_instant() -> None:
    tehran = timezone(timedelta(hours=3, minutes=30))
    when = datetime(2027, 3, 21, 9, 0, tzinfo=tehran)
    assert when.astimezone(UTC).hour == 5 and when.astimezone(UTC).minute == 30
    assert scheduled_time(when, when.timestamp() - 10) == when.timestamp()
    assert scheduled_time(when.astimezone(UTC), when.timestamp() - 10) == when.timestamp()


def sms(
    account_id: int = 1,
    *,
    send_at: float | None = None,
    validity: int | None = None,
    shard: int | None = None,
    created_at: float = NOW,
) -> OutboundSms:
    return OutboundSms(
        id=f"m{next(_ids)}",
        account_id=account_id,
        to="+4915123456789",
        sender="t",
        text="x",
        segments=1,
        price=5,
        express=False,
        created_at=created_at,
        validity=validity,
        send_at=send_at,
        shard=shard,
    )


def test_validity_counts_from_send_at() -> None:
    policy = RetryPolicy(validity_s=86_400)
    assert policy.ends_at(sms()) == NOW + 86_400
    assert policy.ends_at(sms(send_at=NOW + 7_200)) == NOW + 7_200 + 86_400
    assert policy.ends_at(sms(send_at=NOW + 7_200, validity=60)) == NOW + 7_200 + 60


def commit(store: MemStore, items: list[OutboundSms]) -> None:
    group = WriteGroup()
    group.accepts.append((items, False))

    async def run() -> None:
        results = await store.commit_group(group)
        assert all(r.accepted for r in results.accepts[0])

    trio.run(run)


def test_memstore_promotes_due_messages_of_the_shards_asked_by_shard_then_time() -> None:
    store = MemStore(cost=None)
    a = store.add_account("a", 10_000).id
    b = store.add_account("b", 10_000).id
    assert shard_of(a) != shard_of(b)
    early = [sms(a, send_at=NOW + 10 + i) for i in range(5)]
    late = sms(a, send_at=NOW + 100)
    other = [sms(b, send_at=NOW + 10) for _ in range(3)]
    commit(store, [*reversed(early), late, *other])
    assert store.pending_count() == 9  # held and pending, every one
    assert trio.run(store.recover).backlogs == []  # none is queued yet

    async def promote(shards: list[int] | None, now: float, limit: int, per_shard: int) -> Promoted:
        mapping = None if shards is None else dict.fromkeys(shards, 1)
        return await store.promote_due(mapping, now, limit, per_shard)

    nothing = trio.run(promote, None, NOW + 5, 100, 100)
    assert nothing.messages == [] and nothing.next_due == NOW + 10
    only_a = trio.run(promote, [shard_of(a)], NOW + 20, 100, 3)
    assert [s.id for s in only_a.messages] == [s.id for s in early[:3]]  # earliest, capped
    assert only_a.next_due == NOW + 13  # the shard asked: b's are not its business
    rest = trio.run(promote, None, NOW + 20, 100, 100)
    assert {s.id for s in rest.messages} == {s.id for s in early[3:] + other}
    assert rest.next_due == NOW + 100
    assert trio.run(store.recover).backlogs == [(a, 5), (b, 3)]
    assert late.id in store.scheduled_ids


def test_memstore_ignores_an_outcome_for_a_scheduled_message() -> None:
    """Nothing can have sent a message still scheduled (PostgreSQL's outcome update takes
    only queued or sending rows)."""
    store = MemStore(cost=None)
    a = store.add_account("a", 10_000).id
    waiting = sms(a, send_at=NOW + 60)
    commit(store, [waiting])
    group = WriteGroup()
    group.outcomes.append(Outcome(waiting, "sent", "op", "x", None, 1, NOW))
    trio.run(store.commit_group, group)
    assert store.credit[a].captured == 0 and store.credit[a].held == 5
    assert store.broken_accounts() == {}
    assert dispatch_shard(waiting) == shard_of(a)
