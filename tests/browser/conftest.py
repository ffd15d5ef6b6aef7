"""Browser tests: Playwright driving the machine's Chromium (Debian's `chromium` package),
headless, with everything that could reach the network off.

Playwright's sync API is tied to the thread that started it, and the node under test runs in
the test's own trio loop, so the browser lives on one thread of its own (`Browser`): a test
hands it a function of the browser context and awaits the answer in a worker thread, while
the node goes on serving. Without Chromium (or without the `playwright` package) every test
here is skipped, saying why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import trio

from smsgw.engine.node import EngineConfig
from smsgw.engine.routing import OperatorSettings, RoutingConfig
from smsgw.runtime.server import Node, NodeOptions, run_node
from smsgw.sim.dlr import DlrProfile
from smsgw.sim.operator import OperatorProfile
from tests.conftest import node_options

T = TypeVar("T")

CHROMIUM = os.environ.get("SMSGW_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing of Chromium's own reaching out: the machine's network is closed, and
# a test that says "no request left 127.0.0.1" must not be flaky on a machine where it is not.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OPERATORS = ("alpha", "beta", "gamma")
# Each operator takes at most this many messages a second: 1,000 messages take several
# seconds to leave, so the console has a backlog to show.
CAP_PER_OPERATOR = 60.0


def _why_not() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests skipped: the `playwright` package is not installed (dev extra)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(
        CHROMIUM
    ):
        return (
            f"browser tests skipped: no Chromium at {CHROMIUM}"
            " (apt-get install chromium, or set SMSGW_CHROMIUM)"
        )
    return None


class Browser:
    """One headless Chromium (fresh profile) on a thread of its own; `run(fn)` calls
    `fn(context)` there."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[Any], Any], concurrent.futures.Future[Any]] | None]
        self._jobs = queue.Queue()
        self._started = concurrent.futures.Future[None]()
        self._thread = threading.Thread(target=self._main, name="chromium", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.result(timeout=60)

    def _main(self) -> None:
        from playwright.sync_api import sync_playwright

        # trio-asyncio (the node's PostgreSQL driver runs on it) makes asyncio's policy hand
        # out its own loops; set here, on this thread only (its policy is thread-local), a
        # plain asyncio loop for Playwright's driver.
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
        try:
            with (
                tempfile.TemporaryDirectory(prefix="smsgw-chromium-") as profile,
                sync_playwright() as playwright,
            ):
                context = playwright.chromium.launch_persistent_context(
                    profile,
                    executable_path=CHROMIUM,
                    headless=True,
                    args=CHROMIUM_ARGS,
                    viewport={"width": 1400, "height": 1000},
                )
                self._started.set_result(None)
                while (job := self._jobs.get()) is not None:
                    fn, answer = job
                    try:
                        answer.set_result(fn(context))
                    except BaseException as exc:
                        answer.set_exception(exc)
                context.close()
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise

    async def run(self, fn: Callable[[Any], T]) -> T:
        answer = concurrent.futures.Future[T]()
        self._jobs.put((fn, answer))
        return await trio.to_thread.run_sync(answer.result)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    chromium = Browser()
    chromium.start()
    yield chromium
    chromium.stop()


def console_options(database_url: str, schema: str, port: int = 0) -> NodeOptions:
    """A node with three capped simulated operators that report delivery."""
    caps = tuple(OperatorSettings(n, max_per_second=CAP_PER_OPERATOR) for n in OPERATORS)
    options = node_options(database_url, schema)
    engine: EngineConfig = msgspec.structs.replace(
        options.engine, routing=RoutingConfig(operators=caps)
    )
    return msgspec.structs.replace(
        options,
        port=port,
        engine=engine,
        operators=tuple(
            OperatorProfile(
                name=n, latency_ms_median=5.0, latency_ms_p99=30.0, p_temporary=0.02, seed=i
            )
            for i, n in enumerate(OPERATORS)
        ),
        dlr_keys=(),
        operator_dlr=DlrProfile(delay_ms_median=300.0, delay_ms_p99=1_500.0),
    )


class ServedNode:
    """A node in the test's trio loop that can be stopped and started again on its port."""

    def __init__(self, nursery: trio.Nursery, database_url: str, schema: str) -> None:
        self._nursery = nursery
        self._database_url = database_url
        self._schema = schema
        self.node: Node | None = None
        self.port = 0

    async def start(self) -> Node:
        options = console_options(self._database_url, self._schema, self.port)
        self.node = await self._nursery.start(partial(run_node, options))
        self.port = urlsplit(self.node.url).port or 0
        return self.node

    async def stop(self) -> None:
        assert self.node is not None
        self.node.stop.set()
        with trio.fail_after(30):
            while True:  # until the port is closed
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    break
                await stream.aclose()
                await trio.sleep(0.05)
        self.node = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def served(database_url: str, schema: str) -> AsyncIterator[ServedNode]:
    async with trio.open_nursery() as nursery:
        served = ServedNode(nursery, database_url, schema)
        await served.start()
        yield served
        if served.node is not None:
            served.node.stop.set()


@pytest.fixture
async def client(served: ServedNode) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:
        yield http
