"""`smsgw serve --workers N`: N node processes on one port, kept running by this process.

Each worker is a whole node (`smsgw serve --workers 1`): its own trio loop, supervision tree,
engine and HTTP door, bound to the shared port with SO_REUSEPORT so the kernel spreads
connections over them. They coordinate only through PostgreSQL (shard leases), exactly as
nodes on different machines do. This process owns no request: it picks the port, starts the
workers, restarts one that dies (at most `MAX_RESTARTS` in `RESTART_WINDOW` seconds, then it
stops them all and fails), and passes SIGTERM/SIGINT on for a graceful stop.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence

import msgspec
import trio

from smsgw.runtime.server import reuse_port_socket

log = logging.getLogger("smsgw.workers")

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
STOP_GRACE = 15.0


class WorkerFailed(Exception):
    """A worker kept dying: more than MAX_RESTARTS restarts within RESTART_WINDOW seconds."""


async def serve_workers(
    workers: int,
    host: str,
    port: int,
    node_id: str,
    worker_args: Sequence[str],
    env: dict[str, str],
    top_args: Sequence[str] = (),
    *,
    on_listening: Callable[[str], None] | None = None,
    each: Callable[[int], Sequence[str]] = lambda _: (),
) -> None:
    """Run `workers` nodes named `{node_id}-{i}` on host:port until SIGTERM or SIGINT;
    `on_listening(url)` once every worker listens (before the `listening` line). Worker i
    gets `worker_args` and `each(i)`."""
    holder: socket.socket | None = None
    if port == 0:
        # Pick the port once for all workers; the bound (never listening) socket keeps it ours
        # until they have bound it too.
        holder = socket.socket(fileno=reuse_port_socket(host, 0))
        port = holder.getsockname()[1]
    restarts: deque[float] = deque()
    stopping = trio.Event()
    # Signals are taken from the start: a SIGTERM while the workers start (a script that gives
    # up waiting) stops the ones running and the one starting, instead of killing this parent
    # by default and leaving its workers behind.
    starting = trio.CancelScope()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def start() -> None:
                    nonlocal holder
                    with starting:
                        urls = []
                        for i in range(workers):
                            command = [
                                sys.executable,
                                "-m",
                                "smsgw.cli",
                                *top_args,
                                "serve",
                                "--workers",
                                "1",
                                "--reuse-port",
                                "--host",
                                host,
                                "--port",
                                str(port),
                                "--node-id",
                                f"{node_id}-{i}",
                                *worker_args,
                                *each(i),
                            ]
                            url = await nursery.start(_worker, command, env, stopping, restarts)
                            urls.append(url)
                        if holder is not None:
                            holder.close()
                            holder = None
                        if on_listening is not None:
                            on_listening(urls[0])
                        print(
                            msgspec.json.encode(
                                {"event": "listening", "url": urls[0], "workers": workers}
                            ).decode(),
                            flush=True,
                        )

                nursery.start_soon(start)
                async for _ in signals:
                    log.info("stopping %d workers on signal", workers)
                    stopping.set()
                    starting.cancel()
                    break
    finally:
        if holder is not None:
            holder.close()


async def _worker(
    command: list[str],
    env: dict[str, str],
    stopping: trio.Event,
    restarts: deque[float],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one worker, restarting it when it dies; returns once it stopped after `stopping`."""
    started = False
    while True:
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, env=env)
        try:
            assert process.stdout is not None
            with trio.fail_after(120):
                url = await listening_url(process.stdout)
            if url is None:
                raise WorkerFailed("a worker exited before listening")
            if not started:
                started = True
                task_status.started(url)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, process.stdout)
                nursery.start_soon(_stop_when, stopping, process)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)
        if stopping.is_set():
            return
        now = time.monotonic()
        restarts.append(now)
        while restarts and restarts[0] < now - RESTART_WINDOW:
            restarts.popleft()
        if len(restarts) > MAX_RESTARTS:
            raise WorkerFailed(f"{command[-1]}: exited with {code}, too many restarts")
        name = command[command.index("--node-id") + 1]
        log.warning("worker %s exited with %s; restarting it", name, code)
        await trio.sleep(min(5.0, 0.2 * 2 ** len(restarts)))


async def listening_url(stdout: trio.abc.ReceiveStream) -> str | None:
    """The url of the `{"event": "listening", "url": ...}` line that `smsgw serve` prints when
    it is ready (other lines are skipped); None if its stdout closes first."""
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                event = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(event, dict) and event.get("event") == "listening":
                return str(event["url"])
        chunk = await stdout.receive_some(4096)
        if not chunk:
            return None
        buffer += chunk


async def _drain(stdout: trio.abc.ReceiveStream) -> None:
    while await stdout.receive_some(4096):
        pass


async def _stop_when(stopping: trio.Event, process: trio.Process) -> None:
    await stopping.wait()
    process.send_signal(signal.SIGTERM)


async def _stop(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE seconds."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
