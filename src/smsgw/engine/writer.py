"""StoreWriter: group commit of accepts, outcomes and top-ups, one transaction per group."""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, assert_never

import trio

from smsgw.engine.actor import ActorRef, Inbox, Reply, ShardedInbox
from smsgw.engine.credit import TopUpTooLarge
from smsgw.engine.histogram import GROUP_SIZE_BUCKETS, LATENCY_BUCKETS, Histogram
from smsgw.engine.messages import (
    Accept,
    AcceptResult,
    Account,
    CreateAccount,
    DeliveryResult,
    OutboundSms,
    Outcome,
    RecordAttempt,
    RecordDeliveries,
    RecordOutcome,
    TopUp,
    WriterFigures,
    WriterMessage,
)
from smsgw.engine.ports import CommitInDoubt, MessageStore, WriteGroup

log = logging.getLogger("smsgw.writer")

# What nobody waits for an answer to: a failed group's are carried into the next group.
Carried = RecordOutcome | RecordAttempt


def _account_of(message: WriterMessage) -> int:
    match message:
        case Accept(items=items):
            return items[0].account_id if items else 0
        case RecordOutcome(outcome=outcome):
            return outcome.sms.account_id
        case RecordAttempt(attempt=attempt):
            return attempt.sms.account_id
        case TopUp(account_id=account_id):
            return account_id
        case CreateAccount():
            return 0
        case RecordDeliveries(reports=reports):
            # DLRs take no account locks, so they are spread over the committers (one busy
            # operator's feed then uses every committer). Groups that share messages lock
            # them in one order (storage sorts the reports by key).
            return zlib.crc32(reports[0].operator_message_id.encode()) if reports else 0
        case _:
            assert_never(message)


def _is_bulk_outcome(message: WriterMessage) -> bool:
    """An outcome nobody waits for: a bulk message's (an express one may have a `"wait":
    true` request on it), or an attempt to record."""
    if isinstance(message, RecordAttempt):
        return True
    return isinstance(message, RecordOutcome) and not message.outcome.sms.express


def _refuse_topup(batch: list[WriterMessage], refused: TopUpTooLarge) -> list[WriterMessage]:
    """Answer the top-up `refused` names with it; the rest of `batch`. (Of two alike, which
    one is refused does not matter: they came at the same time.)"""
    for i, message in enumerate(batch):
        if (
            isinstance(message, TopUp)
            and message.account_id == refused.account_id
            and message.amount == refused.amount
        ):
            message.reply.fail(refused)
            return batch[:i] + batch[i + 1 :]
    raise AssertionError(f"the store refused a top-up the group does not hold: {refused}")


def _rows(message: WriterMessage) -> int:
    """How many rows a message writes: groups are bounded by rows, not requests."""
    if isinstance(message, Accept):
        return len(message.items)
    if isinstance(message, RecordDeliveries):
        return len(message.reports)
    return 1


class StoreUnavailable(Exception):
    """The group this request was in could not be committed; nothing of it was stored."""


class CommitFence:
    """The group commits under way, so that a reader of the store can wait for every group its
    query may have seen to have told the Scheduler of its messages.

    The Scheduler's pager needs it: a page query can see a group's rows once PostgreSQL has
    committed them, before the writer has handed them on. Processed first, such a page would
    read back messages that the Scheduler has not counted yet, and their hand-off would then
    queue them a second time.
    """

    def __init__(self) -> None:
        self._open: dict[int, trio.Event] = {}
        self._seq = 0

    def open(self) -> int:
        self._seq += 1
        self._open[self._seq] = trio.Event()
        return self._seq

    def close(self, seq: int) -> None:
        self._open.pop(seq).set()

    async def wait(self) -> None:
        """Until every group under way now has been handed on or has failed; groups that start
        later are not waited for. Cancellable at any point, with nothing to undo."""
        for done in list(self._open.values()):
            await done.wait()


class _Turn:
    """One committer's turn at committing a small group: ended once, by whichever comes
    first, the store saying the group is written or the commit returning."""

    __slots__ = ("_semaphore",)

    def __init__(self, semaphore: trio.Semaphore) -> None:
        self._semaphore: trio.Semaphore | None = semaphore

    def end(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None


class _Told:
    """The writer's address: its sharded inbox, with express outcomes shown to
    `on_express_told` as they go in (outcomes are told from few places: the pool, the
    Scheduler's expiry and `Engine.expire`)."""

    __slots__ = ("_writer",)

    def __init__(self, writer: StoreWriter) -> None:
        self._writer = writer

    @property
    def name(self) -> str:
        return self._writer.inbox.name

    def _tell(self, message: WriterMessage) -> None:
        hook = self._writer.on_express_told
        if hook is not None and isinstance(message, RecordOutcome) and message.outcome.sms.express:
            hook(message.outcome)

    def put_nowait(self, message: WriterMessage) -> None:
        self._writer.inbox.put_nowait(message)
        self._tell(message)

    async def put(self, message: WriterMessage) -> None:
        await self._writer.inbox.put(message)
        self._tell(message)


class StoreWriter:
    """Collects whatever requests are waiting, commits them in one transaction, then replies.

    While one group commits, the next one fills up: under load, groups grow by themselves and
    the per-request cost of PostgreSQL falls. `committers` groups may be in flight at once; the
    store locks account rows in id order, so they cannot deadlock each other.

    Credit (DESIGN.md's CreditActor) is decided here too, inside the same transaction, by the
    store's `CreditBook`: a hold must commit with its message row or not at all.
    """

    def __init__(
        self,
        store: MessageStore,
        on_committed: Callable[[Sequence[OutboundSms]], Awaitable[None]],
        *,
        capacity: int = 20_000,
        max_group: int = 2_000,
        committers: int = 2,
        commit_timeout: float = 30.0,
        outcome_linger: float = 0.02,
        outcome_group: int = 500,
        parallel_rows: int = 200,
        outcomes_committed: Callable[[str], None] | None = None,
    ) -> None:
        # One inbox and one commit loop per committer, partitioned by account: an account's
        # writes always go through the same committer, so committers never queue on each
        # other's row locks (one busy account would otherwise serialise them).
        self.inbox: ShardedInbox[WriterMessage] = ShardedInbox(
            "store_writer", committers, capacity, _account_of
        )
        self.ref: ActorRef[WriterMessage] = ActorRef(_Told(self))
        self.commits = CommitFence()
        self._store = store
        self._on_committed = on_committed
        # Told each outcome's message id once its group committed (engine/cancels.py).
        self._outcomes_committed = outcomes_committed
        self._max_group = max_group
        self._commit_timeout = commit_timeout
        self._outcome_linger = outcome_linger
        self._outcome_group = outcome_group
        # Small groups take turns: see _commit_loop.
        self._parallel_rows = parallel_rows
        self._small_turn = trio.Semaphore(1)
        self.failures = 0  # consecutive failed commits
        self.last_failure: str | None = None
        self.last_failure_at = -math.inf  # trio.current_time() of the last failed commit
        # Groups whose commit timed out or was lost half way, until the store says which of
        # their messages are stored; kept across restarts of the loops (see _settle_doubt).
        self.in_doubt: list[tuple[WriteGroup, list[WriterMessage], str]] = []
        self.doubtful_groups = 0  # in doubt at some point, in all
        self.doubtful_committed = 0  # of those, found committed (their messages dispatched)
        # Outcomes of a group that failed to commit: carried into the shard's next group,
        # never dropped.
        self._carry: dict[str, list[Carried]] = {i.name: [] for i in self.inbox.shards}
        self.groups = 0
        self.items = 0
        self.last_group_size = 0
        self.commit_ms_ewma = 0.0
        self.commit_ms_max = 0.0
        self.failed_groups = 0
        # For /metrics: rows per committed group, and each commit's time in seconds.
        self.group_rows = Histogram(GROUP_SIZE_BUCKETS)
        self.commit_seconds = Histogram(LATENCY_BUCKETS)
        # Credit decided in committed groups (DESIGN.md's CreditActor figures): messages held
        # (accepted), refused by reason, captured (sent) and released (failed), and top-ups.
        # An outcome delivered twice after a crash counts twice here; PostgreSQL ignores it.
        self.credit: dict[str, int] = {
            "held_messages": 0,
            "held_amount": 0,
            "captured_messages": 0,
            "captured_amount": 0,
            "released_messages": 0,
            "released_amount": 0,
            "topups": 0,
            "topup_amount": 0,
        }
        self.refused: dict[str, int] = {}  # reason -> messages refused a hold
        # Delivery reports committed, by (operator, result: applied/duplicate/conflict/unknown),
        # and messages moved by them, by status (delivered/undelivered).
        self.deliveries: dict[tuple[str, str], int] = {}
        self.delivered: dict[str, int] = {}
        # What others read of the writer (express admission, metrics, the console), after
        # each group.
        self.figures = WriterFigures(credit=dict(self.credit))
        # Told of every committed outcome (the `"wait": true` requests wait on it).
        self.on_outcomes: Callable[[Sequence[Outcome]], None] | None = None
        # Told of every express outcome as it is handed in, before its commit: while the
        # store is down a waiting request can still say on time what the operator did.
        self.on_express_told: Callable[[Outcome], None] | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "items": self.items,
            "last_group_size": self.last_group_size,
            "commit_ms_ewma": round(self.commit_ms_ewma, 3),
            "commit_ms_max": round(self.commit_ms_max, 3),
            "group_rows": self.group_rows.summary(),
            "commit_seconds": self.commit_seconds.summary(),
            "carried_outcomes": sum(len(c) for c in self._carry.values()),
            "failed_groups": self.failed_groups,
            "consecutive_failures": self.failures,
            "in_doubt": len(self.in_doubt),
            "doubtful_groups": self.doubtful_groups,
            "doubtful_committed": self.doubtful_committed,
            "last_failure": self.last_failure,
            "credit": {**self.credit, "refused": dict(self.refused)},
            "delivery_reports": {f"{o}/{r}": n for (o, r), n in sorted(self.deliveries.items())},
        }

    def commits_failing(self, *, failures: int = 1, within: float = 5.0) -> str | None:
        """Why this node should not take traffic now, or None: a group's fate is in doubt, or
        the last `failures` commits failed, the last of them less than `within` seconds ago.
        After `within` quiet seconds it is None again, so a node that no traffic reaches any
        more (a load balancer took it out) is tried again rather than left out for good."""
        if self.in_doubt:
            return f"{len(self.in_doubt)} group commit(s) in doubt: {self.last_failure}"
        if self.failures >= failures and trio.current_time() - self.last_failure_at < within:
            return f"the last {self.failures} group commits failed: {self.last_failure}"
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            # Groups left in doubt by a loop that was cancelled: settled again, fenced as
            # their commit was (the pager must not read their messages back meanwhile).
            doubts, self.in_doubt = self.in_doubt, []
            for group, batch, shard in doubts:
                nursery.start_soon(self._settle_fenced, group, batch, shard)
            for inbox in self.inbox.shards:
                nursery.start_soon(self._commit_loop, inbox)
            task_status.started()

    async def _settle_fenced(
        self, group: WriteGroup, batch: list[WriterMessage], shard: str
    ) -> None:
        seq = self.commits.open()
        try:
            await self._settle_doubt(group, batch, self._carry[shard], shard)
        finally:
            self.commits.close(seq)

    async def _commit_loop(self, inbox: Inbox[WriterMessage]) -> None:
        """Take what is waiting, commit it, repeat.

        A group of fewer than `parallel_rows` rows waits for its turn: small groups of all
        committers commit one at a time, and what arrives meanwhile joins the waiting group.
        Single-message load then makes half as many groups of twice the size as with every
        committer on its own, and the node's cost per group (statements, the asyncio bridge,
        one credit row per account) is what that load pays most for apart from HTTP. A turn
        ends when the store says the group is written (`WriteGroup.written`), not when its
        answer is back on this side of the asyncio bridge: that trip (two turns of the trio
        loop, about 3 ms under load) then overlaps the next group's trip in. Large groups
        (batches) commit at once, side by side, so PostgreSQL works on one while the other's
        commit is flushed."""
        carry = self._carry[inbox.name]
        while True:
            batch: list[WriterMessage] = await inbox.get_batch(self._max_group, _rows)
            if self._outcome_linger > 0 and all(_is_bulk_outcome(m) for m in batch):
                await self._gather_outcomes(inbox, batch, carry)
            if carry:
                batch = [*carry, *batch]
                carry.clear()
            rows = sum(_rows(m) for m in batch)
            if rows >= self._parallel_rows or len(self.inbox.shards) == 1:
                await self._commit_fenced(batch, carry, inbox.name)
                continue
            try:
                await self._small_turn.acquire()
            except trio.Cancelled:
                stopped = StoreUnavailable("the writer stopped before this group was committed")
                self._abandon(batch, carry, stopped)
                raise
            turn = _Turn(self._small_turn)
            try:
                batch.extend(inbox.get_batch_nowait(self._max_group - rows, _rows))
                await self._commit_fenced(batch, carry, inbox.name, turn.end)
            finally:
                turn.end()

    async def _commit_fenced(
        self,
        batch: list[WriterMessage],
        carry: list[Carried],
        shard: str,
        written: Callable[[], None] | None = None,
    ) -> None:
        seq = self.commits.open()
        try:
            await self._commit(batch, carry, shard, written)
        finally:
            self.commits.close(seq)

    @staticmethod
    def _abandon(batch: list[WriterMessage], carry: list[Carried], error: StoreUnavailable) -> None:
        """A group taken but not committed (its commit failed, or the loop is cancelled): its
        callers get `error`, and its outcomes are kept for the next group."""
        for message in batch:
            if isinstance(message, Carried):
                carry.append(message)
            else:
                message.reply.fail(error)

    async def _gather_outcomes(
        self, inbox: Inbox[WriterMessage], batch: list[WriterMessage], carry: list[Carried]
    ) -> None:
        """Let a group of bulk outcomes wait up to `outcome_linger` for more (into `batch`),
        until it has `outcome_group` rows or anything else arrives, which then commits with it
        at once. Nobody waits for a bulk outcome, and a flood's outcomes would otherwise keep
        the committer busy with groups of a few rows each, which every accept of the other
        accounts on this committer then queued behind."""
        rows = len(batch)
        try:
            with trio.move_on_after(self._outcome_linger):
                while rows < self._outcome_group:
                    message = await inbox.get()
                    batch.append(message)
                    rows += _rows(message)
                    if not _is_bulk_outcome(message):
                        break
        except trio.Cancelled:
            # Only while waiting, so every message taken is a bulk outcome: kept for the next
            # group, as a failed group's are (a restarted loop commits them).
            carry.extend(m for m in batch if isinstance(m, Carried))
            raise

    async def _commit(
        self,
        batch: list[WriterMessage],
        carry: list[Carried],
        shard: str,
        written: Callable[[], None] | None = None,
    ) -> None:
        receipts: list[WriterMessage] = [m for m in batch if isinstance(m, RecordDeliveries)]
        if receipts and len(receipts) < len(batch):
            # Delivery reports commit in a transaction of their own, after the rest of the
            # batch (so a `sent` and its receipt still apply in that order). Their statement
            # locks messages and then rollup rows; after a statement of outcomes in the same
            # transaction, which holds rollup rows already, two committers' groups waited for
            # each other in a cycle that PostgreSQL breaks only after its deadlock_timeout:
            # group commits of 1.2-1.7 s and a deadlock every few seconds at 6,000 SMPP
            # receipts a second (bench throughput, sustained_smpp). Alone, the statement takes
            # its locks in one order, as every other group's statement does.
            others: list[WriterMessage] = [m for m in batch if not isinstance(m, RecordDeliveries)]
            await self._commit(others, carry, shard, written)
            await self._commit(receipts, carry, shard)
            return
        group = WriteGroup()
        group.written = written
        accept_replies: list[Reply[list[AcceptResult]]] = []
        topup_replies: list[Reply[int | None]] = []
        create_replies: list[Reply[Account]] = []
        delivery_replies: list[Reply[list[DeliveryResult]]] = []
        for message in batch:
            match message:
                case Accept(items=items, atomic=atomic, reply=reply):
                    group.accepts.append((items, atomic))
                    accept_replies.append(reply)
                case RecordOutcome(outcome=outcome):
                    group.outcomes.append(outcome)
                case RecordAttempt(attempt=attempt):
                    group.attempts.append(attempt)
                case TopUp(account_id=account_id, amount=amount, reply=reply):
                    group.topups.append((account_id, amount))
                    topup_replies.append(reply)
                case CreateAccount(name=name, credit=credit, key_hash=key_hash, reply=reply):
                    group.creates.append((name, credit, key_hash))
                    create_replies.append(reply)
                case RecordDeliveries(operator=operator, reports=reports, reply=reply):
                    group.deliveries.append((operator, reports))
                    delivery_replies.append(reply)
                case _:
                    assert_never(message)
        started = time.perf_counter()
        try:
            # Shielded: a commit cancelled half way would leave its callers unanswered while
            # its rows may be committed. It finishes (or times out) first; shutdown waits.
            with trio.CancelScope(shield=True), trio.fail_after(self._commit_timeout):
                result = await self._store.commit_group(group)
        except TopUpTooLarge as exc:
            # One caller's mistake, not the store's: the group stored nothing, so that top-up
            # is refused and the rest of the group commits at once, unharmed by it (each
            # round refuses one top-up, so this ends).
            rest = _refuse_topup(batch, exc)
            if rest:
                await self._commit(rest, carry, shard, written)
            return
        except (trio.TooSlowError, CommitInDoubt) as exc:
            # Timed out, or lost after its statements were sent: PostgreSQL may have committed
            # the group (a COMMIT in flight, or a statement that got its lock after the client
            # gave up). Answering 503 and moving on would strand what it stored: queued, its
            # credit held, in no Scheduler, until a restart (issue 29). So the store is asked
            # what it stored, and that is dispatched, before anyone is answered.
            self._failed(exc)
            self.doubtful_groups += 1
            if written is not None:
                written()  # the other committer's small groups need not wait for this
            await self._settle_doubt(group, batch, carry, shard)
            return
        except Exception as exc:
            # The store is down or refused the group: nothing of it was stored. Answer the
            # callers now (HTTP 503), keep the outcomes for the next group, and back off. This
            # is an expected failure, not a bug, so the actor keeps running and says so in
            # its stats; the other committer's group is not disturbed.
            self._failed(exc)
            self._abandon(batch, carry, StoreUnavailable(f"could not commit: {self.last_failure}"))
            await trio.sleep(min(2.0, 0.05 * 2 ** min(self.failures, 6)))
            return
        self.failures = 0
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.groups += 1
        self.items += len(batch)
        self.last_group_size = len(batch)
        self.commit_ms_ewma += 0.1 * (elapsed_ms - self.commit_ms_ewma)
        self.commit_ms_max = max(self.commit_ms_max, elapsed_ms)
        self.commit_seconds.observe(elapsed_ms / 1000)

        committed: list[OutboundSms] = []
        offered = 0
        for (group_items, _), results, accept_reply in zip(
            group.accepts, result.accepts, accept_replies, strict=True
        ):
            offered += len(group_items)
            committed.extend(s for s, r in zip(group_items, results, strict=True) if r.accepted)
            accept_reply.set(results)
        self._count_credit(group, result.accepts, result.topups, offered, committed)
        self.group_rows.observe(
            offered
            + len(group.outcomes)
            + len(group.attempts)
            + len(group.topups)
            + len(group.creates)
            + sum(len(reports) for _, reports in group.deliveries)
        )
        for topup_reply, balance in zip(topup_replies, result.topups, strict=True):
            topup_reply.set(balance)
        for create_reply, account in zip(create_replies, result.creates, strict=True):
            create_reply.set(account)
        if delivery_replies:
            self._count_deliveries(group, result.deliveries)
            for delivery_reply, answers in zip(delivery_replies, result.deliveries, strict=True):
                delivery_reply.set(answers)
        self._publish()
        if group.outcomes and self.on_outcomes is not None:
            self.on_outcomes(group.outcomes)
        if committed:
            # After the replies: the callers' 202s do not wait for dispatch to take the work.
            await self._on_committed(committed)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.failed_groups += 1
        self.last_failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.last_failure_at = trio.current_time()
        self._publish()
        log.warning("group commit failed: %s", self.last_failure)

    async def _settle_doubt(
        self, group: WriteGroup, batch: list[WriterMessage], carry: list[Carried], shard: str
    ) -> None:
        """Learn a doubtful group's fate from the store, asking until it answers (its callers
        wait meanwhile, and time out on their side), then answer them and dispatch what it
        stored. Cancelled (the loop stops), the group stays in `in_doubt` for the restarted
        loop; a node that stops for good leaves it to the next start's recovery."""
        entry = (group, batch, shard)
        self.in_doubt.append(entry)
        delay = 0.05
        while True:
            try:
                with trio.fail_after(self._commit_timeout):
                    stored = await self._store.commit_fate(group)
                break
            except Exception as exc:
                log.warning("cannot learn a doubtful group's fate yet: %s: %s", type(exc), exc)
                await trio.sleep(delay)
                delay = min(2.0, delay * 2)
        self.in_doubt.remove(entry)
        committed: list[OutboundSms] = []
        if stored:
            # The group committed: each accept is answered as the store decided (an item of it
            # not stored was refused; which refusal is not known now, so it is answered
            # insufficient_credit: nothing was stored or held for it, as for any refusal).
            self.doubtful_committed += 1
            for message in batch:
                if isinstance(message, Accept):
                    results = []
                    for item in message.items:
                        if item.id in stored:
                            committed.append(item)
                            results.append(AcceptResult(True))
                        else:
                            results.append(AcceptResult(False, "insufficient_credit"))
                    message.reply.set(results)
            self.credit["held_messages"] += len(committed)
            self.credit["held_amount"] += sum(s.price for s in committed)
            self._publish()
        # The rest is answered as a failed group's: outcomes are carried (done again, they
        # change nothing if they were committed), other callers are told it failed (an accept
        # of a group that stored none of its messages: truly nothing stored for it).
        self._abandon(
            [m for m in batch if not (stored and isinstance(m, Accept))],
            carry,
            StoreUnavailable(f"could not commit: {self.last_failure}"),
        )
        if committed:
            await self._on_committed(committed)

    def _publish(self) -> None:
        self.figures = WriterFigures(
            commit_ms_ewma=self.commit_ms_ewma,
            groups=self.groups,
            failed_groups=self.failed_groups,
            credit=dict(self.credit),
            refused=dict(self.refused),
            deliveries=dict(self.deliveries),
            delivered=dict(self.delivered),
        )

    def _count_deliveries(self, group: WriteGroup, results: list[list[DeliveryResult]]) -> None:
        for (operator, _), answers in zip(group.deliveries, results, strict=True):
            for answer in answers:
                key = (operator, answer.result)
                self.deliveries[key] = self.deliveries.get(key, 0) + 1
                if answer.result == "applied" and answer.status is not None:
                    self.delivered[answer.status] = self.delivered.get(answer.status, 0) + 1

    def _count_credit(
        self,
        group: WriteGroup,
        accepts: list[list[AcceptResult]],
        topups: list[int | None],
        offered: int,
        committed: list[OutboundSms],
    ) -> None:
        credit = self.credit
        credit["held_messages"] += len(committed)
        credit["held_amount"] += sum(s.price for s in committed)
        if offered != len(committed):
            for results in accepts:
                for r in results:
                    if not r.accepted:
                        reason = r.reason or "refused"
                        self.refused[reason] = self.refused.get(reason, 0) + 1
        settled = self._outcomes_committed
        for outcome in group.outcomes:
            if settled is not None:
                settled(outcome.sms.id)
            kind = "captured" if outcome.status == "sent" else "released"
            credit[f"{kind}_messages"] += 1
            credit[f"{kind}_amount"] += outcome.sms.price
        for (_, amount), balance in zip(group.topups, topups, strict=True):
            if balance is not None:
                credit["topups"] += 1
                credit["topup_amount"] += amount
