"""The load generator's connections: requests built once per (API key, body length) and sent
one after another on keep-alive sockets with h11, answers tallied in the run's `RunState`."""

from __future__ import annotations

import bisect
import math
import os
import random
from collections.abc import Callable
from typing import cast

import h11
import msgspec
import trio

from smsgw.sim.loadgen_config import LatencyHistogram, LoadConfig

_RECEIVE_SIZE = 65_536
_END_OF_MESSAGE = h11.EndOfMessage()
_RECONNECT_BACKOFF_MIN_S = 0.01
_RECONNECT_BACKOFF_MAX_S = 0.5


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


class RunState:
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
            self.latency.add(answered_at - sent_at)


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


async def _keep_alive_session(run: RunState, sock: trio.socket.SocketType) -> int:
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


async def drive_connection(run: RunState, host: str, port: int) -> None:
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
