"""What a load run is asked to do and what it reports: `LoadConfig` (refused at construction
when it cannot be run), `LoadReport`, and the latency histogram the report summarises."""

from __future__ import annotations

import ipaddress
import math
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from smsgw.engine.histogram import LogHistogram

MAX_DURATION_S = 3600.0
MAX_CONNECTIONS = 10_000
MAX_BATCH = 10_000  # messages per request; the gateway itself takes at most 1,000
MAX_RATE = 10_000_000.0  # messages per second
SINGLE_PATH = "/v1/messages"
BATCH_PATH = "/v1/messages/batch"

_PRINTABLE_TOKEN = frozenset(range(0x21, 0x7F))  # visible ASCII: safe in a header value


class LoadConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One load run. Construction refuses what cannot be run (non-loopback URL, bad bounds).

    `keys` empty means no Authorization header. Accounts are picked round robin when `zipf` is
    0, else with Zipf weights 1/rank**zipf in the order given (the first key is the hottest).
    The run stops issuing requests after `duration` seconds or `count` requests, whichever
    comes first, then gives requests in flight up to `drain` seconds to complete.

    `batch` N sends N messages per request as {"messages": [...]} (one account per request);
    `path` defaults to /v1/messages/batch then, else to /v1/messages. `rate` R paces the run
    open loop: the request carrying messages k..k+N-1 leaves at start + k/R, on whichever
    connection is free (a late request leaves at once, so the schedule catches up).
    """

    url: str
    duration: float
    keys: tuple[str, ...] = ()
    count: int | None = None
    connections: int = 64
    path: str | None = None
    batch: int | None = None
    rate: float | None = None
    method: Literal["POST", "GET"] = "POST"
    express_share: float = 0.0
    zipf: float = 0.0
    seed: int = 0
    warmup: float = 0.0
    timeout: float = 10.0
    drain: float = 2.0
    text: str = "Your code is 123456"
    # Prefix of each request's client_ref; None picks a random one, so reruns never collide.
    client_ref_prefix: str | None = None

    def __post_init__(self) -> None:
        loopback_target(self.url)
        if not 0.0 < self.duration <= MAX_DURATION_S:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if not 0.0 <= self.warmup < self.duration:
            raise ValueError("warmup must be in [0, duration)")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be at least 1")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be in [1, {MAX_CONNECTIONS}]")
        if self.path is not None and (not self.path.startswith("/") or not _is_token(self.path)):
            raise ValueError("path must start with '/' and hold only visible ASCII")
        if self.batch is not None:
            if not 1 <= self.batch <= MAX_BATCH:
                raise ValueError(f"batch must be in [1, {MAX_BATCH}]")
            if self.method != "POST":
                raise ValueError("batch needs method POST")
        if self.rate is not None and not (0.0 < self.rate <= MAX_RATE):
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}] messages per second")
        if not all(key and _is_token(key) for key in self.keys):
            raise ValueError("API keys must be non-empty visible ASCII without spaces")
        if not 0.0 <= self.express_share <= 1.0:
            raise ValueError("express_share must be in [0, 1]")
        if not (self.zipf >= 0.0 and math.isfinite(self.zipf)):
            raise ValueError("zipf must be a finite number >= 0")
        if not (self.timeout > 0.0 and self.drain >= 0.0):
            raise ValueError("timeout must be > 0 and drain >= 0")
        if self.client_ref_prefix is not None and not _is_token(self.client_ref_prefix):
            raise ValueError("client_ref_prefix must be visible ASCII")

    @property
    def request_path(self) -> str:
        if self.path is not None:
            return self.path
        return SINGLE_PATH if self.batch is None else BATCH_PATH

    @property
    def per_request(self) -> int:
        """Messages each request carries."""
        return 1 if self.batch is None else self.batch


class LatencySummary(msgspec.Struct, frozen=True):
    """Milliseconds; percentiles are within 1% (histogram buckets), `max` is exact."""

    p50: float
    p95: float
    p99: float
    max: float


class LoadReport(msgspec.Struct, frozen=True):
    """What a run measured.

    `requests`, `by_status`, `rate_per_s` (2xx only) and `latency_ms` (2xx only) cover the
    measured window: requests sent after the warmup. `errors` (connection failures, resets,
    protocol errors), `timeouts` and `unanswered` (in flight when the drain ran out) cover the
    whole run; a timed-out or unanswered request may still have been accepted by the server.

    Messages ("items") over the measured window: `items` accepted (a batch result with an
    "id", or a 2xx response to a single message), `items_rejected` (every other message sent
    and answered), `items_per_s` = items / duration_s. `offered_items` are the messages sent in
    the window and `offered_rate_per_s` their rate over the time the run was issuing, which is
    below `target_rate_per_s` when every connection was busy and the schedule fell behind.
    """

    requests: int
    by_status: dict[str, int]
    errors: int
    timeouts: int
    unanswered: int
    duration_s: float
    rate_per_s: float
    latency_ms: LatencySummary | None
    connections: int
    cpu_count: int | None
    warmup_requests: int
    accepted_ids: int  # ids read from 202 bodies over the whole run, warmup included
    bad_ids: int  # 202 responses whose body had no string "id" (batch: no "results" list)
    batch: int | None = None
    items: int = 0
    items_rejected: int = 0
    items_per_s: float = 0.0
    offered_items: int = 0
    offered_rate_per_s: float = 0.0
    target_rate_per_s: float | None = None
    # (milliseconds, fraction of 2xx answers at or below) at up to 60 bucket edges: for CDFs.
    latency_cdf_ms: list[tuple[float, float]] = []
    # 429 and 503 answers over the whole run by their Retry-After header's value ("none":
    # without one).
    retry_after: dict[str, int] = {}


def _is_token(value: str) -> bool:
    return all(ord(c) in _PRINTABLE_TOKEN for c in value)


def loopback_target(url: str) -> tuple[str, int, str]:
    """(host, port, Host header) of an http:// URL on a loopback host; ValueError otherwise.

    Loopback only: the generator is a benchmark tool, not a way to flood someone else's host.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, not {url!r}")
    host = parts.hostname
    if host is None:
        raise ValueError(f"no host in {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported")
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a loopback host") from None
        if not address.is_loopback:
            raise ValueError(f"{host!r} is not a loopback host")
    try:
        port = parts.port or 80
    except ValueError as error:
        raise ValueError(f"bad port in {url!r}") from error
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("give the path with --path, not in the URL")
    return host, port, parts.netloc


class LatencyHistogram(LogHistogram):
    """A run's request latencies, summarised in milliseconds as the report gives them."""

    __slots__ = ()

    def cdf_ms(self, points: int = 60) -> list[tuple[float, float]]:
        """(milliseconds, fraction at or below) at up to `points` bucket edges."""
        return [(round(seconds * 1000.0, 3), share) for seconds, share in self.cdf(points)]

    def summary_ms(self) -> LatencySummary | None:
        """p50, p95, p99 (within 1%) and the exact maximum; None before any request."""
        if self.count == 0:
            return None
        return LatencySummary(
            p50=round(self.quantile(0.50) * 1000.0, 3),
            p95=round(self.quantile(0.95) * 1000.0, 3),
            p99=round(self.quantile(0.99) * 1000.0, 3),
            max=round(self.max_s * 1000.0, 3),
        )
