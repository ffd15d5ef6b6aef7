"""Whether an express message accepted now can reach an operator by its deadline: a judgement
over the figures the Scheduler and the ProviderPool publish, made before anything is held."""

from __future__ import annotations

from collections.abc import Mapping

from smsgw.engine.messages import DispatchFigures, OperatorHealth

# An operator whose last calls all failed this many times in a row is not healthy.
UNHEALTHY_AFTER = 3
# What is known of an operator is trusted this long: with no call since, it may have
# recovered, and refusing every express message would never let one find out.
KNOWN_FOR = 10.0


def express_problem(
    deadline_s: float,
    dispatch: DispatchFigures,
    operators: Mapping[str, OperatorHealth],
    names: tuple[str, ...],
    now: float,
) -> str | None:
    """Why an express message accepted now could not reach an operator within `deadline_s`
    seconds, or None when it can: a healthy operator among `names`, answering in time, with
    room in the window for it and the express messages waiting before it. `now` is trio
    time, as `OperatorHealth.observed_at`."""
    known = {
        name: health for name, health in operators.items() if now - health.observed_at < KNOWN_FOR
    }
    healthy = [name for name in names if name not in known or known[name].failing < UNHEALTHY_AFTER]
    if not healthy:
        return "no operator is healthy: every operator's recent batches failed"
    latency = min(known[name].latency_s if name in known else 0.0 for name in healthy)
    if latency >= deadline_s:
        return (
            f"operators answer in {latency * 1000:.0f} ms, past the express deadline of"
            f" {deadline_s * 1000:.0f} ms"
        )
    # Each turn of the window (one operator latency) sends as many express segments as the
    # slots bulk does not hold (the window counts segments: a long message takes several).
    room = dispatch.window - (dispatch.inflight - dispatch.express_inflight)
    ahead = dispatch.express_waiting
    turns = dispatch.express_waiting_slots // max(1, room)
    if (turns + 1) * latency >= deadline_s:
        return (
            f"{ahead} express messages are waiting ahead of this one; at"
            f" {latency * 1000:.0f} ms per operator turn it would miss its deadline of"
            f" {deadline_s * 1000:.0f} ms"
        )
    return None
