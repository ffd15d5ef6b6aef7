"""MemStore, the in-memory MessageStore of virtual-time runs: the same credit rules as PgStore."""

from __future__ import annotations

from smsgw.engine.messages import OutboundSms, Outcome
from smsgw.engine.ports import WriteGroup
from smsgw.sim.memstore import MemStore


def sms(n: int, account_id: int, price: int = 5, segments: int = 1) -> OutboundSms:
    return OutboundSms(
        id=f"m{n}", account_id=account_id, to="+4915100000000", sender="S", text="t",
        segments=segments, price=price, express=False, created_at=0.0,
    )  # fmt: skip


def outcome(message: OutboundSms, status: str) -> Outcome:
    return Outcome(
        sms=message, status=status, operator="op", operator_message_id=None,  # type: ignore[arg-type]
        reason=None if status == "sent" else "invalid_destination", attempts=1, at=1.0,
    )  # fmt: skip


async def commit(store: MemStore, accepts=(), outcomes=()) -> list[list[bool]]:  # type: ignore[no-untyped-def]
    group = WriteGroup()
    group.accepts.extend(accepts)
    group.outcomes.extend(outcomes)
    result = await store.commit_group(group)
    return [[r.accepted for r in rs] for rs in result.accepts]


async def test_holds_stop_at_the_first_refusal_and_atomic_is_all_or_none() -> None:
    store = MemStore(cost=None)
    a = store.add_account("a", 12).id
    assert await commit(store, [([sms(1, a), sms(2, a), sms(3, a)], False)]) == [
        [True, True, False]
    ]
    assert store.credit[a].balance == 2 and store.credit[a].held == 10
    assert await commit(store, [([sms(4, a, price=1), sms(5, a, price=5)], True)]) == [
        [False, False]
    ]
    assert store.credit[a].balance == 2
    assert len(await store.pending()) == 2


async def test_an_outcome_applies_once_capture_or_release() -> None:
    store = MemStore(cost=None)
    a = store.add_account("a", 100).id
    one, two = sms(1, a, price=7, segments=3), sms(2, a, price=5)
    await commit(store, [([one, two], False)])
    await commit(store, outcomes=[outcome(one, "sent"), outcome(two, "failed")])
    await commit(store, outcomes=[outcome(one, "sent"), outcome(two, "sent")])  # repeats: ignored
    credit = store.credit[a]
    assert (credit.balance, credit.held, credit.captured) == (93, 0, 7)
    assert store.final == {("sent", ""): 3, ("failed", "invalid_destination"): 1}
    assert store.ledger[a].capture_n == 3 and store.ledger[a].release == 5
    assert store.broken_accounts() == {}
    assert await store.pending() == []


async def test_unknown_accounts_and_duplicate_client_refs_are_refused() -> None:
    store = MemStore(cost=None)
    a = store.add_account("a", 100).id
    first = OutboundSms(id="x1", account_id=a, to="+491", sender="S", text="t", segments=1,
                        price=5, express=False, created_at=0.0, client_ref="ref")  # fmt: skip
    again = OutboundSms(id="x2", account_id=a, to="+491", sender="S", text="t", segments=1,
                        price=5, express=False, created_at=0.0, client_ref="ref")  # fmt: skip
    assert await commit(store, [([first], False)]) == [[True]]
    assert await commit(store, [([again], False), ([sms(9, 999)], False)]) == [[False], [False]]
    assert store.credit[a].balance == 95 and store.broken_accounts() == {}


async def test_pages_follow_each_accounts_queue_after_the_cursor() -> None:
    """page_entries as PgStore's: per account, queued bulk after the cursor, in (created_at,
    id) order, finished and express messages left out."""
    import msgspec

    from smsgw.engine.ports import entry_of

    store = MemStore(cost=None)
    a = store.add_account("a", 1_000).id
    b = store.add_account("b", 1_000).id
    # Committed out of order; m4 is express.
    mine = [msgspec.structs.replace(sms(n, a), created_at=float(10 - n)) for n in range(1, 6)]
    mine[3] = msgspec.structs.replace(mine[3], express=True)
    theirs = [sms(n, b) for n in range(6, 8)]
    await commit(store, [(mine, False), (theirs, False)])
    await commit(store, outcomes=[outcome(mine[1], "sent")])  # m2 is final
    queue = sorted(entry_of(m) for m in (mine[0], mine[2], mine[4]))
    assert queue[0][1] == "m5"
    pages = await store.page_entries([(a, (-1, ""), 10), (a, queue[0][:2], 1), (b, (-1, ""), 1)])
    assert pages == [queue, queue[1:2], [entry_of(theirs[0])]]
