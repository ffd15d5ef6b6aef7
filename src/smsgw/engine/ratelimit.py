"""Token buckets: how many requests an account may make, per second and in a burst."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class TokenBucket:
    """`rate` tokens a second up to `burst`; starts full. Pure: the caller passes the time.

    `take(now)` spends one token and returns 0.0, or spends nothing and returns how many
    seconds until a token is there (what a 429's Retry-After says). `now` must not go
    backwards (a monotonic clock); if it does, the bucket just does not refill.
    """

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float, cost: float = 1.0) -> float:
        self.refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


class RateLimiter(Generic[K]):
    """One TokenBucket per key (an account id), made on first use.

    A full bucket is the same as no bucket, so when there are more than `max_keys` buckets the
    full ones are dropped: memory follows the accounts that are busy, not all that ever called.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        TokenBucket(rate, burst, 0.0)  # validates the figures now, not on the first request
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[K, TokenBucket] = {}
        self._prune_at = max_keys
        self.limited = 0  # requests refused so far

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: K, now: float) -> float:
        """0.0 when `key` may go ahead, else the seconds until it may."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self.prune(now)
                # If most buckets are busy, do not scan them again on the next new key.
                self._prune_at = max(self.max_keys, 2 * len(self._buckets))
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        wait = bucket.take(now)
        if wait:
            self.limited += 1
        return wait

    def prune(self, now: float) -> int:
        """Drop the buckets that have refilled; returns how many were dropped."""
        full = [key for key, bucket in self._buckets.items() if bucket.full(now)]
        for key in full:
            del self._buckets[key]
        return len(full)
