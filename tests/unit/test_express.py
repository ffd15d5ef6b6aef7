"""express_problem: an express message is refused before anything is held when no healthy
operator answers within its deadline, or the express ahead of it cannot pass in time."""

from __future__ import annotations

from smsgw.engine.express import KNOWN_FOR, UNHEALTHY_AFTER, express_problem
from smsgw.engine.messages import DispatchFigures, OperatorHealth

NAMES = ("a", "b")
ROOMY = DispatchFigures(window=100)


def health(latency_s: float, failing: int = 0, at: float = 0.0) -> OperatorHealth:
    return OperatorHealth(latency_s=latency_s, failing=failing, observed_at=at)


def test_an_operator_never_seen_is_given_the_benefit_of_the_doubt() -> None:
    assert express_problem(2.0, ROOMY, {}, NAMES, now=0.0) is None


def test_every_operator_failing_refuses_until_what_is_known_is_old() -> None:
    failing = {n: health(0.1, failing=UNHEALTHY_AFTER) for n in NAMES}
    problem = express_problem(2.0, ROOMY, failing, NAMES, now=1.0)
    assert problem is not None and "healthy" in problem
    assert express_problem(2.0, ROOMY, failing, NAMES, now=KNOWN_FOR + 1) is None
    one_good = {**failing, "b": health(0.1)}
    assert express_problem(2.0, ROOMY, one_good, NAMES, now=1.0) is None


def test_operators_slower_than_the_deadline_refuse() -> None:
    slow = {n: health(1.0) for n in NAMES}
    problem = express_problem(0.5, ROOMY, slow, NAMES, now=0.0)
    assert problem is not None and "1000 ms" in problem
    assert express_problem(1.5, ROOMY, slow, NAMES, now=0.0) is None


def test_express_ahead_counts_by_turns_of_the_window_bulk_does_not_hold() -> None:
    fast = {n: health(0.4) for n in NAMES}

    # 100 slots, 90 held by bulk: 10 express a turn of 0.4 s. 40 ahead take 4 turns, and
    # this one a fifth: 2.0 s, not within a 2 s deadline; 30 ahead make it.
    def figures(waiting: int, slots: int) -> DispatchFigures:
        return DispatchFigures(
            window=100,
            inflight=95,
            express_inflight=5,
            express_waiting=waiting,
            express_waiting_slots=slots,
        )

    problem = express_problem(2.0, figures(40, 40), fast, NAMES, now=0.0)
    assert problem is not None and "40 express" in problem
    assert express_problem(2.0, figures(30, 30), fast, NAMES, now=0.0) is None
    # The window counts segments: 20 messages of two segments take the 40 slots' 4 turns.
    assert express_problem(2.0, figures(20, 40), fast, NAMES, now=0.0) is not None
