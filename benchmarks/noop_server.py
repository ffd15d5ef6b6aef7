"""A no-op POST /v1/messages on the gateway's HTTP stack: the ceiling for accept benchmarks.

Same stack as `smsgw serve` (quart-trio on hypercorn, one trio process, access log off, same
keep-alive, the same garbage-collector settings), but the handler only reads the body and
answers 202 with a small JSON body, so
its rate is what HTTP alone costs on this machine. Like `smsgw serve --port 0`, it prints one
line {"event": "listening", "url": ...} on stdout when ready, and stops on SIGTERM or SIGINT.

    python benchmarks/noop_server.py --host 127.0.0.1 --port 0
"""

from __future__ import annotations

import argparse
import signal
import uuid

import msgspec
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from smsgw.runtime.server import freeze_startup_objects

_encode = msgspec.json.Encoder().encode


class _Accepted(msgspec.Struct):
    id: str
    status: str


def create_app() -> QuartTrio:
    app = QuartTrio("noop")

    @app.post("/v1/messages")
    async def accept() -> Response:
        await request.get_data(as_text=False)
        body = _encode(_Accepted(id=str(uuid.uuid4()), status="queued"))
        return Response(body, status=202, content_type="application/json")

    return app


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def run(host: str, port: int) -> None:
    config = HyperConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    config.graceful_timeout = 2
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: serve(
                create_app(), config, shutdown_trigger=_wait_for_signal, task_status=task_status
            )
        )
        # The gateway's runtime settings too (the collector's): the ceiling is the same stack
        # as tuned as the gateway's.
        freeze_startup_objects()
        print(msgspec.json.encode({"event": "listening", "url": binds[0]}).decode(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    trio.run(run, args.host, args.port)


if __name__ == "__main__":
    main()
