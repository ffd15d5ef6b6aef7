"""Admission: how much accepted-but-not-dispatched bulk work a node and an account may have
before new sends are refused, and when to come back.

A gateway that accepts whatever it is offered turns an operator slower than the intake into
an ever deeper backlog: memory and PostgreSQL grow with it and every message waits longer.
Past a bound, a send is refused instead, before anything is stored or held: 429 when it is
the account's own backlog (its flood should not become everyone's), 503 when it is the
node's. The Retry-After is the time the backlog needs to drain back under the bound at the
rate it is being dispatched. Express messages are not counted or refused here: they have
their own lane and reserve, and `Engine.express_problem` refuses one that cannot make its
deadline. A batch is admitted or refused whole.

The backlogs are those of the shards this node dispatches; an account whose shard another
node leases is judged by what that node publishes with its heartbeat (`Pressure`).

The bounds are in messages, not in bytes of body: what a waiting bulk message costs this
node's memory is bounded apart from them. The Scheduler keeps at most a fixed number of
entries (an id and a queue position) and of bodies in memory, each body at most 10 segments;
the rest of any backlog waits in PostgreSQL and is paged back in. The bytes a node holds
for requests being read are bounded by `RequestBodies`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec


class AdmissionConfig(msgspec.Struct, frozen=True):
    # Bulk messages accepted and not yet dispatched, per account and on the node: far above
    # what a sustained 12,000 msg/s or the production test keeps waiting (their backlogs
    # stay flat near zero), a few minutes of an operator's full rate.
    account_backlog: int = 500_000
    node_backlog: int = 1_000_000
    # Admission resumes below this share of a bound (hysteresis: not on and off per message).
    resume_share: float = 0.9
    # Retry-After bounds, seconds.
    min_retry_s: int = 1
    max_retry_s: int = 300
    # Bytes of request bodies the node holds at once (`RequestBodies`): sixteen of the
    # largest batches, hundreds of ordinary ones.
    request_body_bytes: int = 64 << 20


class Pressure(msgspec.Struct, frozen=True, array_like=True):
    """What a node tells the others with its heartbeat: whether it refuses bulk for all of
    its shards, and the accounts it refuses bulk for, with the seconds to come back."""

    node_retry_s: int = 0  # 0: the node admits
    accounts: dict[int, int] = {}


@dataclass
class Refusal:
    status: int  # 429: the account's backlog, 503: the node's
    code: str
    detail: str
    retry_after: int


class RequestBodies:
    """Bytes of request bodies a node holds at once, under `bound`.

    A request reserves its body's declared length before any of it is read (a body of
    unknown length reserves each part as it arrives) and gives it back once answered. A
    reservation that does not fit is refused, and the HTTP door answers 503 instead of
    reading the body: however many clients send large batches at once, their bodies cost
    the node at most `bound` bytes (and the copies each handler makes of its own)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.held = 0
        self.peak = 0
        self.refused = 0  # requests refused for want of room

    def reserve(self, size: int) -> bool:
        """Hold `size` more bytes if they fit under the bound (True); else count a refusal
        and hold nothing (False)."""
        if self.held + size > self.bound:
            self.refused += 1
            return False
        self.held += size
        self.peak = max(self.peak, self.held)
        return True

    def release(self, size: int) -> None:
        """Give back `size` bytes reserved before."""
        self.held -= size

    def stats(self) -> dict[str, int]:
        return {
            "request_body_bytes": self.held,
            "request_body_bytes_peak": self.peak,
            "request_body_bytes_bound": self.bound,
            "request_bodies_refused": self.refused,
        }


class Admission:
    """The bounds on one node, over its Scheduler's backlogs (read through `backlog` and
    `node_backlog`) and the dispatch rate `drain_rate` (messages a second), and the bytes
    of request bodies it holds (`bodies`)."""

    def __init__(
        self,
        config: AdmissionConfig,
        *,
        backlog: Callable[[int], int],
        node_backlog: Callable[[], int],
        drain_rate: Callable[[], float],
        remote: Callable[[int], Pressure | None] = lambda _: None,
    ) -> None:
        self.config = config
        self._backlog = backlog
        self._node_backlog = node_backlog
        self._drain_rate = drain_rate
        # The published pressure of the node that dispatches an account, when not this one.
        self._remote = remote
        self._node_refusing = False
        self._refusing: set[int] = set()  # accounts over their bound, until under resume
        self.refused_account = 0
        self.refused_node = 0
        self.bodies = RequestBodies(config.request_body_bytes)

    def check(self, account_id: int, count: int) -> Refusal | None:
        """Whether `count` more bulk messages of `account_id` may be accepted now."""
        remote = self._remote(account_id)
        if remote is not None:
            return self._remote_refusal(account_id, remote)
        config = self.config
        node = self._node_backlog()
        if self._node_refusing and node < config.node_backlog * config.resume_share:
            self._node_refusing = False
        if self._node_refusing or node + count > config.node_backlog:
            self._node_refusing = True
            self.refused_node += 1
            return Refusal(
                503,
                "overloaded",
                f"the gateway has {node:,} messages waiting for the operators; retry later",
                self._retry_after(node - config.node_backlog * config.resume_share),
            )
        waiting = self._backlog(account_id)
        refusing = account_id in self._refusing
        if refusing and waiting < config.account_backlog * config.resume_share:
            self._refusing.discard(account_id)
            refusing = False
        if refusing or waiting + count > config.account_backlog:
            self._refusing.add(account_id)
            self.refused_account += 1
            return Refusal(
                429,
                "backlog_full",
                f"this account has {waiting:,} messages waiting for the operators (at most"
                f" {config.account_backlog:,}); retry later",
                self._retry_after(waiting - config.account_backlog * config.resume_share),
            )
        return None

    def _remote_refusal(self, account_id: int, pressure: Pressure) -> Refusal | None:
        if pressure.node_retry_s:
            self.refused_node += 1
            return Refusal(
                503,
                "overloaded",
                "the gateway node that dispatches this account has too many messages waiting;"
                " retry later",
                pressure.node_retry_s,
            )
        retry = pressure.accounts.get(account_id)
        if retry:
            self.refused_account += 1
            return Refusal(
                429,
                "backlog_full",
                "this account has too many messages waiting for the operators; retry later",
                retry,
            )
        return None

    def _retry_after(self, excess: float) -> int:
        rate = self._drain_rate()
        seconds = excess / rate if rate > 0 else self.config.max_retry_s
        return int(min(self.config.max_retry_s, max(self.config.min_retry_s, math.ceil(seconds))))

    def pressure(self, accounts: Mapping[int, int]) -> Pressure:
        """What to publish: the node's state and, of `accounts` (account -> backlog, the
        largest ones), those this node refuses, with when to come back."""
        config = self.config
        node_retry = 0
        node = self._node_backlog()
        if self._node_refusing or node > config.node_backlog:
            node_retry = self._retry_after(node - config.node_backlog * config.resume_share)
        refused = {
            account_id: self._retry_after(n - config.account_backlog * config.resume_share)
            for account_id, n in accounts.items()
            if account_id in self._refusing or n > config.account_backlog
        }
        return Pressure(node_retry, refused)

    def stats(self) -> dict[str, object]:
        return {
            "account_backlog_bound": self.config.account_backlog,
            "node_backlog_bound": self.config.node_backlog,
            "node_refusing": self._node_refusing,
            "accounts_refusing": len(self._refusing),
            "refused_account": self.refused_account,
            "refused_node": self.refused_node,
            "drain_rate_per_s": round(self._drain_rate(), 1),
            **self.bodies.stats(),
        }


class DrainRate:
    """Messages a second a counter (the Scheduler's dispatched messages) grew by over about
    the last `window` seconds, sampled at most once a second when asked."""

    def __init__(self, count: Callable[[], int], clock: Callable[[], float], window: float = 10.0):
        self._count = count
        self._clock = clock
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def __call__(self) -> float:
        now = self._clock()
        samples = self._samples
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, self._count()))
            while len(samples) > 2 and now - samples[1][0] >= self._window:
                samples.popleft()
        if len(samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
