"""HttpOperator: a `Provider` that submits each window of messages in one HTTP POST.

The client is h11 over trio streams with a small keep-alive pool, not httpx: a profile of the
gateway sending 4,000 msg/s to an operator over loopback spent 30% of its process in httpx and
httpcore, about 3 ms a request, most of it in the connection pool checking every connection's
socket for each request it placed. Here a request takes an idle connection off a stack.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import h11
import msgspec
import trio

from smsgw.connectors.operators.wire import SUBMIT_PATH, SubmitItem, SubmitResponse
from smsgw.engine.messages import OutboundSms, SendResult

_encode = msgspec.json.Encoder().encode
_decode_response = msgspec.json.Decoder(SubmitResponse).decode
_UNREACHABLE = SendResult("temporary", reason="operator_unreachable")
_BAD_RESPONSE = SendResult("temporary", reason="operator_bad_response")
_READ_SIZE = 65_536
# An answer is about 60 bytes a message; one far larger is not an answer (and is not read).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# What a request over a broken or closed connection, or a broken answer, raises.
_TRANSPORT_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
    EOFError,
)


class _TooLarge(Exception):
    """The operator's answer is longer than MAX_RESPONSE_BYTES."""


class _Connection:
    """One keep-alive HTTP/1.1 connection: one request at a time."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)
        self.used = False  # has answered a request: the server may have closed it since

    async def request(self, head: h11.Request, body: bytes) -> tuple[int, bytes]:
        """Send one request and read its whole answer: (status, body). Raises one of
        _TRANSPORT_ERRORS when the connection breaks or the answer is not HTTP."""
        http = self.http
        events = (head, h11.Data(data=body), h11.EndOfMessage())
        await self.stream.send_all(b"".join(http.send(event) or b"" for event in events))
        status = 0
        parts: list[bytes] = []
        size = 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(bytes(await self.stream.receive_some(_READ_SIZE)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise _TooLarge
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("the operator closed the connection")
        self.used = True
        return status, b"".join(parts)

    def reusable(self) -> bool:
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
            return True
        return False


class HttpOperator:
    """An operator reached over HTTP/1.1 with keep-alive (the wire format is in `wire`).

    `send_batch` makes one POST per batch (a batch above `max_batch` is split into
    concurrent POSTs) and returns one result per message, in order. It never raises for the
    operator's sake: a transport error (refused, reset, timed out) makes every message of the
    batch temporary with reason "operator_unreachable", an HTTP status other than 200
    "operator_http_<status>", and a body that is not one result per message
    "operator_bad_response". Each message's id goes with it as the operator's idempotency key,
    so the retry of a batch whose answer was lost cannot send twice; for the same reason a
    batch whose kept-alive connection turns out closed is sent once more on a new one.
    Cancellation (the pool's timeout) abandons the request and closes its connection.

    At most `connections` requests are open at once; more wait for a free connection, within
    `timeout`. Call `aclose` when done.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        connections: int = 32,
        timeout: float = 30.0,
        max_batch: int = 1_000,
    ) -> None:
        if connections < 1 or max_batch < 1 or not timeout > 0:
            raise ValueError("connections and max_batch must be >= 1, timeout > 0")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an operator URL is http:// or https:// and a host, not {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        netloc = parts.netloc.rpartition("@")[2]
        self._name = name if name is not None else f"http:{netloc}"
        self._path = parts.path.rstrip("/") + SUBMIT_PATH
        self._headers = [("Host", netloc), ("Content-Type", "application/json")]
        self._max_batch = max_batch
        self._timeout = timeout
        self._limit = trio.CapacityLimiter(connections)
        self._idle: list[_Connection] = []
        self._closed = False  # after `aclose`, a connection that finishes its request closes
        self._ssl = ssl.create_default_context() if self._https else None
        self.counts: dict[str, int] = {
            "requests": 0,
            "messages": 0,
            "unreachable": 0,
            "http_errors": 0,
            "bad_responses": 0,
        }

    @property
    def name(self) -> str:
        return self._name

    def stats(self) -> dict[str, Any]:
        return dict(self.counts)

    def open_connections(self) -> int:
        """Connections kept open for the next requests (idle)."""
        return len(self._idle)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        if len(batch) <= self._max_batch:
            return await self._post(batch)
        chunks = [
            batch[start : start + self._max_batch]
            for start in range(0, len(batch), self._max_batch)
        ]
        answers: list[list[SendResult]] = [[] for _ in chunks]

        async def post(index: int) -> None:
            answers[index] = await self._post(chunks[index])

        async with trio.open_nursery() as nursery:
            for index in range(len(chunks)):
                nursery.start_soon(post, index)
        return [result for answer in answers for result in answer]

    async def _post(self, batch: Sequence[OutboundSms]) -> list[SendResult]:
        if not batch:
            return []
        count = len(batch)
        body = _encode([SubmitItem(sms.id, sms.to, sms.sender, sms.text) for sms in batch])
        self.counts["requests"] += 1
        self.counts["messages"] += count
        answer: tuple[int, bytes] | None = None
        with trio.move_on_after(self._timeout):
            try:
                answer = await self._exchange(body)
            except _TooLarge:
                self.counts["bad_responses"] += 1
                return [_BAD_RESPONSE] * count
        if answer is None:
            self.counts["unreachable"] += 1
            return [_UNREACHABLE] * count
        status, content = answer
        if status != 200:
            self.counts["http_errors"] += 1
            return [SendResult("temporary", reason=f"operator_http_{status}")] * count
        try:
            results = _decode_response(content).results
        except msgspec.DecodeError:
            results = []
        if len(results) != count:
            self.counts["bad_responses"] += 1
            return [_BAD_RESPONSE] * count
        return [SendResult(r.kind, r.operator_message_id, r.reason) for r in results]

    async def _exchange(self, body: bytes) -> tuple[int, bytes] | None:
        """(status, body) of one POST, or None when the operator could not be reached. A
        kept-alive connection the operator closed while it was idle gets one retry on a new
        connection (the ids make the resend safe); a new connection's failure is final."""
        head = h11.Request(
            method="POST",
            target=self._path,
            headers=[*self._headers, ("Content-Length", str(len(body)))],
        )
        async with self._limit:
            while True:
                connection = self._idle.pop() if self._idle else None
                try:
                    if connection is None:
                        connection = _Connection(await self._connect())
                    answer = await connection.request(head, body)
                except _TRANSPORT_ERRORS:
                    if connection is not None:
                        await trio.aclose_forcefully(connection.stream)
                        if connection.used:
                            continue
                    return None
                except BaseException:  # cancelled or too large: the connection is unusable
                    if connection is not None:
                        await trio.aclose_forcefully(connection.stream)
                    raise
                if connection.reusable() and not self._closed:
                    self._idle.append(connection)
                else:
                    await trio.aclose_forcefully(connection.stream)
                return answer

    async def _connect(self) -> trio.abc.Stream:
        if self._ssl is not None:
            return await trio.open_ssl_over_tcp_stream(
                self._host, self._port, ssl_context=self._ssl
            )
        return await trio.open_tcp_stream(self._host, self._port)
