"""`Client` (sync) and `AsyncClient` (async, on any loop httpx runs on: asyncio or trio): the
same operations, each one request (`iter_messages` pages through several).

Each operation is written once, in `_calls`: its arguments, docstring, request and how its
answer reads. The two clients make it a method (`_sync`, `_async`) and only send differently:
what one client offers, the other does, with the same signature."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import httpx

from smsgw.client import _calls as calls
from smsgw.client._calls import Call, Time
from smsgw.client.models import Message

DEFAULT_TIMEOUT = 30.0  # seconds; `send_and_wait` waits at most the express deadline in it

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _sync(build: Callable[P, Call[T]]) -> Callable[Concatenate[Client, P], T]:
    """The operation `build` as a `Client` method: its request sent, its answer read."""

    def operation(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = build(*args, **kwargs)
        return call.read(
            self._http.request(
                call.method, call.path, params=call.params, content=call.body, headers=call.headers
            )
        )

    return _named_after(build, operation, "Client")


def _async(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """The operation `build` as an `AsyncClient` method: its request sent, its answer read."""

    async def operation(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = build(*args, **kwargs)
        return call.read(
            await self._http.request(
                call.method, call.path, params=call.params, content=call.body, headers=call.headers
            )
        )

    return _named_after(build, operation, "AsyncClient")


def _named_after(build: Callable[..., Call[Any]], method: F, owner: str) -> F:
    """`method` with `build`'s name, docstring and parameters (after `self`), returning what
    its Call reads: what help() and editors show (type checkers follow the ParamSpec)."""
    method.__name__ = build.__name__
    method.__qualname__ = f"{owner}.{build.__name__}"
    method.__doc__ = build.__doc__
    signature = inspect.signature(build)
    returns = str(signature.return_annotation)  # "Call[X]": annotations are strings here
    assert returns.startswith("Call[") and returns.endswith("]"), returns
    self_ = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_, *signature.parameters.values()],
        return_annotation=returns[len("Call[") : -1],
    )
    return method


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

    send = _sync(calls.send)
    send_and_wait = _sync(calls.send_and_wait)
    batch = _sync(calls.batch)
    get_message = _sync(calls.get_message)
    message_events = _sync(calls.message_events)
    cancel = _sync(calls.cancel)
    list_messages = _sync(calls.list_messages)
    summary = _sync(calls.summary)
    account = _sync(calls.account)
    create_account = _sync(calls.create_account)
    top_up = _sync(calls.top_up)

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

    def iter_export(
        self, *, created_from: Time | None = None, created_to: Time | None = None
    ) -> Iterator[bytes]:
        """The CSV of the messages created in [created_from, created_to), header first, in
        chunks as they arrive. A transfer the gateway had to cut short raises httpx's
        RemoteProtocolError: never a shorter CSV that looks whole."""
        call = calls.export(created_from=created_from, created_to=created_to)
        with self._http.stream(call.method, call.path, params=call.params) as response:
            if response.status_code != 200:
                response.read()  # the problem's body, for its ApiError
            call.read(response)
            yield from response.iter_bytes()

    def export(self, *, created_from: Time | None = None, created_to: Time | None = None) -> bytes:
        """The whole CSV export in memory (`iter_export` for a large range)."""
        return b"".join(self.iter_export(created_from=created_from, created_to=created_to))


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

    send = _async(calls.send)
    send_and_wait = _async(calls.send_and_wait)
    batch = _async(calls.batch)
    get_message = _async(calls.get_message)
    message_events = _async(calls.message_events)
    cancel = _async(calls.cancel)
    list_messages = _async(calls.list_messages)
    summary = _async(calls.summary)
    account = _async(calls.account)
    create_account = _async(calls.create_account)
    top_up = _async(calls.top_up)

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

    async def iter_export(
        self, *, created_from: Time | None = None, created_to: Time | None = None
    ) -> AsyncIterator[bytes]:
        """As `Client.iter_export`."""
        call = calls.export(created_from=created_from, created_to=created_to)
        async with self._http.stream(call.method, call.path, params=call.params) as response:
            if response.status_code != 200:
                await response.aread()  # the problem's body, for its ApiError
            call.read(response)
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
