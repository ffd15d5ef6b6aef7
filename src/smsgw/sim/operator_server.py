"""A simulated operator in its own process: SimulatedOperator behind the HTTP batch protocol.

    python -m smsgw.sim.operator_server --port 0 [--latency-ms-median 100 --latency-ms-p99 200
        --p-temporary 0.03 --p-permanent 0.02 --seed 0 --max-batch 1000
        --max-per-second 2000 --max-queue-s 1]

POST /submit takes a JSON list of messages [{id, to, sender, text}] and answers
{"results": [{kind, operator_message_id?, reason?}, ...]}, one per message in order, after one
simulated round trip: the outcome model, the latency and the dedupe by id are
`SimulatedOperator.send_batch`'s, and so is `--max-per-second`, the rate its link takes
(batches queue behind each other on it; past `--max-queue-s` of queue, a batch is refused at once
as "throttled"). GET /stats gives its counters. It listens on loopback only,
prints one line {"event": "listening", "url": ...} on stdout when ready (like `smsgw serve`),
and stops on SIGTERM or SIGINT.

Delivery reports: with `--dlr-url GATEWAY --dlr-key KEY` (or `--dlr` and later POST /dlr-target
with {"url", "key"}, for a gateway whose port is known only after this server started), each new
`sent` gets a delayed report (`--dlr-delivered-ratio`, `--dlr-delay-ms-median`,
`--dlr-delay-ms-p99`) POSTed in batches to GATEWAY/v1/dlr/NAME, where NAME is `--dlr-operator`
(default: the name the gateway's HttpOperator gives this server, "http:HOST:PORT").

Outages: POST /outage with {"mode": "errors"} (every attempt fails for now), {"mode":
"timeouts"} (batches are taken and never answered) or {"mode": null} (back to normal).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Literal

import msgspec
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

from smsgw.connectors.operators.wire import SUBMIT_PATH, SubmitItem, SubmitResponse, SubmitResult
from smsgw.engine.messages import OutboundSms
from smsgw.sim.dlr import DlrEmitter, DlrProfile
from smsgw.sim.operator import OperatorProfile, SimulatedOperator

MAX_BODY_BYTES = 32 << 20

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_encode = msgspec.json.Encoder().encode
_decode_items = msgspec.json.Decoder(list[SubmitItem]).decode


class DlrTarget(msgspec.Struct, frozen=True):
    url: str
    key: str


_decode_target = msgspec.json.Decoder(DlrTarget).decode


class OutageMode(msgspec.Struct, frozen=True):
    mode: Literal["errors", "timeouts"] | None


_decode_outage = msgspec.json.Decoder(OutageMode).decode
_JSON = [(b"content-type", b"application/json")]


class OperatorApp:
    """The ASGI app: a few lines of routing around one `SimulatedOperator`."""

    def __init__(self, operator: SimulatedOperator, *, max_batch: int = 1_000) -> None:
        self.operator = operator
        self.max_batch = max_batch
        self.requests = 0
        self.refused = 0

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "requests": self.requests,
            "refused": self.refused,
            **self.operator.stats(),
        }
        if self.operator.dlr is not None:
            stats["dlr"] = self.operator.dlr.stats()
        return stats

    async def _dlr_target(self, receive: Receive) -> tuple[int, bytes]:
        if self.operator.dlr is None:
            return 409, _encode({"error": "this operator sends no delivery reports"})
        message = await receive()
        try:
            target = _decode_target(message.get("body", b""))
            self.operator.dlr.set_target(target.url, target.key)
        except (msgspec.DecodeError, ValueError) as exc:
            return 400, _encode({"error": str(exc)})
        return 200, _encode({"status": "ok"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == SUBMIT_PATH and method == "POST":
            status, body = await self._submit(receive)
        elif path == "/stats" and method == "GET":
            status, body = 200, _encode(self.stats())
        elif path == "/dlr-target" and method == "POST":
            status, body = await self._dlr_target(receive)
        elif path == "/outage" and method == "POST":
            status, body = await self._outage(receive)
        elif path == "/health" and method == "GET":
            status, body = 200, b'{"status":"ok"}'
        else:
            status, body = 404, b'{"error":"not found"}'
        await send({"type": "http.response.start", "status": status, "headers": _JSON})
        await send({"type": "http.response.body", "body": body})

    async def _outage(self, receive: Receive) -> tuple[int, bytes]:
        message = await receive()
        try:
            mode = _decode_outage(message.get("body", b"")).mode
        except msgspec.DecodeError as exc:
            return 400, _encode({"error": str(exc)})
        self.operator.outage = mode
        return 200, _encode({"mode": mode})

    async def _submit(self, receive: Receive) -> tuple[int, bytes]:
        self.requests += 1
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                self.refused += 1
                return 413, b'{"error":"body too large"}'
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        try:
            items = _decode_items(b"".join(chunks))
        except msgspec.DecodeError as exc:
            self.refused += 1
            return 400, _encode({"error": str(exc)})
        if len(items) > self.max_batch:
            self.refused += 1
            return 413, _encode({"error": f"at most {self.max_batch} messages per batch"})
        batch = [
            OutboundSms(
                id=item.id,
                account_id=0,
                to=item.to,
                sender=item.sender,
                text=item.text,
                segments=1,
                price=0,
                express=False,
                created_at=0.0,
            )
            for item in items
        ]
        results = await self.operator.send_batch(batch)
        return 200, _encode(
            SubmitResponse([SubmitResult(r.kind, r.operator_message_id, r.reason) for r in results])
        )


def check_loopback(host: str) -> None:
    """ValueError unless `host` is a loopback address: this is a benchmark fake, not a server
    for other machines."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{host!r} is not a loopback address")


async def serve_operator(
    app: OperatorApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on hypercorn until `shutdown_trigger` returns (or the caller cancels);
    reports the bound URL, e.g. "http://127.0.0.1:43127", as started."""
    check_loopback(host)
    config = HyperConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 75
    config.graceful_timeout = 2
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(
                serve,
                app,  # type: ignore[arg-type]  # hypercorn's ASGI types are narrower than needed
                config,
                shutdown_trigger=shutdown_trigger,
            )
        )
        task_status.started(binds[0])


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smsgw.sim.operator_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--name", default="sim-http")
    parser.add_argument("--latency-ms-median", type=float, default=20.0)
    parser.add_argument("--latency-ms-p99", type=float, default=80.0)
    parser.add_argument("--p-temporary", type=float, default=0.03)
    parser.add_argument("--p-permanent", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=1_000, help="messages per POST")
    parser.add_argument(
        "--max-per-second", type=float, default=0.0, help="messages a second; 0: no cap"
    )
    parser.add_argument(
        "--max-queue-s",
        type=float,
        default=0.0,
        help="with a cap: seconds of queue past which a batch is throttled; 0: no limit",
    )
    parser.add_argument("--dlr", action="store_true", help="send delayed delivery reports")
    parser.add_argument("--dlr-url", help="the gateway's base URL (loopback)")
    parser.add_argument("--dlr-key", help="this operator's DLR key at the gateway")
    parser.add_argument("--dlr-operator", help="this operator's name at the gateway")
    parser.add_argument("--dlr-delivered-ratio", type=float, default=0.95)
    parser.add_argument("--dlr-delay-ms-median", type=float, default=500.0)
    parser.add_argument("--dlr-delay-ms-p99", type=float, default=3_000.0)
    parser.add_argument("--dlr-batch", type=int, default=1_000, help="reports per POST")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_loopback(args.host)
        if args.max_batch < 1:
            raise ValueError("--max-batch must be at least 1")
        profile = OperatorProfile(
            name=args.name,
            latency_ms_median=args.latency_ms_median,
            latency_ms_p99=args.latency_ms_p99,
            p_temporary=args.p_temporary,
            p_permanent=args.p_permanent,
            seed=args.seed,
            max_per_second=args.max_per_second,
            max_queue_s=args.max_queue_s,
        )
        dlr_profile = None
        if args.dlr or args.dlr_url:
            dlr_profile = DlrProfile(
                delivered_ratio=args.dlr_delivered_ratio,
                delay_ms_median=args.dlr_delay_ms_median,
                delay_ms_p99=args.dlr_delay_ms_p99,
                batch=args.dlr_batch,
                seed=args.seed,
            )
        if args.dlr_url and not args.dlr_key:
            raise ValueError("--dlr-url needs --dlr-key")
    except ValueError as error:
        parser.error(str(error))
    operator = SimulatedOperator(profile)
    app = OperatorApp(operator, max_batch=args.max_batch)

    async def run() -> None:
        async with trio.open_nursery() as reports:
            async with trio.open_nursery() as nursery:
                await serve_and_report(nursery, reports)
            # Serving stopped (a signal): so do the delivery reports.
            reports.cancel_scope.cancel()

    async def serve_and_report(nursery: trio.Nursery, reports: trio.Nursery) -> None:
        url = await nursery.start(
            partial(
                serve_operator,
                app,
                host=args.host,
                port=args.port,
                shutdown_trigger=_wait_for_signal,
            )
        )
        if dlr_profile is not None:
            name = args.dlr_operator or "http:" + url.split("://", 1)[1]
            operator.dlr = DlrEmitter(name, dlr_profile)
            if args.dlr_url:
                operator.dlr.set_target(args.dlr_url, args.dlr_key)
            reports.start_soon(operator.dlr.run)
        print(msgspec.json.encode({"event": "listening", "url": url}).decode(), flush=True)

    trio.run(run)
    print(msgspec.json.encode({"event": "stopped", **app.stats()}).decode(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
