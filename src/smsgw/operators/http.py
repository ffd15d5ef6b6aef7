"""HttpOperator: a `Provider` that submits each window of messages in one HTTP POST."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import msgspec
import trio

from smsgw.engine.messages import OutboundSms, SendResult
from smsgw.operators.wire import SUBMIT_PATH, SubmitItem, SubmitResponse

_encode = msgspec.json.Encoder().encode
_decode_response = msgspec.json.Decoder(SubmitResponse).decode
_UNREACHABLE = SendResult("temporary", reason="operator_unreachable")
_BAD_RESPONSE = SendResult("temporary", reason="operator_bad_response")


class HttpOperator:
    """An operator reached over HTTP/1.1 with keep-alive (the wire format is in `wire`).

    `send_batch` makes one POST per batch (a batch above `max_batch` is split into
    concurrent POSTs) and returns one result per message, in order. It never raises for the
    operator's sake: a transport error (refused, reset, timed out) makes every message of the
    batch temporary with reason "operator_unreachable", an HTTP status other than 200
    "operator_http_<status>", and a body that is not one result per message
    "operator_bad_response". Each message's id goes with it as the operator's idempotency key,
    so the retry of a batch whose answer was lost cannot send twice. Cancellation (the pool's
    timeout) abandons the request and its connection.

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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if connections < 1 or max_batch < 1 or not timeout > 0:
            raise ValueError("connections and max_batch must be >= 1, timeout > 0")
        self._name = name if name is not None else f"http:{httpx.URL(url).netloc.decode()}"
        self._max_batch = max_batch
        self._client = httpx.AsyncClient(
            base_url=url,
            limits=httpx.Limits(
                max_connections=connections,
                max_keepalive_connections=connections,
                keepalive_expiry=60.0,
            ),
            timeout=httpx.Timeout(timeout),
            headers={"content-type": "application/json"},
            transport=transport,
        )
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

    async def aclose(self) -> None:
        await self._client.aclose()

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
        try:
            response = await self._client.post(SUBMIT_PATH, content=body)
        except httpx.TransportError:
            self.counts["unreachable"] += 1
            return [_UNREACHABLE] * count
        if response.status_code != 200:
            self.counts["http_errors"] += 1
            failure = SendResult("temporary", reason=f"operator_http_{response.status_code}")
            return [failure] * count
        try:
            results = _decode_response(response.content).results
        except msgspec.DecodeError:
            results = []
        if len(results) != count:
            self.counts["bad_responses"] += 1
            return [_BAD_RESPONSE] * count
        return [SendResult(r.kind, r.operator_message_id, r.reason) for r in results]
