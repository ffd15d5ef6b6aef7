"""Token buckets: how many requests an account may make, per second and in a burst."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

import msgspec

K = TypeVar("K", bound=Hashable)
# Refills are floats: a bucket that is a rounding error short of a token has one (else a
# caller told "ready at t" could find it not ready at t).
_SLACK = 1e-9


class TokenBucket(msgspec.Struct, gc=False):
    """`rate` tokens a second up to `burst`. Pure: the caller passes the time.

    `take(now)` spends one token and returns 0.0, or spends nothing and returns how many
    seconds until a token is there (what a 429's Retry-After says). `now` must not go
    backwards (a monotonic clock); if it does, the bucket just does not refill.

    The garbage collector does not track buckets (`gc=False`: they hold floats only, so they
    cannot be part of a cycle). A node keeps one per recipient number messaged in the last
    hour, up to 200,000, and a full collection that walked them all stalled the event loop for
    over 100 ms, which every message in flight waited out.
    """

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def start(cls, rate: float, burst: float, now: float) -> TokenBucket:
        """A full bucket."""
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")
        return cls(rate, burst, burst, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float, cost: float = 1.0) -> float:
        self.refill(now)
        if self.tokens >= cost - _SLACK:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def spend(self, now: float, cost: float) -> None:
        """Spend `cost` tokens whatever the bucket holds: below zero, the debt is paid back
        by the refill before `take` or `wait` see a token again. For work already let through
        on one token (a message of several segments)."""
        self.refill(now)
        self.tokens -= cost

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens are there, spending nothing (0.0: they are now)."""
        self.refill(now)
        return 0.0 if self.tokens >= cost - _SLACK else (cost - self.tokens) / self.rate

    def give_back(self, cost: float = 1.0) -> None:
        """Return tokens taken for work that did not happen (up to `burst`)."""
        self.tokens = min(self.burst, self.tokens + cost)

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.burst


class RateLimiter(Generic[K]):
    """One TokenBucket per key (an account id), made on first use.

    A full bucket is the same as no bucket, so when there are more than `max_keys` buckets the
    full ones are dropped: memory follows the accounts that are busy, not all that ever called.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        TokenBucket.start(rate, burst, 0.0)  # validates the figures now, not on the first request
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[K, TokenBucket] = {}
        self._prune_at = max_keys
        self.limited = 0  # requests refused so far

    def __len__(self) -> int:
        return len(self._buckets)

    def take(
        self, key: K, now: float, *, rate: float | None = None, burst: float | None = None
    ) -> float:
        """0.0 when `key` may go ahead, else the seconds until it may. `rate` and `burst`
        override the limiter's for this key (a per-account setting); a bucket made with other
        figures is replaced."""
        rate = self.rate if rate is None else rate
        burst = self.burst if burst is None else burst
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            if bucket is None and len(self._buckets) >= self._prune_at:
                self.prune(now)
                # If most buckets are busy, do not scan them again on the next new key.
                self._prune_at = max(self.max_keys, 2 * len(self._buckets))
            fresh = TokenBucket.start(rate, burst, now)
            if bucket is not None:
                # What was spent stays spent, and new figures grant nothing: a node's share of
                # an account's rate moves up and down every tick (engine/shares.py), and a
                # bucket given a larger burst's difference on each rise (and forgiven nothing
                # on each fall, being empty) let a busy account 10-17% past its rate.
                bucket.refill(now)
                fresh.tokens = min(burst, bucket.tokens)
            bucket = self._buckets[key] = fresh
        wait = bucket.take(now)
        if wait:
            self.limited += 1
        return wait

    def give_back(self, key: K) -> None:
        """Return the token `key` took for work that was then refused for another reason."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.give_back()

    def prune(self, now: float) -> int:
        """Drop the buckets that have refilled; returns how many were dropped."""
        full = [key for key, bucket in self._buckets.items() if bucket.full(now)]
        for key in full:
            del self._buckets[key]
        return len(full)


HOUR = 3600.0


class RecipientLimiter:
    """Messages per (account, recipient number) in an hour: a token bucket per pair, with
    `limit` tokens refilling over an hour (20 a number an hour by default).

    A pair's bucket is one float, the time it is full again (the "theoretical arrival time" of
    the generic cell rate algorithm): each message adds an hour / `limit` to it, and a message
    is refused while that would put it more than an hour ahead. This is the hot path of every
    accept, and most messages go to a number not seen within the hour, so a new pair costs a
    string and a dict entry, nothing more; and with strings and floats only, the dicts are not
    tracked by the garbage collector (a full collection walked 200,000 bucket objects for over
    100 ms). Pairs are kept by limit (the default, and each account's own), so a changed
    limit finds what the pair spent under the old one: what was spent stays spent.

    Buckets refill slowly, so waiting for them to be full would keep one per number messaged
    in the last hour. Past `max_keys` pairs, the buckets that have spent least are dropped
    first (a dropped pair forgets at most that many messages), so memory stays bounded and
    what the limit forgets is the numbers that were messaged least.
    """

    def __init__(self, limit: int, *, max_keys: int = 200_000) -> None:
        if limit < 1:
            raise ValueError("a recipient limit must be at least 1 message an hour")
        self.limit = limit
        self.max_keys = max_keys
        self._full_at: dict[int, dict[str, float]] = {limit: {}}  # limit -> pair -> time
        self._size = 0
        self.limited = 0
        self.forgotten = 0  # buckets dropped before they were full

    def __len__(self) -> int:
        return self._size

    def take(self, account_id: int, to: str, now: float, limit: int | None = None) -> float:
        """0.0 when one more message to `to` is allowed, else the seconds until it is."""
        limit = self.limit if limit is None else limit
        key = f"{account_id} {to}"
        pairs = self._full_at.get(limit)
        if pairs is None:
            pairs = self._full_at[limit] = {}
        full_at = pairs.get(key)
        if full_at is None:
            full_at = self._moved(key, limit, now) if len(self._full_at) > 1 else None
            if full_at is None:
                if self._size >= self.max_keys:
                    self._shrink(now)
                self._size += 1
                full_at = now
        cost = HOUR / limit
        ahead = (full_at - now if full_at > now else 0.0) + cost
        if ahead > HOUR + _SLACK:
            pairs[key] = full_at
            self.limited += 1
            return ahead - HOUR
        pairs[key] = now + ahead
        return 0.0

    def _moved(self, key: str, limit: int, now: float) -> float | None:
        """The pair's time under another limit, converted to `limit` (None if it has none):
        the tokens it has spent stay spent."""
        for other, pairs in self._full_at.items():
            if other != limit and key in pairs:
                spent = max(0.0, pairs.pop(key) - now) * other / HOUR
                return now + spent * HOUR / limit
        return None

    def give_back(self, account_id: int, to: str) -> None:
        key = f"{account_id} {to}"
        for limit, pairs in self._full_at.items():
            full_at = pairs.get(key)
            if full_at is not None:
                pairs[key] = full_at - HOUR / limit
                return

    def _shrink(self, now: float) -> None:
        """Drop buckets until at most three quarters of `max_keys` are left: those that spent
        at most one token first (full ones among them: most pairs are a number messaged once,
        so one pass from the oldest usually finds enough), then two, and so on."""
        target = self.max_keys * 3 // 4
        spent = 1
        while self._size > target:
            for limit, pairs in self._full_at.items():
                # Spent at most `spent` tokens: full again at most that many costs from now.
                keep_after = now + spent * HOUR / limit
                drop = []
                for key, full_at in pairs.items():
                    if full_at <= keep_after + _SLACK:
                        drop.append(key)
                        if self._size - len(drop) <= target:
                            break
                for key in drop:
                    if pairs.pop(key) > now:
                        self.forgotten += 1
                self._size -= len(drop)
                if self._size <= target:
                    return
            spent += 1
