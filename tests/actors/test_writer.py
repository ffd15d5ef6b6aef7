"""StoreWriter in virtual time: which requests share a group commit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio

from smsgw.engine.actor import Reply
from smsgw.engine.credit import CREDIT_MAX, TopUpTooLarge
from smsgw.engine.messages import (
    Accept,
    AcceptResult,
    DeliveryReport,
    DeliveryResult,
    OutboundSms,
    Outcome,
    RecordDeliveries,
    RecordOutcome,
    TopUp,
)
from smsgw.engine.ports import GroupResult, WriteGroup
from smsgw.engine.writer import StoreUnavailable, StoreWriter
from smsgw.sim.memstore import MemStore

COMMIT_S = 0.005


class RecordingStore:
    """Commits take COMMIT_S; records each group as (time, outcomes, accepted messages)."""

    def __init__(self) -> None:
        self.groups: list[tuple[float, int, int]] = []

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        await trio.sleep(COMMIT_S)
        accepted = sum(len(items) for items, _ in group.accepts)
        self.groups.append((trio.current_time(), len(group.outcomes), accepted))
        results = [[AcceptResult(True) for _ in items] for items, _ in group.accepts]
        return GroupResult(results, [], [])


def sms(i: int, *, account: int = 1, express: bool = False) -> OutboundSms:
    return OutboundSms(
        id=f"m{i}",
        account_id=account,
        to="+4915123456789",
        sender="t",
        text="x",
        segments=1,
        price=5,
        express=express,
        created_at=0.0,
    )


def outcome(i: int, *, account: int = 1, express: bool = False) -> RecordOutcome:
    message = sms(i, account=account, express=express)
    return RecordOutcome(Outcome(message, "sent", "op", f"op-{i}", None, 1, 0.0))


async def committed(messages: Sequence[OutboundSms]) -> None:
    pass


async def start(store: RecordingStore, nursery: trio.Nursery) -> StoreWriter:
    # One committer, so that every message below shares it.
    writer = StoreWriter(store, committed, committers=1, outcome_linger=0.02, outcome_group=50)
    await nursery.start(writer.run)
    return writer


async def test_bulk_outcomes_wait_for_each_other_up_to_the_linger(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = RecordingStore()
    async with trio.open_nursery() as nursery:
        writer = await start(store, nursery)
        t0 = trio.current_time()
        for i in range(10):  # one every 1 ms: all within one linger
            writer.ref.tell_nowait(outcome(i))
            await trio.sleep(0.001)
        await trio.sleep(0.1)
        # One group, committed a linger after the first outcome, not ten.
        assert [(round(t - t0, 3), n) for t, n, _ in store.groups] == [(0.025, 10)]
        t1 = trio.current_time()
        for i in range(120):  # a group of outcome_group rows or more commits at once
            writer.ref.tell_nowait(outcome(100 + i))
        await trio.sleep(0.1)
        assert [(round(t - t1, 3), n) for t, n, _ in store.groups[1:]] == [(0.005, 120)]
        nursery.cancel_scope.cancel()


async def test_an_accept_or_an_express_outcome_ends_the_linger_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = RecordingStore()
    async with trio.open_nursery() as nursery:
        writer = await start(store, nursery)
        t0 = trio.current_time()
        writer.ref.tell_nowait(outcome(1))
        await trio.sleep(0.002)
        reply: Reply[list[AcceptResult]] = Reply()
        writer.ref.tell_nowait(Accept((sms(2, account=2),), True, reply))
        assert (await reply.wait())[0].accepted
        # The accept did not wait out the outcome's linger: it went with it, at once.
        assert [(round(t - t0, 3), n, a) for t, n, a in store.groups] == [(0.007, 1, 1)]
        writer.ref.tell_nowait(outcome(3, express=True))
        await trio.sleep(0.1)
        assert store.groups[1][1] == 1 and round(store.groups[1][0] - t0, 3) == 0.012
        nursery.cancel_scope.cancel()


async def test_outcomes_waiting_when_the_loop_is_cancelled_commit_after_its_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = RecordingStore()
    writer = StoreWriter(store, committed, committers=1, outcome_linger=0.02, outcome_group=50)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.ref.tell_nowait(outcome(1))
        writer.ref.tell_nowait(outcome(2))
        await trio.sleep(0.005)  # both taken, waiting out the linger
        nursery.cancel_scope.cancel()
    assert store.groups == []  # nothing committed, nothing dropped: kept for the next group
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)  # the supervisor's restart of the run loop
        writer.ref.tell_nowait(outcome(3))
        await trio.sleep(0.1)
        assert sum(n for _, n, _ in store.groups) == 3
        nursery.cancel_scope.cancel()


class OverlapStore(RecordingStore):
    """Also records how many commits were under way at once, at most."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await super().commit_group(group)
        finally:
            self.running -= 1


def accept(first: int, count: int, account: int) -> tuple[Accept, Reply[list[AcceptResult]]]:
    reply: Reply[list[AcceptResult]] = Reply()
    items = tuple(sms(first + i, account=account) for i in range(count))
    return Accept(items, True, reply), reply


async def commit_one_on_the_first_committer(writer: StoreWriter) -> None:
    """Start a one-message group on account 1's committer (account 2 is on the other)."""
    first, _ = accept(0, 1, account=1)
    writer.ref.tell_nowait(first)
    await trio.lowlevel.checkpoint()


async def test_small_groups_of_two_committers_take_turns_and_large_ones_overlap(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = OverlapStore()
    writer = StoreWriter(store, committed, committers=2, parallel_rows=200)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        t0 = trio.current_time()
        await commit_one_on_the_first_committer(writer)
        replies = []
        for i in range(5):  # while the first commits, five more arrive for the other committer
            message, reply = accept(10 + i, 1, account=2)
            writer.ref.tell_nowait(message)
            replies.append(reply)
        for reply in replies:
            assert (await reply.wait())[0].accepted
        assert store.most == 1
        # The second committer's group waited for the first's commit, then took all five.
        assert [(round(t - t0, 3), a) for t, _, a in store.groups] == [(0.005, 1), (0.01, 5)]

        store.groups.clear()
        t1 = trio.current_time()
        big = [accept(100 + 300 * i, 300, account=1 + i) for i in range(2)]
        for message, _ in big:
            writer.ref.tell_nowait(message)
        for _, reply in big:
            assert all(r.accepted for r in await reply.wait())
        assert store.most == 2  # two batches of 300 rows commit side by side
        assert [(round(t - t1, 3), a) for t, _, a in store.groups] == [(0.005, 300)] * 2
        nursery.cancel_scope.cancel()


class WrittenEarlyStore(RecordingStore):
    """Says a group is written after COMMIT_S, and returns RETURN_S later (the trip back to
    the caller); records when each commit started."""

    RETURN_S = 0.003

    def __init__(self) -> None:
        super().__init__()
        self.started: list[float] = []

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        self.started.append(trio.current_time())
        await trio.sleep(COMMIT_S)
        assert group.written is not None
        group.written()
        group.written()  # a second call changes nothing
        accepted = sum(len(items) for items, _ in group.accepts)
        self.groups.append((trio.current_time(), len(group.outcomes), accepted))
        await trio.sleep(self.RETURN_S)
        return GroupResult(
            [[AcceptResult(True) for _ in items] for items, _ in group.accepts], [], []
        )


async def test_the_next_small_group_commits_once_the_store_says_the_last_is_written(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = WrittenEarlyStore()
    writer = StoreWriter(store, committed, committers=2, parallel_rows=200)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        t0 = trio.current_time()
        await commit_one_on_the_first_committer(writer)
        message, reply = accept(10, 1, account=2)
        writer.ref.tell_nowait(message)
        assert (await reply.wait())[0].accepted
        # The second group started when the first was written, not when it returned.
        assert [round(t - t0, 3) for t in store.started] == [0.0, COMMIT_S]
        # Each turn was given back once: a third group goes in at once, alone.
        message, reply = accept(20, 1, account=1)
        t1 = trio.current_time()
        writer.ref.tell_nowait(message)
        assert (await reply.wait())[0].accepted
        assert round(store.started[-1] - t1, 3) == 0.0
        assert writer._small_turn.value == 1
        nursery.cancel_scope.cancel()


async def test_a_group_waiting_for_its_turn_at_shutdown_is_answered_and_keeps_its_outcomes(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = OverlapStore()
    writer = StoreWriter(store, committed, committers=2, outcome_linger=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await commit_one_on_the_first_committer(writer)
        waiting, reply = accept(1, 1, account=2)
        writer.ref.tell_nowait(waiting)
        writer.ref.tell_nowait(outcome(2, account=2))
        await trio.sleep(0.001)  # the second committer holds both, waiting for its turn
        nursery.cancel_scope.cancel()
    with pytest.raises(StoreUnavailable, match="stopped before this group was committed"):
        await reply.wait()
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)  # restarted: the outcome goes with the next group
        writer.ref.tell_nowait(outcome(3, account=2))
        await trio.sleep(0.1)
        assert sum(n for _, n, _ in store.groups) == 2
        nursery.cancel_scope.cancel()


class FailingOnceStore(RecordingStore):
    """The first commit fails as if PostgreSQL were down; the rest commit."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        if not self.failed:
            self.failed = True
            raise OSError("connection refused")
        return await super().commit_group(group)


async def test_a_failed_commit_answers_its_callers_and_keeps_its_outcomes(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = FailingOnceStore()
    writer = StoreWriter(store, committed, committers=1, outcome_linger=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        message, reply = accept(0, 1, account=1)
        writer.ref.tell_nowait(message)
        writer.ref.tell_nowait(outcome(1))
        with pytest.raises(StoreUnavailable, match="could not commit: OSError"):
            await reply.wait()
        assert writer.failed_groups == 1 and store.groups == []
        again, reply = accept(2, 1, account=1)
        writer.ref.tell_nowait(again)
        assert (await reply.wait())[0].accepted
        # The failed group's outcome went with the next group; its accept did not.
        assert [(n, a) for _, n, a in store.groups] == [(1, 1)]
        nursery.cancel_scope.cancel()


async def test_a_topup_too_large_is_refused_alone_and_its_group_commits(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemStore(cost=None)
    sender = store.add_account("sender", 100)
    full = store.add_account("full", 0)
    store.credit[full.id].balance = store.credit[full.id].topped_up = CREDIT_MAX - 10
    store.ledger[full.id].topup = CREDIT_MAX - 10
    writer = StoreWriter(store, committed, committers=1, outcome_linger=0)
    accepted: Reply[list[AcceptResult]] = Reply()
    too_large: Reply[int | None] = Reply()
    fits: Reply[int | None] = Reply()
    # Told before the writer runs: one group.
    writer.ref.tell_nowait(Accept((sms(1, account=sender.id),), True, accepted))
    writer.ref.tell_nowait(TopUp(full.id, 11, too_large))
    writer.ref.tell_nowait(TopUp(full.id, 10, fits))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with pytest.raises(TopUpTooLarge):
            await too_large.wait()
        assert (await accepted.wait())[0].accepted
        assert await fits.wait() == CREDIT_MAX
        nursery.cancel_scope.cancel()
    assert writer.failed_groups == 0 and store.commits == 1
    assert store.credit[sender.id].held == 5
    assert store.credit[full.id].topped_up == CREDIT_MAX


class CommitsThenHangsStore(MemStore):
    """Issue 29: the first `hangs` groups are stored, then their answer never comes back in
    time (PostgreSQL committed; the client gave up waiting for the reply)."""

    def __init__(self, hangs: int = 1, *, store_first: bool = True) -> None:
        super().__init__(cost=None)
        self.hangs = hangs
        self.store_first = store_first

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        if self.hangs <= 0:
            return await super().commit_group(group)
        self.hangs -= 1
        if not self.store_first:
            await trio.sleep(3600)  # cancelled before it stores anything
        result = await super().commit_group(group)
        await trio.sleep(3600)
        return result


class Dispatched:
    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, messages: Sequence[OutboundSms]) -> None:
        self.ids.extend(s.id for s in messages)


async def test_a_commit_that_times_out_after_storing_dispatches_its_messages_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = CommitsThenHangsStore()
    account = store.add_account("a", 100)
    dispatched = Dispatched()
    writer = StoreWriter(store, dispatched, committers=1, outcome_linger=0, commit_timeout=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        reply: Reply[list[AcceptResult]] = Reply()
        batch = tuple(sms(i, account=account.id) for i in range(3))
        writer.ref.tell_nowait(Accept(batch, False, reply))
        # The caller gives up first (HTTP's accept_timeout is 10 s, the commit's 30 s).
        with trio.move_on_after(10):
            await reply.wait()
        assert dispatched.ids == []
        await trio.sleep(30)  # the writer's own timeout: the group's fate is in doubt
        assert dispatched.ids == ["m0", "m1", "m2"]
        assert [r.accepted for r in await reply.wait()] == [True, True, True]
        assert writer.doubtful_groups == writer.doubtful_committed == 1
        assert writer.in_doubt == []
        # Later groups commit and dispatch as usual; nothing is dispatched twice.
        later: Reply[list[AcceptResult]] = Reply()
        writer.ref.tell_nowait(Accept((sms(9, account=account.id),), False, later))
        assert (await later.wait())[0].accepted
        await trio.sleep(1)
        assert dispatched.ids == ["m0", "m1", "m2", "m9"]
        nursery.cancel_scope.cancel()
    assert store.credit[account.id].held == 20


async def test_a_commit_that_timed_out_before_storing_is_answered_unavailable(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = CommitsThenHangsStore(store_first=False)
    account = store.add_account("a", 100)
    dispatched = Dispatched()
    writer = StoreWriter(store, dispatched, committers=1, outcome_linger=0, commit_timeout=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        reply: Reply[list[AcceptResult]] = Reply()
        writer.ref.tell_nowait(Accept((sms(1, account=account.id),), False, reply))
        writer.ref.tell_nowait(outcome(5, account=account.id))
        with pytest.raises(StoreUnavailable):
            await reply.wait()
        assert dispatched.ids == [] and writer.doubtful_committed == 0
        # /ready's view: failing while commits fail, not once one succeeds.
        assert writer.commits_failing(failures=1) is not None
        again: Reply[list[AcceptResult]] = Reply()
        writer.ref.tell_nowait(Accept((sms(2, account=account.id),), False, again))
        assert (await again.wait())[0].accepted
        assert writer.commits_failing(failures=1) is None
        assert dispatched.ids == ["m2"]
        nursery.cancel_scope.cancel()
    assert store.credit[account.id].held == 5


async def test_commits_failing_turns_ready_again_after_a_quiet_while(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = FailingOnceStore()
    writer = StoreWriter(store, committed, committers=1, outcome_linger=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        message, reply = accept(0, 1, account=1)
        writer.ref.tell_nowait(message)
        with pytest.raises(StoreUnavailable):
            await reply.wait()
        assert writer.commits_failing(failures=1, within=10) is not None
        assert writer.commits_failing(failures=2, within=10) is None
        await trio.sleep(10)
        assert writer.commits_failing(failures=1, within=10) is None
        nursery.cancel_scope.cancel()


class KindsStore(RecordingStore):
    """Records what each group holds: outcomes, accepts, delivery reports."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[tuple[int, int, int]] = []

    async def commit_group(self, group: WriteGroup) -> GroupResult:
        result = await super().commit_group(group)
        reports = [list(r) for _, r in group.deliveries]
        self.kinds.append((len(group.outcomes), len(group.accepts), sum(map(len, reports))))
        answers = [[DeliveryResult(d.operator_message_id, "applied") for d in r] for r in reports]
        return GroupResult(result.accepts, [], [], answers)


async def test_delivery_reports_commit_in_a_group_of_their_own_after_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A statement of receipts after a statement of outcomes in one transaction made two
    committers deadlock (writer.py says how): the batch's receipts go in a group of their own,
    after the rest, so a `sent` and its receipt still apply in that order."""
    store = KindsStore()
    writer = StoreWriter(store, committed, committers=1, outcome_linger=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.ref.tell_nowait(outcome(1))
        message, accepted = accept(2, 1, account=1)
        writer.ref.tell_nowait(message)
        reports: Reply[list[DeliveryResult]] = Reply()
        receipt = DeliveryReport("op-1", "delivered")
        writer.ref.tell_nowait(RecordDeliveries("op", (receipt,), reports))
        assert (await accepted.wait())[0].accepted
        assert [r.result for r in await reports.wait()] == ["applied"]
        assert store.kinds == [(1, 1, 0), (0, 0, 1)]
        nursery.cancel_scope.cancel()
