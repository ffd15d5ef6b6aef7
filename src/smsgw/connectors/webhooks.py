"""HttpCallbackPoster: POSTs status callbacks to customers' URLs, connecting only to addresses
the SSRF guard (engine/netguard.py) allows."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping

import httpcore
import httpx
import trio

from smsgw.engine.netguard import DestinationRefused, address_problem, literal_address

# host, port -> the addresses it resolves to (IP literals), in the resolver's order
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to now, through the system resolver (in a thread)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network layer with the SSRF guard: each new connection resolves the host,
    refuses (DestinationRefused) if any of its addresses is forbidden, and connects to the
    checked addresses themselves, so a DNS answer that changes after the check (rebinding)
    cannot send it elsewhere. TLS and the Host header still use the URL's host: httpcore
    passes that name to `start_tls` for SNI and certificate checks."""

    def __init__(self, *, production: bool, resolver: Resolver = resolve) -> None:
        self._production = production
        self._resolve = resolver
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            found = await self._resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"resolving {host}: {exc}") from exc
        addresses = [literal_address(a) for a in found]
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        for address in addresses:
            if address is None:  # a resolver answers with addresses only
                raise DestinationRefused(f"{host} resolves to something not an IP address")
            problem = address_problem(address, production=self._production)
            if problem:
                raise DestinationRefused(f"{host}: {problem}")
        error: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:  # try the next address, as a resolver's
                error = exc  # list is meant
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused("callbacks do not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class HttpCallbackPoster:
    """One httpcore connection pool for every callback: keep-alive to each receiver, a timeout
    per request, and no redirects (httpcore never follows them: a redirect could send a signed
    body somewhere the account did not name, or to an address the guard refuses). No proxy
    from the environment either: the guard checks the receiver's own address. The
    CallbackSender bounds how many are in flight. Call `aclose` when done."""

    def __init__(
        self,
        *,
        production: bool,
        connections: int = 64,
        timeout: float = 10.0,
        resolver: Resolver = resolve,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(),
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=30.0,
            network_backend=GuardedBackend(production=production, resolver=resolver),
        )
        self._timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        # httpx's URL parser, as before: IDNA host names, percent-encoded paths. Host is the
        # URL's (brackets around IPv6, the port unless the default); httpcore adds
        # Content-Length.
        target = httpx.URL(url)
        raw_headers = [(b"Host", target.netloc), (b"User-Agent", b"smsgw-callbacks/1")]
        raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
        # Streamed and closed unread: only the status matters, and a receiver's body (however
        # large) is never read into memory.
        async with self._pool.stream(
            "POST",
            httpcore.URL(
                scheme=target.raw_scheme,
                host=target.raw_host,
                port=target.port,
                target=target.raw_path,
            ),
            headers=raw_headers,
            content=body,
            extensions={"timeout": self._timeouts},
        ) as response:
            return response.status

    async def aclose(self) -> None:
        await self._pool.aclose()
