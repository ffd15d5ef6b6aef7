"""The ways of benchmarks/private_apis.py's cases that the code does not take, kept here as the
code had them (or would have them), to be measured against the ways it does take.

Each private one is the code as it was before that benchmark showed it saved less than 1% of an
accept request's CPU; the public one is Database.run without its connection cache, which it keeps.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

import trio
from quart import current_app
from quart.globals import _cv_app, _cv_request, request_ctx

from smsgw.http.context import GatewayRequest
from smsgw.storage.database import Database, bridge

R = TypeVar("R")


def current_request_private() -> GatewayRequest:
    """current_request() on the ContextVar behind quart's `request` proxy."""
    return cast(GatewayRequest, _cv_request.get().request)


def current_request_proxy_attr() -> GatewayRequest:
    """As the code read the request before the ContextVar: an attribute of a proxy."""
    return cast(GatewayRequest, request_ctx.request)


def gateway_private() -> Any:
    """gateway() on the ContextVar behind `current_app`."""
    return _cv_app.get().app.extensions["smsgw"]


def gateway_current_object() -> Any:
    return current_app._get_current_object().extensions["smsgw"]  # type: ignore[attr-defined]


# Blueprint names by endpoint: the endpoints are the app's routes (None: unmatched).
_blueprints_of: dict[str | None, tuple[str, ...]] = {}


class CachedBlueprintsRequest(GatewayRequest):
    """GatewayRequest with `blueprints` worked out once per endpoint, not on each of the three
    times quart reads it per request."""

    @property
    def blueprints(self) -> list[str]:
        endpoint = self.url_rule.endpoint if self.url_rule is not None else None
        names = _blueprints_of.get(endpoint)
        if names is None:
            names = _blueprints_of[endpoint] = tuple(super().blueprints)
        return list(names)


_id_random = random.Random(secrets.randbits(128))
_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62
_RAND_A = ((1 << 12) - 1) << 64
_RAND_B = (1 << 62) - 1
# The last millisecond and its "tttttttt-tttt-" text.
uuid7_ms_prefix: list[Any] = [-1, ""]


def uuid7_cached() -> str:
    """uuid7() with the millisecond's text made once a millisecond, in a module global."""
    ms = time.time_ns() // 1_000_000
    cached = uuid7_ms_prefix
    if cached[0] != ms:
        h = (ms & 0xFFFFFFFFFFFF).to_bytes(6).hex()
        cached[0], cached[1] = ms, f"{h[:8]}-{h[8:]}-"
    bits = _id_random.getrandbits(74)
    t = (_VERSION_7 | (bits << 2) & _RAND_A | _VARIANT | bits & _RAND_B).to_bytes(10).hex()
    return f"{cached[1]}{t[:4]}-{t[4:8]}-{t[8:]}"


class ParkedReply(Generic[R]):
    """Reply with its one waiter parked and rescheduled by trio.lowlevel, not a trio.Event."""

    __slots__ = ("_done", "_error", "_task", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: R | None = None
        self._error: BaseException | None = None
        self._task: trio.lowlevel.Task | None = None

    def set(self, value: R) -> None:
        if not self._done:
            self._value = value
            self._finish()

    def _finish(self) -> None:
        self._done = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> R:
        if self._done:
            await trio.lowlevel.checkpoint()
        else:
            if self._task is not None:
                raise RuntimeError("a Reply has one waiter")
            self._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


async def run_pooled(db: Database, fn: Callable[[Any], Awaitable[R]]) -> R:
    """Database.run without its connection cache: acquire from asyncpg's pool for the run and
    release after it, through the same bridge, timed and recorded alike."""

    async def _run() -> R:
        async with db.pool.acquire() as conn:
            started = time.perf_counter()
            try:
                return await fn(conn)
            finally:
                db._took("select_one", time.perf_counter() - started)

    return await bridge(_run)()
