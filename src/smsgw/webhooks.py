"""HttpCallbackPoster: POSTs status callbacks to customers' URLs with httpx."""

from __future__ import annotations

from collections.abc import Mapping

import httpx


class HttpCallbackPoster:
    """One httpx client for every callback: keep-alive to each receiver, no redirects (a
    redirect could send a signed body somewhere the account did not name), a timeout per
    request. The CallbackSender bounds how many are in flight. Call `aclose` when done."""

    def __init__(self, *, connections: int = 64, timeout: float = 10.0) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=connections,
                max_keepalive_connections=connections,
                keepalive_expiry=30.0,
            ),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": "smsgw-callbacks/1"},
        )

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        # Streamed and closed unread: only the status matters, and a receiver's body (however
        # large) is never read into memory.
        async with self._client.stream(
            "POST", url, content=body, headers=dict(headers)
        ) as response:
            return response.status_code

    async def aclose(self) -> None:
        await self._client.aclose()
