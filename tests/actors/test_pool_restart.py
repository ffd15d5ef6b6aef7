"""The ProviderPool's run loop dying and starting again, in virtual time."""

from __future__ import annotations

import trio
import trio.testing

from smsgw.engine.messages import Enqueue
from tests.actors.test_pool import Harness, ScriptedOperator, sms


async def test_a_restarted_pool_sends_each_orphan_once_more_and_ends_it_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Messages at the operator when the run loop dies go back to the Scheduler on restart,
    exactly once, with their batches' slots; batches handed over meanwhile wait in the inbox
    and the new run sends them, once."""
    operator = ScriptedOperator({}, latency=1.0)
    harness = Harness(operator, window=8, max_batch=4)
    async with trio.open_nursery() as nursery:
        for run in (harness.retry.run, harness.scheduler.run):
            await nursery.start(run)
        first_run = trio.CancelScope()
        nursery.start_soon(_run_in, first_run, harness)
        harness.scheduler.ref.tell_nowait(Enqueue(tuple(sms(i) for i in range(6))))
        await trio.sleep(0.5)  # both batches at the operator
        assert len(harness.pool.inflight) == 6
        first_run.cancel()  # the run loop dies
        await trio.sleep(0.01)
        # While it is down, the Scheduler hands over more: they wait in the inbox.
        harness.scheduler.ref.tell_nowait(Enqueue(tuple(sms(i) for i in range(6, 8))))
        await trio.sleep(0.01)
        assert harness.pool.inbox.depth >= 1
        await nursery.start(harness.pool.run)  # the restart
        outcomes = await harness.outcomes(8)  # fails if any message ends twice
        await trio.testing.wait_all_tasks_blocked()  # the last BatchDone is taken in
        nursery.cancel_scope.cancel()
    assert set(outcomes) == {f"m{i}" for i in range(8)}
    assert {o.outcome.status for o in outcomes.values()} == {"sent"}
    assert harness.window.free == 8 and not harness.pool.inflight
    sends = [message_id for batch in operator.batches for message_id in batch]
    # m0-m5 were at the operator when it died: sent again (the operator dedupes by id).
    # m6 and m7 waited in the inbox: sent once, by the new run.
    assert sorted(sends) == sorted([f"m{i}" for i in range(6)] * 2 + ["m6", "m7"])


async def _run_in(scope: trio.CancelScope, harness: Harness) -> None:
    with scope:
        await harness.pool.run()
