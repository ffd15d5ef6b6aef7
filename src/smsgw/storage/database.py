"""The PostgreSQL connection pool (`Database`) and the bridge from trio to asyncpg's asyncio."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import ParamSpec, TypeVar

import asyncpg
import trio_asyncio

from smsgw.engine.credit import TopUpTooLarge
from smsgw.engine.histogram import LATENCY_BUCKETS, Histogram
from smsgw.engine.ports import StoreUnreachable

P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
log = logging.getLogger("smsgw.storage")

# A store round trip that takes longer than this is logged (a warning that names it) and
# counted in /metrics (smsgw_store_slow_statements_total): a plan gone wrong shows there long
# before its statements reach a group commit's timeout (issue 29). `Database.slow_after`.
SLOW_STATEMENT_S = 1.0


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Open a trio-asyncio loop unless this task already runs inside one."""
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    async with trio_asyncio.open_loop():
        yield


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on release (a round trip per group commit): this code leaves
    no session state behind (no SET, LISTEN or cursors; advisory locks are per transaction)."""


def bridge(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """`fn`, an asyncio coroutine function, as one trio can await (inside `asyncio_loop`)."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


def _unreachable(exc: Exception) -> bool:
    """The server could not be reached, or went away: refused or reset connections, a lost
    session, a server shutting down or starting (not a timeout: a caller's own)."""
    if isinstance(exc, OSError):
        return not isinstance(exc, TimeoutError)
    return isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | asyncpg.CrashShutdownError,
    )


class Database:
    """A connection pool in one schema. Create with `await Database.open(url)` inside a
    trio-asyncio loop; close with `await db.close()`."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool = pool
        self.schema = schema
        self._idle: list[asyncpg.Connection] = []  # acquired from the pool, free for a run
        self._acquiring = 0  # runs waiting for the pool
        self._releasing: set[asyncio.Task[None]] = set()  # kept until done (asyncio holds weakly)
        # How long each kind of work `run` ran took, by name (`statement_name`), and how often
        # it took longer than `slow_after` seconds; /metrics reads them.
        self.slow_after = SLOW_STATEMENT_S
        self.durations: dict[str, Histogram] = {}
        self.slow: dict[str, int] = {}

    @classmethod
    async def open(
        cls, url: str, *, schema: str = "public", min_size: int = 2, max_size: int = 6
    ) -> Database:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"bad schema name {schema!r}")

        async def _open() -> asyncpg.Pool:
            if schema != "public":
                conn = await asyncpg.connect(url)
                try:
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                finally:
                    await conn.close()
            return await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                reset=_keep_session,
                # No idle-connection timer: asyncpg arms one (call_later) at every release and
                # cancels it at the next acquire, and under trio-asyncio each is one more turn
                # of its loop, whose heap then keeps the cancelled handle for the full lifetime.
                # A node's pool is at most `max_size` connections; idle ones may stay.
                max_inactive_connection_lifetime=0,
                server_settings={
                    "search_path": schema,
                    "application_name": "smsgw",
                    # A node paused mid-transaction (SIGSTOP, a stalled VM) must not hold its
                    # row and lease locks, and so the other nodes, for longer than this.
                    "idle_in_transaction_session_timeout": "5s",
                    # Every statement here is short; a plan priced past jit_above_cost (a
                    # SET LOCAL enable_sort = off prices any sort left in it at 10^10) would
                    # be compiled by LLVM first: a scheduled promotion took 1.1 s instead of
                    # 1 ms that way.
                    "jit": "off",
                },
            )

        return cls(await bridge(_open)(), schema)

    async def close(self) -> None:
        async def _close() -> None:
            while self._idle:
                await self._give_back(self._idle.pop())
            await self.pool.close()

        await bridge(_close)()

    async def run(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, name: str | None = None
    ) -> T:
        """Run `fn(connection)` on the asyncio side: one bridge crossing for all it does.

        Its time on the connection (not the wait for one) is recorded under `name` (default:
        `statement_name(fn)`), and logged as a warning past `slow_after` seconds, whether it
        returned, raised or was cancelled (a statement cancelled at a timeout is the slowest).

        A connection that ran `fn` without an error is kept here, idle, for the next call,
        not given back to asyncpg's pool: an acquire and a release per run cost CPU and more
        steps of the asyncio side, each waiting for a turn of the trio loop behind every
        runnable HTTP task (benchmarks/private_apis.py: saves 8 µs of ~690 µs a request; 98 µs
        a run, at 0.08 runs an accept under load). So the pool only opens connections and takes
        back those that failed (it replaces a broken one), and those are given back in a task of
        their own, which the caller need not wait for. asyncpg's recycling after `max_queries`
        does not apply to kept connections."""

        label = name or statement_name(fn)

        async def _run() -> T:
            conn = self._idle_connection()
            if conn is None:
                self._acquiring += 1
                try:
                    conn = await self.pool.acquire()
                finally:
                    self._acquiring -= 1
            started = time.perf_counter()
            try:
                result = await fn(conn)
            except BaseException as exc:
                # A connection the server closed (PostgreSQL stopping) is back in the pool
                # already, its proxy detached: it raises InterfaceError on any call, which
                # must not hide `exc` (a CommitInDoubt would then read as "nothing stored").
                with suppress(asyncpg.InterfaceError):
                    # A refusal the server or the credit rules made (its transaction rolled
                    # back) leaves the connection as good as before.
                    if not isinstance(exc, asyncpg.PostgresError | Refused | TopUpTooLarge):
                        # Cancelled mid-statement or lost: what its server session still does
                        # is unknown, so it is never reused, and its server process names only
                        # that work (PgStore.commit_fate ends it by pid). Terminating a pool's
                        # connection gives it back to the pool, which opens a new one.
                        conn.terminate()
                    else:
                        self._release(conn)
                raise
            finally:
                self._took(label, time.perf_counter() - started)
            # Kept unless a caller waits for the pool (all connections busy: this one is
            # theirs), or `fn` left a transaction open.
            if self._acquiring or conn.is_in_transaction():
                self._release(conn)
            else:
                self._idle.append(conn)
            return result

        try:
            return await bridge(_run)()
        except Exception as exc:
            # No connection to be had, or the one in use lost (a group commit's is its own
            # CommitInDoubt by now, decided inside `fn`).
            if _unreachable(exc):
                raise StoreUnreachable(f"{type(exc).__name__}: {exc}") from exc
            raise

    def _took(self, name: str, seconds: float) -> None:
        durations = self.durations.get(name)
        if durations is None:
            durations = self.durations[name] = Histogram(LATENCY_BUCKETS)
        durations.observe(seconds)
        if seconds > self.slow_after:
            self.slow[name] = self.slow.get(name, 0) + 1
            ms = round(seconds * 1000)
            log.warning("slow statement %s: %d ms", name, ms, extra={"statement": name, "ms": ms})

    def _idle_connection(self) -> asyncpg.Connection | None:
        """The most recently used idle connection that is still open (the pool replaces the
        closed ones: PostgreSQL went away while they were idle)."""
        while self._idle:
            conn = self._idle.pop()
            try:
                closed = conn.is_closed()
            except asyncpg.InterfaceError:
                # Closed by the server while idle here (PostgreSQL restarted): asyncpg has
                # taken it back already and detached this proxy, which is all it can answer.
                continue
            if not closed:
                return conn
            self._release(conn)
        return None

    def _release(self, conn: asyncpg.Connection) -> None:
        """Give `conn` back to the pool in the background; one left in a transaction is
        closed first (asyncpg will not reset it), and the pool opens a new one in its place."""
        if conn.is_in_transaction():
            conn.terminate()
        release = asyncio.get_running_loop().create_task(self._give_back(conn))
        self._releasing.add(release)
        release.add_done_callback(self._releasing.discard)

    async def _give_back(self, conn: asyncpg.Connection) -> None:
        """`pool.release(conn)`, which must not end in an exception: nobody waits for this
        task, and trio-asyncio raises a task's unretrieved exception into the node, which
        ends it (a node died so while PostgreSQL shut down: asyncpg had taken the closed
        connection back first, "release() called on a free connection holder"). A connection
        the pool will not take back is closed; the pool opens a new one for its place."""
        try:
            await self.pool.release(conn)
        except Exception as exc:
            log.debug("a connection was not given back to the pool (%r); closing it", exc)
            with suppress(Exception):
                conn.terminate()


_names: dict[object, str] = {}  # by code object: one entry per place that calls `run`


def statement_name(fn: Callable[..., object]) -> str:
    """What `Database.run` records `fn`'s time under: the function that called it with `fn`
    (a lambda or a local function's qualified name up to `.<locals>`, e.g.
    "Backlog.queued_messages"), or `fn`'s own for a method (also inside functools.partial)."""
    target = getattr(fn, "func", fn)  # functools.partial
    code = getattr(target, "__code__", None)
    name = _names.get(code) if code is not None else None
    if name is None:
        qualname = getattr(target, "__qualname__", type(target).__qualname__)
        name = qualname.split(".<locals>", 1)[0]
        if code is not None:
            _names[code] = name
    return name


class Refused(Exception):
    """Raised by the work `Database.run` runs when that work refused and rolled back its
    transaction, as the server's own refusals do: the connection is as good as before."""


class StorePart:
    """The statements of one concern on a `Database`. PgStore (storage/pg.py) is made of these
    parts; each also works on its own (the `smsgw accounts` commands use two)."""

    def __init__(self, db: Database) -> None:
        self.db = db
