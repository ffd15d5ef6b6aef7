"""AimdRate: the send rate of one bind, raised additively and halved when the operator throttles."""

from __future__ import annotations

import math


class AimdRate:
    """A rate in PDUs per second: additive increase, multiplicative decrease (as TCP does).

    Every `interval` seconds that pass with successes and no throttle raise the rate by `step`,
    up to `ceiling` (the rate the operator allows this bind). A throttle (ESME_RTHROTTLED,
    ESME_RMSGQFUL) halves it, down to `floor`, at most once per `interval`: the responses to a
    window of PDUs sent at the old rate arrive together and are one signal, not many.

    Pure: the caller passes the time (`trio.current_time()` in the connection, any clock in
    tests) and reads `rate`; nothing here sleeps or schedules.
    """

    def __init__(
        self,
        ceiling: float,
        *,
        floor: float = 1.0,
        step: float | None = None,
        interval: float = 1.0,
        start: float | None = None,
    ) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError(f"need 0 < floor <= ceiling, got floor={floor}, ceiling={ceiling}")
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.ceiling = ceiling
        self.floor = floor
        # By default a bind climbs from its floor back to its ceiling in about 20 intervals.
        self.step = step if step is not None else max((ceiling - floor) / 20, 1e-9)
        if self.step <= 0:
            raise ValueError(f"step must be positive, got {step}")
        self.interval = interval
        self._rate = ceiling if start is None else min(max(start, floor), ceiling)
        self._last_change = -math.inf
        self._last_decrease = -math.inf

    @property
    def rate(self) -> float:
        """PDUs per second this bind may send now: floor <= rate <= ceiling."""
        return self._rate

    def on_success(self, now: float) -> float:
        """A response was ok: raise the rate by one step if an interval passed since the last
        change. Returns the rate."""
        if now - self._last_change >= self.interval and self._rate < self.ceiling:
            self._rate = min(self.ceiling, self._rate + self.step)
            self._last_change = now
        return self._rate

    def on_throttle(self, now: float) -> float:
        """The operator throttled: halve the rate, unless it was halved less than an interval
        ago. Returns the rate."""
        if now - self._last_decrease >= self.interval:
            self._rate = max(self.floor, self._rate / 2)
            self._last_decrease = now
            self._last_change = now
        return self._rate
