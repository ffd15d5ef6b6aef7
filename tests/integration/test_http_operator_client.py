"""HttpOperator against the operator server on 127.0.0.1, and against broken operators."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from functools import partial

import h11
import httpx
import pytest
import trio

from smsgw.connectors.operators.http import MAX_RESPONSE_BYTES, HttpOperator
from smsgw.engine.messages import OutboundSms, SendResult
from smsgw.engine.ports import Provider
from smsgw.sim.operator import OperatorProfile, SimulatedOperator
from smsgw.sim.operator_server import OperatorApp, check_loopback, serve_operator


def sms(n: int) -> OutboundSms:
    return OutboundSms(
        id=f"m{n}",
        account_id=1,
        to=f"+4479{n:08d}",
        sender="smsgw",
        text=f"hello {n}",
        segments=1,
        price=5,
        express=False,
        created_at=0.0,
    )


SENT_ONE = b'{"results": [{"kind": "sent", "operator_message_id": "x"}]}'


def profile(**fields: float) -> OperatorProfile:
    base: dict[str, float] = {"latency_ms_median": 1.0, "latency_ms_p99": 2.0, "seed": 3}
    return OperatorProfile(name="op", **{**base, **fields})  # type: ignore[arg-type]


async def start(nursery: trio.Nursery, app: OperatorApp) -> str:
    url: str = await nursery.start(partial(serve_operator, app, port=0))
    return url


async def start_canned(
    nursery: trio.Nursery, status: int, body: bytes, seen: list[object], *, drop: bool = False
) -> str:
    """A loopback HTTP server that answers every request with `status` and `body`, keeping
    each request's JSON in `seen`. With `drop` it closes each connection after its answer
    without saying so, as a server's keep-alive timeout does to an idle connection."""

    async def answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the client may hang up first
            await answer_all(stream)

    async def answer_all(stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        parts: list[bytes] = []
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65_536)
                if not data:
                    return
                http.receive_data(data)
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                seen.append(json.loads(b"".join(parts)))
                parts.clear()
                headers = [("Content-Length", str(len(body)))]
                out = [h11.Response(status_code=status, headers=headers), h11.Data(data=body)]
                out.append(h11.EndOfMessage())
                await stream.send_all(b"".join(http.send(e) or b"" for e in out))
                if drop:
                    await stream.aclose()
                    return
                http.start_next_cycle()

    listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.fixture
async def operator(nursery: trio.Nursery) -> AsyncIterator[tuple[HttpOperator, OperatorApp]]:
    app = OperatorApp(SimulatedOperator(profile(p_temporary=0.2, p_permanent=0.1)), max_batch=50)
    provider = HttpOperator(await start(nursery, app), connections=4)
    try:
        yield provider, app
    finally:
        await provider.aclose()


def test_is_a_provider() -> None:
    provider: Provider = HttpOperator("http://127.0.0.1:9", name="op-a")
    assert provider.name == "op-a"
    assert HttpOperator("http://127.0.0.1:9").name == "http:127.0.0.1:9"


async def test_outcomes_match_the_in_process_operator_with_the_same_seed(
    operator: tuple[HttpOperator, OperatorApp],
) -> None:
    provider, app = operator
    batch = [sms(n) for n in range(40)]

    over_http = await provider.send_batch(batch)
    in_process = await SimulatedOperator(profile(p_temporary=0.2, p_permanent=0.1)).send_batch(
        batch
    )

    assert over_http == in_process
    assert {r.kind for r in over_http} == {"sent", "temporary", "permanent"}
    assert app.stats()["requests"] == 1
    assert provider.stats()["messages"] == 40


async def test_a_sent_id_is_not_sent_twice(operator: tuple[HttpOperator, OperatorApp]) -> None:
    provider, app = operator
    batch = [sms(n) for n in range(30)]

    first = await provider.send_batch(batch)
    again = await provider.send_batch(batch)

    sent = [i for i, r in enumerate(first) if r.kind == "sent"]
    assert sent
    assert [again[i] for i in sent] == [first[i] for i in sent]
    assert app.operator.stats()["duplicates_suppressed"] == len(sent)


async def test_a_batch_above_the_limit_is_split_and_kept_in_order(nursery: trio.Nursery) -> None:
    reliable = OperatorApp(SimulatedOperator(profile(p_temporary=0.0, p_permanent=0.0)))
    provider = HttpOperator(await start(nursery, reliable), max_batch=7)
    try:
        results = await provider.send_batch([sms(n) for n in range(30)])
    finally:
        await provider.aclose()

    assert [r.kind for r in results] == ["sent"] * 30
    assert reliable.requests == 5
    assert len({r.operator_message_id for r in results}) == 30


async def test_the_server_refuses_a_batch_above_its_limit(
    operator: tuple[HttpOperator, OperatorApp],
) -> None:
    provider, app = operator

    results = await provider.send_batch([sms(n) for n in range(51)])

    assert results == [SendResult("temporary", reason="operator_http_413")] * 51
    assert app.refused == 1
    assert app.operator.stats()["calls"] == 0


async def test_an_unreachable_operator_makes_every_message_temporary() -> None:
    with trio.socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = HttpOperator(f"http://127.0.0.1:{port}", timeout=2.0)
    try:
        with trio.fail_after(5):
            results = await provider.send_batch([sms(1), sms(2)])
    finally:
        await provider.aclose()

    assert results == [SendResult("temporary", reason="operator_unreachable")] * 2
    assert provider.stats()["unreachable"] == 1


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, b"oops", "operator_http_500"),
        (200, b"not json", "operator_bad_response"),
        (200, b'{"results": [{"kind": "sent"}]}', "operator_bad_response"),  # 1 for 2
        (200, b'{"results": [{"kind": "maybe"}, {"kind": "sent"}]}', "operator_bad_response"),
    ],
)
async def test_a_broken_answer_makes_every_message_temporary(
    nursery: trio.Nursery, status: int, body: bytes, reason: str
) -> None:
    seen: list[object] = []
    url = await start_canned(nursery, status, body, seen)
    provider = HttpOperator(url)
    try:
        results = await provider.send_batch([sms(1), sms(2)])
    finally:
        await provider.aclose()

    assert results == [SendResult("temporary", reason=reason)] * 2
    assert seen == [
        [
            {"id": "m1", "to": "+447900000001", "sender": "smsgw", "text": "hello 1"},
            {"id": "m2", "to": "+447900000002", "sender": "smsgw", "text": "hello 2"},
        ]
    ]


async def test_the_pool_timeout_cancels_a_slow_operator(nursery: trio.Nursery) -> None:
    slow = OperatorApp(SimulatedOperator(profile(latency_ms_median=5_000, latency_ms_p99=5_000)))
    provider = HttpOperator(await start(nursery, slow))
    try:
        with trio.move_on_after(0.2) as scope:
            await provider.send_batch([sms(1)])
        assert scope.cancelled_caught
        # The connection it abandoned does not stop the next batch.
        fast = OperatorApp(SimulatedOperator(profile()))
        other = HttpOperator(await start(nursery, fast))
        try:
            assert len(await other.send_batch([sms(2)])) == 1
        finally:
            await other.aclose()
    finally:
        await provider.aclose()


async def test_bad_requests_get_400_and_stats_are_served(nursery: trio.Nursery) -> None:
    app = OperatorApp(SimulatedOperator(profile()))
    url = await start(nursery, app)
    async with httpx.AsyncClient(base_url=url) as client:
        bad = await client.post("/submit", content=b'[{"id": 1}]')
        missing = await client.get("/nowhere")
        stats = await client.get("/stats")

    assert bad.status_code == 400
    assert missing.status_code == 404
    assert stats.json()["refused"] == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "example.com"])
def test_only_loopback_is_served(host: str) -> None:
    with pytest.raises(ValueError):
        check_loopback(host)
    check_loopback("127.0.0.1")


async def test_the_command_announces_its_url_and_stops_on_sigterm() -> None:
    command = [sys.executable, "-m", "smsgw.sim.operator_server", "--port", "0"]
    command += ["--latency-ms-median", "1", "--latency-ms-p99", "2", "--p-temporary", "0"]
    command += ["--p-permanent", "0"]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, command, stdout=-1, check=False)  # -1: subprocess.PIPE
        )
        try:
            with trio.fail_after(20):
                line = b""
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive_some(4096)
                url = json.loads(line)["url"]
                provider = HttpOperator(url)
                try:
                    results = await provider.send_batch([sms(1)])
                finally:
                    await provider.aclose()
            assert [r.kind for r in results] == ["sent"]
        finally:
            process.terminate()
    assert process.returncode == 0


async def test_connections_are_kept_alive(nursery: trio.Nursery) -> None:
    seen: list[object] = []
    url = await start_canned(nursery, 200, SENT_ONE, seen)
    provider = HttpOperator(url, connections=1)
    try:
        for n in range(3):
            assert (await provider.send_batch([sms(n)]))[0].kind == "sent"
        assert provider.open_connections() == 1
    finally:
        await provider.aclose()
    assert len(seen) == 3 and provider.open_connections() == 0


async def test_a_request_in_flight_at_aclose_does_not_keep_its_connection(
    nursery: trio.Nursery,
) -> None:
    slow = OperatorApp(SimulatedOperator(profile(latency_ms_median=200, latency_ms_p99=200)))
    provider = HttpOperator(await start(nursery, slow))
    results: list[SendResult] = []

    async def send() -> None:
        results.extend(await provider.send_batch([sms(1)]))

    async with trio.open_nursery() as inner:
        inner.start_soon(send)
        await trio.sleep(0.05)
        await provider.aclose()

    assert len(results) == 1 and provider.open_connections() == 0


async def test_a_connection_the_operator_closed_while_idle_is_replaced(
    nursery: trio.Nursery,
) -> None:
    seen: list[object] = []
    provider = HttpOperator(await start_canned(nursery, 200, SENT_ONE, seen, drop=True))
    try:
        for n in range(3):
            with trio.fail_after(5):
                assert (await provider.send_batch([sms(n)]))[0].kind == "sent"
    finally:
        await provider.aclose()

    # Each batch after the first found its kept connection closed and went again on a new one.
    assert provider.stats()["unreachable"] == 0
    assert [item[0]["id"] for item in seen] == ["m0", "m1", "m2"]  # type: ignore[index]


async def test_an_answer_past_the_size_limit_is_not_read(nursery: trio.Nursery) -> None:
    huge = b" " * (MAX_RESPONSE_BYTES + 1)
    provider = HttpOperator(await start_canned(nursery, 200, huge, []))
    try:
        results = await provider.send_batch([sms(1)])
    finally:
        await provider.aclose()

    assert results == [SendResult("temporary", reason="operator_bad_response")]
    assert provider.stats()["bad_responses"] == 1 and provider.open_connections() == 0


def test_only_http_urls_are_operators() -> None:
    for url in ("ftp://127.0.0.1/", "127.0.0.1:80", "http://"):
        with pytest.raises(ValueError):
            HttpOperator(url)
    assert HttpOperator("https://op.example:8443/v2").name == "http:op.example:8443"
