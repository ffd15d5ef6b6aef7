"""The callback poster's SSRF guard at connection time, against a real receiver on 127.0.0.1:
names are resolved by the poster, every address is checked, and the connection goes to the
checked address with the URL's own Host header and SNI."""

from __future__ import annotations

import shutil
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio

from smsgw.connectors.webhooks import HttpCallbackPoster
from smsgw.engine.netguard import DestinationRefused

BODY = b'{"event":"message.status"}'
HEADERS = {"Content-Type": "application/json"}


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server: records each request's head (and the TLS SNI), answers 204."""

    port: int = 0
    heads: list[dict[str, str]] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)

    async def handle(self, stream: trio.abc.Stream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65_536)
            if not chunk:
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        request_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        headers[":request"] = request_line
        while len(rest) < int(headers.get("content-length", "0")):
            rest += await stream.receive_some(65_536)
        self.heads.append(headers)
        await stream.send_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()


@asynccontextmanager
async def receiving(tls: ssl.SSLContext | None = None) -> AsyncIterator[Receiver]:
    receiver = Receiver()

    async def handler(stream: trio.SocketStream) -> None:
        if tls is None:
            await receiver.handle(stream)
        else:
            await receiver.handle(trio.SSLStream(stream, tls, server_side=True))

    if tls is not None:

        def record_sni(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
            receiver.sni.append(name)

        tls.sni_callback = record_sni
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        receiver.port = listeners[0].socket.getsockname()[1]
        yield receiver
        nursery.cancel_scope.cancel()


class FixedResolver:
    """A resolver with fixed answers (a DNS that says what a test needs), recording what was
    asked."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return self.answers[host]


async def test_a_name_resolving_to_loopback_is_refused_in_production() -> None:
    async with receiving() as receiver:
        url = f"http://localhost:{receiver.port}/cb"
        # The receiver is there: outside production the same POST reaches it.
        development = HttpCallbackPoster(production=False)
        try:
            assert await development.post(url, BODY, HEADERS) == 204
        finally:
            await development.aclose()
        assert len(receiver.heads) == 1

        production = HttpCallbackPoster(production=True)
        try:
            with pytest.raises(DestinationRefused, match="loopback"):
                await production.post(url, BODY, HEADERS)
        finally:
            await production.aclose()
        assert len(receiver.heads) == 1  # nothing more arrived


async def test_a_public_name_rebound_to_loopback_is_refused_in_production() -> None:
    resolve = FixedResolver({"hooks.example.com": ["127.0.0.1"]})
    async with receiving() as receiver:
        poster = HttpCallbackPoster(production=True, resolver=resolve)
        try:
            with pytest.raises(DestinationRefused, match=r"127\.0\.0\.1 is loopback"):
                await poster.post(f"http://hooks.example.com:{receiver.port}/cb", BODY, HEADERS)
        finally:
            await poster.aclose()
        assert resolve.asked == ["hooks.example.com"] and receiver.heads == []


@pytest.mark.parametrize(
    "answer",
    [
        ["93.184.216.34", "10.0.0.1"],  # any forbidden address refuses the name
        ["169.254.169.254"],
        ["2606:4700:4700::1111", "::ffff:127.0.0.1"],
        ["64:ff9b::a9fe:a9fe"],
    ],
)
async def test_any_forbidden_address_refuses_the_name_before_connecting(
    answer: list[str],
) -> None:
    poster = HttpCallbackPoster(
        production=True, resolver=FixedResolver({"hooks.example.com": answer})
    )
    try:
        with trio.fail_after(5), pytest.raises(DestinationRefused):
            await poster.post("https://hooks.example.com/cb", BODY, HEADERS)
    finally:
        await poster.aclose()


async def test_the_connection_goes_to_the_checked_address_with_the_urls_host() -> None:
    # `hooks.example.com` is not 127.0.0.1 in any real DNS: reaching the receiver proves the
    # poster connected to the address its resolver answered (and checked), not to a second
    # lookup made by the HTTP library.
    resolve = FixedResolver({"hooks.example.com": ["127.0.0.1"]})
    async with receiving() as receiver:
        poster = HttpCallbackPoster(production=False, resolver=resolve)
        try:
            url = f"http://hooks.example.com:{receiver.port}/cb?x=1"
            assert await poster.post(url, BODY, HEADERS) == 204
        finally:
            await poster.aclose()
    (head,) = receiver.heads
    assert head[":request"] == "POST /cb?x=1 HTTP/1.1"
    assert head["host"] == f"hooks.example.com:{receiver.port}"
    assert head["content-length"] == str(len(BODY))


async def test_outside_production_only_loopback_is_reached() -> None:
    poster = HttpCallbackPoster(
        production=False, resolver=FixedResolver({"hooks.example.com": ["93.184.216.34"]})
    )
    try:
        with trio.fail_after(5), pytest.raises(DestinationRefused, match="not loopback"):
            await poster.post("http://hooks.example.com/cb", BODY, HEADERS)
    finally:
        await poster.aclose()


async def test_redirects_are_not_followed() -> None:
    async def redirect(stream: trio.SocketStream) -> None:
        await stream.receive_some(65_536)
        await stream.send_all(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, redirect, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        poster = HttpCallbackPoster(production=False)
        try:
            assert await poster.post(f"http://127.0.0.1:{port}/cb", BODY, HEADERS) == 307
        finally:
            await poster.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_https_keeps_the_names_sni_and_certificate_check(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await trio.run_process(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=hooks.example.com", "-addext", "subjectAltName=DNS:hooks.example.com"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    resolve = FixedResolver({"hooks.example.com": ["127.0.0.1"]})
    async with receiving(server) as receiver:
        poster = HttpCallbackPoster(production=False, resolver=resolve, ssl_context=client)
        try:
            url = f"https://hooks.example.com:{receiver.port}/cb"
            assert await poster.post(url, BODY, HEADERS) == 204
        finally:
            await poster.aclose()
    # The certificate was checked against the URL's name (it names no IP address), the SNI
    # and Host are the URL's.
    assert "hooks.example.com" in receiver.sni
    assert receiver.heads[0]["host"] == f"hooks.example.com:{receiver.port}"
