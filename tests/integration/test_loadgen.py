"""The load generator against small servers on 127.0.0.1: counts, ids, tallies, stopping."""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from smsgw.sim.loadgen import LoadConfig, run_load

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


class Recorder:
    """What the test server saw, and the ids it handed out."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.auth: Counter[str] = Counter()
        self.paths: Counter[str] = Counter()
        self.ids: list[str] = []
        self.refused_items = 0
        self.delay = 0.0
        self._next_id = itertools.count(1)

    async def app(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        key = headers.get(b"authorization", b"").decode()
        self.auth[key] += 1
        self.paths[scope["path"]] += 1
        if body:
            self.bodies.append(json.loads(body))
        if self.delay:
            await trio.sleep(self.delay)
        if key == "Bearer broke":
            status, payload = 402, b'{"type": "insufficient_credit"}'
        elif scope["path"] == "/v1/messages/batch":
            status, payload = 202, json.dumps({"results": self.batch_results(body)}).encode()
        else:
            message_id = f"m{next(self._next_id)}"
            self.ids.append(message_id)
            status, payload = 202, json.dumps({"id": message_id, "status": "queued"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def batch_results(self, body: bytes) -> list[dict[str, Any]]:
        """Like the gateway: an id per accepted item, a problem (no id) for a refused one;
        here every item whose recipient ends in 7 is refused."""
        results: list[dict[str, Any]] = []
        for index, item in enumerate(json.loads(body)["messages"]):
            if item["to"].endswith("7"):
                self.refused_items += 1
                results.append({"index": index, "status": 422, "code": "invalid_field"})
            else:
                message_id = f"m{next(self._next_id)}"
                self.ids.append(message_id)
                results.append({"id": message_id, "status": "queued", "segments": 1, "price": 5})
        return results


@pytest.fixture
async def gateway(nursery: trio.Nursery) -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    binds = await nursery.start(partial(serve, cast(Any, recorder.app), config))
    yield binds[0], recorder


async def start_raw_server(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> str:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_a_one_second_run_counts_every_response(gateway: tuple[str, Recorder]) -> None:
    url, server = gateway
    ids: list[str] = []

    report = await run_load(
        LoadConfig(url=url, keys=("k1", "k2"), duration=1.0, connections=4),
        on_accepted=ids.append,
    )

    assert report.requests > 50
    assert report.requests == len(server.ids) == len(server.bodies)
    assert report.by_status == {"202": report.requests}
    assert (report.errors, report.timeouts, report.unanswered, report.bad_ids) == (0, 0, 0, 0)
    assert sorted(ids) == sorted(server.ids)
    assert report.accepted_ids == len(ids)
    assert report.rate_per_s == pytest.approx(report.requests / report.duration_s, rel=0.01)
    assert 1.0 <= report.duration_s < 2.0
    assert report.latency_ms is not None
    assert 0 < report.latency_ms.p50 <= report.latency_ms.p99 <= report.latency_ms.max
    assert report.connections == 4
    # Round robin over two keys, and well-formed bodies with unique client refs.
    assert set(server.auth) == {"Bearer k1", "Bearer k2"}
    assert abs(server.auth["Bearer k1"] - server.auth["Bearer k2"]) <= 4
    assert all(re.fullmatch(r"\+4479\d{8}", body["to"]) for body in server.bodies)
    assert not any(body["express"] for body in server.bodies)
    refs = [body["client_ref"] for body in server.bodies]
    assert len(set(refs)) == len(refs)


async def test_count_stops_the_run_and_statuses_are_tallied(
    gateway: tuple[str, Recorder],
) -> None:
    url, server = gateway

    report = await run_load(
        LoadConfig(url=url, keys=("rich", "broke"), duration=30.0, count=100, connections=8)
    )

    assert report.requests == 100
    assert report.by_status == {"202": 50, "402": 50}
    assert report.duration_s < 10.0
    # 50 successes over the window; `duration_s` is rounded to the millisecond, which on a
    # run of a few tens of milliseconds moves the quotient by more than 1%.
    assert abs(report.rate_per_s * report.duration_s - 50) <= 0.0005 * report.rate_per_s + 0.1
    assert server.auth == {"Bearer rich": 50, "Bearer broke": 50}


async def test_warmup_requests_are_not_measured(gateway: tuple[str, Recorder]) -> None:
    url, server = gateway

    report = await run_load(
        LoadConfig(url=url, keys=("k",), duration=1.0, warmup=0.5, connections=2)
    )

    assert report.warmup_requests > 0
    assert report.requests > 0
    assert report.requests + report.warmup_requests == len(server.ids)
    assert report.duration_s == pytest.approx(0.5, abs=0.3)


async def test_zipf_favours_the_first_keys_and_express_share_is_honoured(
    gateway: tuple[str, Recorder],
) -> None:
    url, server = gateway
    keys = tuple(f"k{i}" for i in range(10))

    await run_load(
        LoadConfig(
            url=url, keys=keys, zipf=1.5, express_share=0.5, duration=30.0, count=1000, seed=1
        )
    )

    counts = [server.auth[f"Bearer {key}"] for key in keys]
    assert counts[0] > counts[1] > counts[4] > counts[9]
    assert counts[0] > 300  # 1/H(10, 1.5) ~ 0.51 of the traffic
    assert 400 < sum(body["express"] for body in server.bodies) < 600


async def test_same_seed_same_requests(gateway: tuple[str, Recorder]) -> None:
    url, server = gateway
    config = LoadConfig(
        url=url, keys=("k",), duration=30.0, count=20, connections=1, seed=9, client_ref_prefix="t"
    )

    await run_load(config)
    await run_load(config)

    assert server.bodies[:20] == server.bodies[20:]
    assert server.bodies[0] != server.bodies[1]


async def test_no_auth_get_sends_no_body_and_no_key(gateway: tuple[str, Recorder]) -> None:
    url, server = gateway

    report = await run_load(
        LoadConfig(url=url, path="/noop", method="GET", duration=30.0, count=10)
    )

    assert report.by_status == {"202": 10}
    assert server.auth == {"": 10}
    assert server.bodies == []


async def test_a_silent_server_times_out_and_the_run_still_ends(nursery: trio.Nursery) -> None:
    async def never_answer(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    url = await start_raw_server(nursery, never_answer)

    with trio.fail_after(5):
        report = await run_load(
            LoadConfig(url=url, duration=0.5, timeout=0.2, drain=0.5, connections=2)
        )

    assert report.timeouts >= 2
    assert (report.requests, report.unanswered) == (0, 0)
    assert report.latency_ms is None
    assert report.rate_per_s == 0.0


async def test_requests_in_flight_at_the_hard_stop_are_unanswered(nursery: trio.Nursery) -> None:
    async def never_answer(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    url = await start_raw_server(nursery, never_answer)

    with trio.fail_after(5):
        report = await run_load(
            LoadConfig(url=url, duration=0.3, timeout=10.0, drain=0.2, connections=3)
        )

    assert (report.unanswered, report.timeouts, report.errors) == (3, 0, 0)
    assert 0.5 <= report.duration_s < 1.5


async def test_dropped_connections_are_errors_and_reconnected(nursery: trio.Nursery) -> None:
    accepted = 0

    async def hang_up(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await stream.receive_some()
        await stream.aclose()

    url = await start_raw_server(nursery, hang_up)

    with trio.fail_after(5):
        report = await run_load(LoadConfig(url=url, duration=0.5, connections=2))

    assert report.errors >= 4
    assert accepted >= 4  # it kept reconnecting
    assert report.requests == 0


async def test_a_refused_connection_is_counted_and_the_run_ends() -> None:
    with trio.socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    with trio.fail_after(5):
        report = await run_load(
            LoadConfig(url=f"http://127.0.0.1:{port}", duration=0.3, connections=2)
        )

    assert report.errors >= 2
    assert report.requests == 0


async def test_the_command_line_prints_a_report_and_writes_ids(
    gateway: tuple[str, Recorder], tmp_path: Path
) -> None:
    url, server = gateway
    keys = tmp_path / "keys.json"
    keys.write_text('["k1", "k2"]')
    ids_out = tmp_path / "ids.txt"
    command = [sys.executable, "-m", "smsgw.sim.loadgen", "--url", url, "--keys", str(keys)]
    command += ["--duration", "5", "--count", "40", "--connections", "4"]
    command += ["--ids-out", str(ids_out)]

    done = await trio.run_process(command, capture_stdout=True)

    report = json.loads(done.stdout)
    assert report["requests"] == 40
    assert report["by_status"] == {"202": 40}
    assert report["cpu_count"] >= 1
    assert sorted(ids_out.read_text().split()) == sorted(server.ids)


async def test_batch_mode_counts_accepted_items_and_reports_their_ids(
    gateway: tuple[str, Recorder],
) -> None:
    url, server = gateway
    ids: list[str] = []

    report = await run_load(
        LoadConfig(url=url, keys=("k",), duration=30.0, count=20, batch=50, connections=4),
        on_accepted=ids.append,
    )

    assert server.paths == {"/v1/messages/batch": 20}
    assert [len(body["messages"]) for body in server.bodies] == [50] * 20
    refs = [item["client_ref"] for body in server.bodies for item in body["messages"]]
    assert len(set(refs)) == 1000
    assert 50 < server.refused_items < 200  # about a tenth of the recipients end in 7
    assert (report.requests, report.batch, report.by_status) == (20, 50, {"202": 20})
    assert report.items == len(server.ids) == 1000 - server.refused_items
    assert report.items_rejected == server.refused_items
    assert sorted(ids) == sorted(server.ids)
    assert report.accepted_ids == len(ids)
    # duration_s is rounded to the millisecond; this run takes a few dozen of them.
    low, high = report.duration_s - 0.0005, report.duration_s + 0.0005
    assert report.items / high - 0.1 <= report.items_per_s <= report.items / low + 0.1
    assert report.offered_items == 1000


async def test_a_refused_batch_rejects_all_its_items(gateway: tuple[str, Recorder]) -> None:
    url, _ = gateway

    report = await run_load(
        LoadConfig(url=url, keys=("broke",), duration=30.0, count=3, batch=10, connections=1)
    )

    assert report.by_status == {"402": 3}
    assert (report.items, report.items_rejected, report.accepted_ids) == (0, 30, 0)


async def test_rate_paces_the_load_open_loop(gateway: tuple[str, Recorder]) -> None:
    url, _ = gateway

    report = await run_load(
        LoadConfig(url=url, keys=("k",), duration=1.0, rate=400.0, batch=10, connections=4)
    )

    # Closed loop this server answers thousands of requests a second; paced, 40 of 10 each.
    assert report.requests == pytest.approx(40, abs=2)
    assert report.offered_items == pytest.approx(400, abs=20)
    assert report.offered_rate_per_s == pytest.approx(400.0, rel=0.1)
    assert report.target_rate_per_s == 400.0
    # Evenly spread, not a burst at the start: the last request left near the end.
    assert report.duration_s >= 0.9


async def test_a_slow_server_falls_behind_the_schedule_and_it_shows(
    gateway: tuple[str, Recorder],
) -> None:
    url, server = gateway
    server.delay = 0.1  # 10 requests/s on one connection

    report = await run_load(
        LoadConfig(url=url, keys=("k",), duration=1.0, rate=100.0, connections=1, drain=1.0)
    )

    assert 5 <= report.offered_items <= 13
    assert report.offered_rate_per_s < 20.0
    assert report.target_rate_per_s == 100.0


async def test_the_command_line_runs_batches_and_writes_their_ids(
    gateway: tuple[str, Recorder], tmp_path: Path
) -> None:
    url, server = gateway
    keys = tmp_path / "keys.json"
    keys.write_text('["k1"]')
    ids_out = tmp_path / "ids.txt"
    command = [sys.executable, "-m", "smsgw.sim.loadgen", "--url", url, "--keys", str(keys)]
    command += ["--duration", "5", "--count", "4", "--connections", "2", "--batch", "25"]
    command += ["--rate", "1000", "--ids-out", str(ids_out)]

    done = await trio.run_process(command, capture_stdout=True)

    report = json.loads(done.stdout)
    assert report["requests"] == 4
    assert report["items"] == len(server.ids) == 100 - server.refused_items
    assert report["target_rate_per_s"] == 1000.0
    assert sorted(ids_out.read_text().split()) == sorted(server.ids)
