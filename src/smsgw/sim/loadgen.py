"""An HTTP load generator for loopback benchmarks: keep-alive connections on trio and h11.

Run it as a process (`python -m smsgw.sim.loadgen --help`) so it has a core of its own, or call
`run_load` in-process. It prints one JSON `LoadReport` on stdout.

Two ways to shape the load: one message per request (POST /v1/messages) or `batch` messages per
request (POST /v1/messages/batch); and closed loop (each connection sends its next request as
soon as the last is answered: the most the server takes) or open loop at `rate` messages per
second (requests leave on a fixed schedule shared by all connections, so a sustained run
offers the same load whatever the server does, as long as enough connections are free).

Speed matters more than generality here: the gateway it measures does about 1,000 requests per
second per core, so the generator must stay far below a core at that rate. Each connection is
one trio task that sends requests one after another on a raw socket. h11 does the HTTP/1.1
framing and parsing; its request events are built once per (API key, body length) and reused,
which spares it re-validating the same headers on every request.
"""

from __future__ import annotations

import argparse
import bisect
import ipaddress
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from typing import Literal, cast
from urllib.parse import urlsplit

import h11
import msgspec
import trio

MAX_DURATION_S = 3600.0
MAX_CONNECTIONS = 10_000
MAX_BATCH = 10_000  # messages per request; the gateway itself takes at most 1,000
MAX_RATE = 10_000_000.0  # messages per second
SINGLE_PATH = "/v1/messages"
BATCH_PATH = "/v1/messages/batch"

_RECEIVE_SIZE = 65_536
_END_OF_MESSAGE = h11.EndOfMessage()
_RECONNECT_BACKOFF_MIN_S = 0.01
_RECONNECT_BACKOFF_MAX_S = 0.5
_PRINTABLE_TOKEN = frozenset(range(0x21, 0x7F))  # visible ASCII: safe in a header value

# --- Configuration and report --------------------------------------------------------------


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


# --- Validation helpers --------------------------------------------------------------------


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


# --- Latency histogram ---------------------------------------------------------------------


class LatencyHistogram:
    """Log-bucketed latencies (1% wide): constant memory for hour-long runs."""

    _GROWTH = math.log(1.01)
    _FLOOR_S = 1e-6

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self.count = 0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        if seconds > self._FLOOR_S:
            index = int(math.log(seconds / self._FLOOR_S) / self._GROWTH)
        else:
            index = 0
        self._buckets[index] = self._buckets.get(index, 0) + 1
        self.count += 1
        if seconds > self.max_s:
            self.max_s = seconds

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket holding the q-quantile (nearest rank), in seconds."""
        if self.count == 0:
            raise ValueError("no samples")
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return min(self._FLOOR_S * math.exp((index + 1) * self._GROWTH), self.max_s)
        return self.max_s

    def cdf_ms(self, points: int = 60) -> list[tuple[float, float]]:
        """(milliseconds, fraction at or below) at up to `points` bucket edges."""
        if self.count == 0:
            return []
        indexes = sorted(self._buckets)
        step = max(1, len(indexes) // points)
        out: list[tuple[float, float]] = []
        seen = 0
        for k, index in enumerate(indexes):
            seen += self._buckets[index]
            if k % step == 0 or k == len(indexes) - 1:
                edge = min(self._FLOOR_S * math.exp((index + 1) * self._GROWTH), self.max_s)
                out.append((round(edge * 1000.0, 3), round(seen / self.count, 6)))
        return out

    def summary_ms(self) -> LatencySummary | None:
        if self.count == 0:
            return None
        return LatencySummary(
            p50=round(self.quantile(0.50) * 1000.0, 3),
            p95=round(self.quantile(0.95) * 1000.0, 3),
            p99=round(self.quantile(0.99) * 1000.0, 3),
            max=round(self.max_s * 1000.0, 3),
        )


# --- The run -------------------------------------------------------------------------------


class _Submission(msgspec.Struct):
    """The body of POST /v1/messages as the generator sends it."""

    to: str
    text: str
    express: bool
    client_ref: str


class _BatchSubmission(msgspec.Struct):
    """The body of POST /v1/messages/batch as the generator sends it."""

    messages: list[_Submission]


class _Accepted(msgspec.Struct):
    id: str


class _BatchItem(msgspec.Struct):
    id: str | None = None  # a refused item is a problem object: no id


class _BatchResults(msgspec.Struct):
    results: list[_BatchItem]


class _ConnectionLost(Exception):
    """The server closed the connection before a complete response."""


_encode = msgspec.json.Encoder().encode
_decode_accepted = msgspec.json.Decoder(_Accepted).decode
_decode_batch = msgspec.json.Decoder(_BatchResults).decode


class _Run:
    """State shared by a run's connection tasks. They all run in one trio thread: no locks."""

    def __init__(
        self, config: LoadConfig, host_header: str, on_accepted: Callable[[str], None] | None
    ) -> None:
        self.config = config
        self.on_accepted = on_accepted
        self.rng = random.Random(config.seed)
        self.client_ref_prefix = config.client_ref_prefix or f"lg-{os.urandom(6).hex()}"
        self.host = host_header.encode("ascii")
        self.method = config.method.encode("ascii")
        self.target = config.request_path.encode("ascii")
        self.per_request = config.per_request
        # Batch bodies are always read: their items are counted even without on_accepted.
        self.keep_202_body = on_accepted is not None or config.batch is not None
        self.auth = [b"Bearer " + key.encode("ascii") for key in config.keys]
        self.cumulative_weights: list[float] | None = None
        if config.zipf > 0.0 and len(self.auth) > 1:
            total = 0.0
            self.cumulative_weights = []
            for rank in range(1, len(self.auth) + 1):
                total += rank**-config.zipf
                self.cumulative_weights.append(total)
        self.requests_cache: dict[tuple[int, int], h11.Request] = {}
        # Set by run_load once the clock starts.
        self.started = 0.0
        self.stop_issuing_at = math.inf
        self.measure_from = math.inf
        self.last_issue_at = 0.0
        # Counters.
        self.issued = 0
        self.in_flight = 0
        self.requests = 0
        self.warmup_requests = 0
        self.by_status: dict[int, int] = {}
        self.errors = 0
        self.timeouts = 0
        self.accepted_ids = 0
        self.bad_ids = 0
        self.items = 0
        self.items_rejected = 0
        self.offered_items = 0
        self.retry_after: dict[str, int] = {}
        self.latency = LatencyHistogram()

    def due(self, n: int) -> float:
        """When request `n` leaves: now in a closed loop, on the schedule in an open one."""
        if self.config.rate is None:
            return -math.inf
        return self.started + n * self.per_request / self.config.rate

    def issuing(self) -> bool:
        """Whether the run may still issue requests (neither duration nor count reached)."""
        if max(trio.current_time(), self.due(self.issued)) >= self.stop_issuing_at:
            return False
        return self.config.count is None or self.issued < self.config.count

    def next_request(self) -> tuple[h11.Request, bytes, float] | None:
        """The next request to send and when it is due, or None once the run should stop
        issuing."""
        if not self.issuing():
            return None
        config = self.config
        n = self.issued
        self.issued += 1
        rng = self.rng
        if not self.auth:
            account = -1
        elif self.cumulative_weights is None:
            account = n % len(self.auth)
        else:
            u = rng.random() * self.cumulative_weights[-1]
            account = min(bisect.bisect_right(self.cumulative_weights, u), len(self.auth) - 1)
        body = b""
        if config.method == "POST":
            if config.batch is None:
                body = _encode(self._submission(f"{self.client_ref_prefix}-{n}"))
            else:
                prefix = f"{self.client_ref_prefix}-{n}-"
                body = _encode(
                    _BatchSubmission(
                        [self._submission(f"{prefix}{i}") for i in range(config.batch)]
                    )
                )
        request = self.requests_cache.get((account, len(body)))
        if request is None:
            request = self._build_request(account, len(body))
        return request, body, self.due(n)

    def _submission(self, client_ref: str) -> _Submission:
        rng = self.rng
        return _Submission(
            to=f"+4479{rng.randrange(100_000_000):08d}",
            text=self.config.text,
            express=rng.random() < self.config.express_share,
            client_ref=client_ref,
        )

    def _build_request(self, account: int, body_length: int) -> h11.Request:
        headers = [(b"host", self.host)]
        if self.config.method == "POST":
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", b"%d" % body_length))
        if account >= 0:
            headers.append((b"authorization", self.auth[account]))
        request = h11.Request(method=self.method, target=self.target, headers=headers)
        self.requests_cache[(account, body_length)] = request
        return request

    def sending(self, sent_at: float) -> None:
        self.last_issue_at = sent_at
        if sent_at >= self.measure_from:
            self.offered_items += self.per_request

    def record(self, status: int, body: bytes, sent_at: float, answered_at: float) -> None:
        accepted = 0
        if self.config.batch is None:
            if status == 202 and self.on_accepted is not None:
                try:
                    message_id = _decode_accepted(body).id
                except msgspec.DecodeError:
                    self.bad_ids += 1
                else:
                    self.accepted_ids += 1
                    self.on_accepted(message_id)
            accepted = 1 if 200 <= status < 300 else 0
        elif status == 202:
            try:
                results = _decode_batch(body).results
            except msgspec.DecodeError:
                self.bad_ids += 1
            else:
                on_accepted = self.on_accepted
                for item in results:
                    if item.id is not None:
                        accepted += 1
                        if on_accepted is not None:
                            on_accepted(item.id)
                self.accepted_ids += accepted
        if sent_at < self.measure_from:
            self.warmup_requests += 1
            return
        self.requests += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        self.items += accepted
        self.items_rejected += self.per_request - accepted
        if 200 <= status < 300:
            self.latency.record(answered_at - sent_at)


def _count_retry_after(counts: dict[str, int], response: h11.Response) -> None:
    value = next((v for k, v in response.headers if k == b"retry-after"), None)
    key = "none" if value is None else value.decode("latin-1")
    counts[key] = counts.get(key, 0) + 1


async def _exchange(
    conn: h11.Connection,
    sock: trio.socket.SocketType,
    request: h11.Request,
    body: bytes,
    keep_202_body: bool,
    retry_after: dict[str, int],
) -> tuple[int, bytes]:
    """Send one request and read its response: (status, body if 202 and wanted, else b"").
    A 429 or 503 is counted in `retry_after` by its Retry-After header."""
    data = conn.send(request) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(_END_OF_MESSAGE) or b""
    # The raw socket rather than a SocketStream: this loop is the generator's hot path.
    sent = await sock.send(data)
    while sent < len(data):
        sent += await sock.send(memoryview(data)[sent:])
    status = 0
    keep_body = False
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        kind = type(event)  # exact types: cheaper than isinstance on the hot path
        if event is h11.NEED_DATA:
            conn.receive_data(await sock.recv(_RECEIVE_SIZE))
        elif kind is h11.Response:
            status = cast(h11.Response, event).status_code
            keep_body = keep_202_body and status == 202
            if status == 429 or status == 503:
                _count_retry_after(retry_after, cast(h11.Response, event))
        elif kind is h11.Data:
            if keep_body:
                chunks.append(cast(h11.Data, event).data)
        elif kind is h11.EndOfMessage:
            return status, b"".join(chunks)
        elif kind is h11.InformationalResponse:
            continue
        else:  # ConnectionClosed, or PAUSED, which a client that sent everything never sees
            raise _ConnectionLost


async def _keep_alive_session(run: _Run, sock: trio.socket.SocketType) -> int:
    """Send requests one after another on one connection until the run stops issuing, or the
    connection fails, times out or is closed by the server (the caller then reconnects).
    Returns how many responses the connection gave.

    One cancel scope per connection whose deadline moves with each request: cheaper than a
    scope per request, and a timed-out connection is dropped anyway. If run_load's hard stop
    cancels a request, `in_flight` keeps it counted as unanswered.
    """
    conn = h11.Connection(h11.CLIENT)
    keep_202_body = run.keep_202_body
    timeout = run.config.timeout
    answered = 0
    with trio.CancelScope() as deadline:
        while (next_request := run.next_request()) is not None:
            request, body, due = next_request
            sent_at = trio.current_time()
            if due > sent_at:
                # Waiting for its turn is not waiting for the server: no timeout meanwhile.
                deadline.deadline = math.inf
                await trio.sleep_until(due)
                sent_at = trio.current_time()
            deadline.deadline = sent_at + timeout
            run.sending(sent_at)
            run.in_flight += 1
            try:
                status, payload = await _exchange(
                    conn, sock, request, body, keep_202_body, run.retry_after
                )
            except (OSError, h11.ProtocolError, _ConnectionLost):
                run.in_flight -= 1
                run.errors += 1
                return answered
            run.in_flight -= 1
            answered += 1
            run.record(status, payload, sent_at, trio.current_time())
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return answered  # the server asked to close: reconnect
            conn.start_next_cycle()
    if deadline.cancelled_caught:
        run.in_flight -= 1
        run.timeouts += 1
    return answered


async def _drive_connection(run: _Run, host: str, port: int) -> None:
    """One connection's worth of load: connect, send until told to stop, reconnect when the
    connection ends. A connection that fails before any response (counted in `errors` or
    `timeouts`) is retried with a growing backoff, so a dead server is not hammered."""
    backoff = _RECONNECT_BACKOFF_MIN_S
    while run.issuing():
        answered = 0
        try:
            with trio.fail_after(run.config.timeout):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError):
            run.errors += 1
        else:
            async with stream:
                answered = await _keep_alive_session(run, stream.socket)
        if answered:
            backoff = _RECONNECT_BACKOFF_MIN_S
        elif run.issuing():
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _RECONNECT_BACKOFF_MAX_S)


async def run_load(
    config: LoadConfig, *, on_accepted: Callable[[str], None] | None = None
) -> LoadReport:
    """Put load on `config.url` and report what happened.

    `on_accepted` is called with the "id" of every 202 response, warmup included (for
    durability checks). Returns within duration + drain seconds: requests still in flight then
    are cancelled and reported as `unanswered`. If the caller cancels, every connection is
    closed and no report is made.
    """
    host, port, host_header = loopback_target(config.url)
    run = _Run(config, host_header, on_accepted)
    started = run.started = trio.current_time()
    run.measure_from = started + config.warmup
    run.stop_issuing_at = started + config.duration
    with trio.move_on_at(run.stop_issuing_at + config.drain):
        async with trio.open_nursery() as nursery:
            for _ in range(config.connections):
                nursery.start_soon(_drive_connection, run, host, port)
    finished = trio.current_time()
    window = max(finished - run.measure_from, 0.0)
    # Offered load is over the time the run issued (to its last request), not the drain.
    issue_window = max(min(run.stop_issuing_at, finished) - run.measure_from, 0.0)
    if config.count is not None and run.issued >= config.count:
        issue_window = max(run.last_issue_at - run.measure_from, 0.0)
    successes = sum(n for status, n in run.by_status.items() if 200 <= status < 300)
    return LoadReport(
        requests=run.requests,
        by_status={str(status): run.by_status[status] for status in sorted(run.by_status)},
        errors=run.errors,
        timeouts=run.timeouts,
        unanswered=run.in_flight,
        duration_s=round(window, 3),
        rate_per_s=round(successes / window, 1) if window > 0.0 else 0.0,
        latency_ms=run.latency.summary_ms(),
        connections=config.connections,
        cpu_count=os.cpu_count(),
        warmup_requests=run.warmup_requests,
        accepted_ids=run.accepted_ids,
        bad_ids=run.bad_ids,
        batch=config.batch,
        items=run.items,
        items_rejected=run.items_rejected,
        items_per_s=round(run.items / window, 1) if window > 0.0 else 0.0,
        offered_items=run.offered_items,
        offered_rate_per_s=(
            round(run.offered_items / issue_window, 1) if issue_window > 0.0 else 0.0
        ),
        target_rate_per_s=config.rate,
        latency_cdf_ms=run.latency.cdf_ms(),
        retry_after=dict(sorted(run.retry_after.items())),
    )


# --- Command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smsgw.sim.loadgen",
        description="Load a loopback HTTP endpoint; print one JSON report on stdout.",
    )
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT (loopback only)")
    parser.add_argument("--keys", help="JSON file: a list of API keys")
    parser.add_argument("--no-auth", action="store_true", help="send no Authorization header")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, required=True, help="seconds, at most 3600")
    parser.add_argument("--count", type=int, help="stop after this many requests")
    parser.add_argument("--path", help=f"default {SINGLE_PATH}, or {BATCH_PATH} with --batch")
    parser.add_argument(
        "--batch", type=int, help='messages per request, POSTed as {"messages": [...]}'
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="open loop: offer this many messages/s in all, paced across the connections",
    )
    parser.add_argument("--method", choices=("POST", "GET"), default="POST")
    parser.add_argument("--express-share", type=float, default=0.0)
    parser.add_argument("--zipf", type=float, default=0.0, help="0 = uniform (round robin)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds not measured")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--drain", type=float, default=2.0, help="grace for requests in flight")
    parser.add_argument(
        "--ids-out",
        help="write the id of every accepted message here (batch items too), one a line",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    keys: tuple[str, ...] = ()
    if args.no_auth:
        if args.keys is not None:
            parser.error("--keys and --no-auth exclude each other")
    elif args.keys is None:
        parser.error("--keys is required unless --no-auth is given")
    else:
        try:
            with open(args.keys, "rb") as file:
                keys = tuple(msgspec.json.decode(file.read(), type=list[str]))
        except (OSError, msgspec.DecodeError) as error:
            parser.error(f"--keys {args.keys}: {error}")
        if not keys:
            parser.error(f"--keys {args.keys}: no keys")
    try:
        config = LoadConfig(
            url=args.url,
            duration=args.duration,
            keys=keys,
            count=args.count,
            connections=args.connections,
            path=args.path,
            batch=args.batch,
            rate=args.rate,
            method=args.method,
            express_share=args.express_share,
            zipf=args.zipf,
            seed=args.seed,
            warmup=args.warmup,
            timeout=args.timeout,
            drain=args.drain,
        )
    except ValueError as error:
        parser.error(str(error))
    if args.ids_out is None:
        report = trio.run(run_load, config)
    else:
        # Buffered synchronous writes: a flush every 1 MiB stalls the loop far less than
        # handing each id to a worker thread would.
        with open(args.ids_out, "w", buffering=1 << 20) as ids_file:

            def write_id(message_id: str) -> None:
                ids_file.write(message_id + "\n")

            report = trio.run(lambda: run_load(config, on_accepted=write_id))
    sys.stdout.buffer.write(msgspec.json.encode(report) + b"\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
