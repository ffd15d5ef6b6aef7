"""`Client` (sync) and `AsyncClient` (async, on any loop httpx runs on: asyncio or trio): the
same operations, each one request (`iter_messages` pages through several)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from smsgw.client import _calls as calls
from smsgw.client.models import (
    Accepted,
    Account,
    AccountCreated,
    Balance,
    BatchResponse,
    Message,
    MessagePage,
    OutgoingMessage,
    Summary,
)

Time = datetime | str  # an aware datetime, or RFC 3339 text with its offset
DEFAULT_TIMEOUT = 30.0  # seconds; `send_and_wait` waits at most the express deadline in it


class Client:
    """The gateway's API with one key (an account's; the admin's for `create_account` and
    `top_up`). Raises ApiError for every problem answer; httpx's own errors for the
    transport. Close it, or use it as a context manager."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _do(self, call: calls.Call) -> httpx.Response:
        return self._http.request(
            call.method, call.path, params=call.params, content=call.body, headers=call.headers
        )

    def send(
        self,
        to: str,
        text: str,
        *,
        sender: str | None = None,
        express: bool = False,
        client_ref: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Accepted | Message:
        """Send one message: `Accepted` once it is stored and its price held; the existing
        `Message` when the account already used `client_ref` (nothing new is stored)."""
        call = calls.send(
            to,
            text,
            sender=sender,
            express=express,
            client_ref=client_ref,
            callback_url=callback_url,
            wait=False,
            idempotency_key=idempotency_key,
        )
        return calls.sent(self._do(call))

    def send_and_wait(
        self,
        to: str,
        text: str,
        *,
        sender: str | None = None,
        client_ref: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Message:
        """Send an express message (an OTP) and answer once the operator took it: the sent
        `Message`. ApiError 504 `deadline_exceeded` or 502 `operator_refused` when it could
        not be sent (failed and refunded), 503 `express_unavailable` when it could not even
        be tried (nothing held)."""
        call = calls.send(
            to,
            text,
            sender=sender,
            express=True,
            client_ref=client_ref,
            callback_url=callback_url,
            wait=True,
            idempotency_key=idempotency_key,
        )
        return calls.message(self._do(call))

    def batch(
        self,
        messages: Sequence[OutgoingMessage | Mapping[str, Any]],
        *,
        atomic: bool = False,
        idempotency_key: str | None = None,
    ) -> BatchResponse:
        """Send up to 1,000 messages: one result per item, in order. Returned (not raised)
        when every item was rejected too (`accepted == 0`); with `atomic`, a refusal of the
        whole batch is an ApiError."""
        return calls.batch_answer(
            self._do(calls.batch(messages, atomic=atomic, idempotency_key=idempotency_key))
        )

    def get_message(self, message_id: str) -> Message:
        return calls.message(self._do(calls.get_message(message_id)))

    def list_messages(
        self,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        status: str | None = None,
        to: str | None = None,
        client_ref: str | None = None,
        express: bool | None = None,
        created_from: Time | None = None,
        created_to: Time | None = None,
    ) -> MessagePage:
        """One page of the account's messages, newest first; pass its `next_cursor` as
        `cursor` for the next one."""
        call = calls.list_messages(
            limit=limit,
            cursor=cursor,
            status=status,
            to=to,
            client_ref=client_ref,
            express=express,
            created_from=created_from,
            created_to=created_to,
        )
        return calls.message_page(self._do(call))

    def iter_messages(self, *, page_size: int = 100, **filters: Any) -> Iterator[Message]:
        """Every message that matches `filters` (as `list_messages` takes them), newest
        first, a page of `page_size` at a time."""
        cursor: str | None = None
        while True:
            page = self.list_messages(limit=page_size, cursor=cursor, **filters)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def summary(
        self,
        *,
        created_from: Time | None = None,
        created_to: Time | None = None,
        group_by: Literal["day", "status"] = "day",
    ) -> Summary:
        call = calls.summary(created_from=created_from, created_to=created_to, group_by=group_by)
        return calls.summary_answer(self._do(call))

    def iter_export(
        self, *, created_from: Time | None = None, created_to: Time | None = None
    ) -> Iterator[bytes]:
        """The CSV of the messages created in [created_from, created_to), header first, in
        chunks as they arrive. A transfer the gateway had to cut short raises httpx's
        RemoteProtocolError: never a shorter CSV that looks whole."""
        call = calls.export(created_from=created_from, created_to=created_to)
        with self._http.stream(call.method, call.path, params=call.params) as response:
            if response.status_code != 200:
                response.read()
                raise calls.problem(response)
            yield from response.iter_bytes()

    def export(self, *, created_from: Time | None = None, created_to: Time | None = None) -> bytes:
        """The whole CSV export in memory (`iter_export` for a large range)."""
        return b"".join(self.iter_export(created_from=created_from, created_to=created_to))

    def account(self) -> Account:
        return calls.account_answer(self._do(calls.account()))

    def create_account(self, name: str, *, credit: int = 0) -> AccountCreated:
        """Admin: a new account; its API key and signing secret are shown only here."""
        return calls.created_answer(self._do(calls.create_account(name, credit)))

    def top_up(
        self, account_id: int, amount: int, *, idempotency_key: str | None = None
    ) -> Balance:
        """Admin: add `amount` to an account's credit; with `idempotency_key`, a retry
        credits once."""
        return calls.balance_answer(self._do(calls.top_up(account_id, amount, idempotency_key)))


class AsyncClient:
    """`Client`'s operations, awaited. Close it with `aclose`, or use `async with`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _do(self, call: calls.Call) -> httpx.Response:
        return await self._http.request(
            call.method, call.path, params=call.params, content=call.body, headers=call.headers
        )

    async def send(
        self,
        to: str,
        text: str,
        *,
        sender: str | None = None,
        express: bool = False,
        client_ref: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Accepted | Message:
        """As `Client.send`."""
        call = calls.send(
            to,
            text,
            sender=sender,
            express=express,
            client_ref=client_ref,
            callback_url=callback_url,
            wait=False,
            idempotency_key=idempotency_key,
        )
        return calls.sent(await self._do(call))

    async def send_and_wait(
        self,
        to: str,
        text: str,
        *,
        sender: str | None = None,
        client_ref: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Message:
        """As `Client.send_and_wait`."""
        call = calls.send(
            to,
            text,
            sender=sender,
            express=True,
            client_ref=client_ref,
            callback_url=callback_url,
            wait=True,
            idempotency_key=idempotency_key,
        )
        return calls.message(await self._do(call))

    async def batch(
        self,
        messages: Sequence[OutgoingMessage | Mapping[str, Any]],
        *,
        atomic: bool = False,
        idempotency_key: str | None = None,
    ) -> BatchResponse:
        """As `Client.batch`."""
        call = calls.batch(messages, atomic=atomic, idempotency_key=idempotency_key)
        return calls.batch_answer(await self._do(call))

    async def get_message(self, message_id: str) -> Message:
        return calls.message(await self._do(calls.get_message(message_id)))

    async def list_messages(
        self,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        status: str | None = None,
        to: str | None = None,
        client_ref: str | None = None,
        express: bool | None = None,
        created_from: Time | None = None,
        created_to: Time | None = None,
    ) -> MessagePage:
        """As `Client.list_messages`."""
        call = calls.list_messages(
            limit=limit,
            cursor=cursor,
            status=status,
            to=to,
            client_ref=client_ref,
            express=express,
            created_from=created_from,
            created_to=created_to,
        )
        return calls.message_page(await self._do(call))

    async def iter_messages(
        self, *, page_size: int = 100, **filters: Any
    ) -> AsyncIterator[Message]:
        """As `Client.iter_messages`."""
        cursor: str | None = None
        while True:
            page = await self.list_messages(limit=page_size, cursor=cursor, **filters)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def summary(
        self,
        *,
        created_from: Time | None = None,
        created_to: Time | None = None,
        group_by: Literal["day", "status"] = "day",
    ) -> Summary:
        call = calls.summary(created_from=created_from, created_to=created_to, group_by=group_by)
        return calls.summary_answer(await self._do(call))

    async def iter_export(
        self, *, created_from: Time | None = None, created_to: Time | None = None
    ) -> AsyncIterator[bytes]:
        """As `Client.iter_export`."""
        call = calls.export(created_from=created_from, created_to=created_to)
        async with self._http.stream(call.method, call.path, params=call.params) as response:
            if response.status_code != 200:
                await response.aread()
                raise calls.problem(response)
            async for chunk in response.aiter_bytes():
                yield chunk

    async def export(
        self, *, created_from: Time | None = None, created_to: Time | None = None
    ) -> bytes:
        """As `Client.export`."""
        chunks = [
            c async for c in self.iter_export(created_from=created_from, created_to=created_to)
        ]
        return b"".join(chunks)

    async def account(self) -> Account:
        return calls.account_answer(await self._do(calls.account()))

    async def create_account(self, name: str, *, credit: int = 0) -> AccountCreated:
        """As `Client.create_account` (admin)."""
        return calls.created_answer(await self._do(calls.create_account(name, credit)))

    async def top_up(
        self, account_id: int, amount: int, *, idempotency_key: str | None = None
    ) -> Balance:
        """As `Client.top_up` (admin)."""
        call = calls.top_up(account_id, amount, idempotency_key)
        return calls.balance_answer(await self._do(call))
