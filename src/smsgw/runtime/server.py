"""Runs one node: PostgreSQL pool, migrations, the engine's supervision tree, the HTTP door."""

from __future__ import annotations

import gc
import logging
import secrets
import signal
import socket
from collections.abc import Sequence

import msgspec
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve

from smsgw.connectors.operators.http import HttpOperator
from smsgw.connectors.operators.smpp.client import SmppOperator
from smsgw.connectors.operators.smpp.config import parse_smpp_url
from smsgw.connectors.webhooks import HttpCallbackPoster
from smsgw.engine.node import Engine, EngineConfig
from smsgw.engine.otp import OtpSweeper
from smsgw.engine.ports import Provider
from smsgw.engine.shards import LeaseConfig
from smsgw.engine.supervisor import ChildSpec, Restart
from smsgw.engine.upkeep import StoreUpkeep, UpkeepConfig
from smsgw.http.app import create_app
from smsgw.sim.dlr import DlrEmitter, DlrProfile
from smsgw.sim.operator import OperatorProfile, SimulatedOperator
from smsgw.storage.announce import HandoffAnnouncer
from smsgw.storage.cluster import PgCluster
from smsgw.storage.commit import Handoff
from smsgw.storage.database import Database, asyncio_loop
from smsgw.storage.migrate import migrate
from smsgw.storage.otp import PgOtpStore
from smsgw.storage.partitions import Partitions
from smsgw.storage.pg import PgStore

log = logging.getLogger("smsgw.server")


class NodeOptions(msgspec.Struct, frozen=True):
    database_url: str
    admin_key: str
    host: str = "127.0.0.1"
    port: int = 8080
    schema: str = "public"
    engine: EngineConfig = EngineConfig()
    operators: tuple[OperatorProfile, ...] = (OperatorProfile(name="sim"),)
    # Operators reached over HTTP (smsgw.connectors.operators.http); when given, `operators`
    # is unused.
    operator_urls: tuple[str, ...] = ()
    shutdown_grace: float = 10.0
    # GET /metrics without the admin key (SMSGW_METRICS_PUBLIC=1): for a scraper on a private
    # network only.
    metrics_public: bool = False
    # This node's name among the nodes sharing the database ("" for the host name). Unique:
    # a restart under the same id takes that id's leases back at once.
    node_id: str = ""
    # Share leased shards with other nodes on the same database (engine/shards.py). False
    # runs the node alone as before the leases: it dispatches every message it finds.
    cluster: bool = True
    leases: LeaseConfig = LeaseConfig()
    # Bind with SO_REUSEPORT: several nodes of one machine serve one port (`serve --workers`).
    reuse_port: bool = False
    # (operator name, key): who may POST delivery reports to /v1/dlr/{operator}. The keys are
    # kept only as SHA-256 digests once the app is built.
    dlr_keys: tuple[tuple[str, str], ...] = ()
    # In-process simulated operators send delayed delivery reports to this node's DLR
    # endpoint (over loopback, with a key made for them unless dlr_keys names one).
    operator_dlr: DlrProfile | None = None
    # The stored days of messages: retention and redaction (engine/upkeep.py).
    upkeep: UpkeepConfig = UpkeepConfig()


class Node:
    """One gateway process's running parts; `url` is set once HTTP is listening."""

    def __init__(self, engine: Engine, store: PgStore) -> None:
        self.engine = engine
        self.store = store
        self.url = ""
        self.node_id = ""
        self.stop = trio.Event()
        self.http_done = trio.Event()


def default_providers(
    profiles: Sequence[OperatorProfile], operator_urls: Sequence[str] = ()
) -> list[tuple[Provider, int]]:
    """Operators at `operator_urls` ("URL" or "NAME=URL") when there are any, else
    in-process simulated ones."""
    if operator_urls:
        return [(operator_at(value), 1) for value in operator_urls]
    return [(SimulatedOperator(p), 1) for p in profiles]


def operator_at(value: str) -> Provider:
    """The operator client for "[NAME=]URL", by the URL's scheme: smpp:// an SMPP 3.4 ESME
    (connectors/operators/smpp/client.py: run it, its binds live in a task), http(s):// the
    HTTP batch protocol. ValueError for a URL neither takes."""
    name, url = split_operator_url(value)
    if url.startswith("smpp://"):
        return SmppOperator(parse_smpp_url(url), name=name)
    return HttpOperator(url, name=name)


def split_operator_url(value: str) -> tuple[str | None, str]:
    """ "NAME=URL" -> (NAME, URL); a bare URL -> (None, URL)."""
    name, sep, rest = value.partition("=")
    if sep and "://" not in name:
        return name, rest
    return None, value


async def run_node(
    options: NodeOptions,
    providers: Sequence[tuple[Provider, int]] | None = None,
    *,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until `node.stop` is set (or SIGTERM/SIGINT), then shut down gracefully:
    HTTP stops taking requests and finishes the ones in flight, then the engine is cancelled.
    Everything accepted is already committed, so nothing is lost by stopping."""
    owned: Sequence[tuple[Provider, int]] = ()
    poster: HttpCallbackPoster | None = None
    async with asyncio_loop():
        db = await Database.open(options.database_url, schema=options.schema)
        try:
            applied = await migrate(db)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            node_id = options.node_id or socket.gethostname()
            cluster: PgCluster | None = None
            handoff: Handoff | None = None
            announcer: HandoffAnnouncer | None = None
            if options.cluster:
                cluster = PgCluster(
                    db, options.database_url, node_id, advertised_url=lambda: node.url
                )
                if options.leases.handoff_linger > 0:
                    announcer = HandoffAnnouncer(db, cluster.channel, options.leases.handoff_linger)
                handoff = Handoff(
                    node_id,
                    cluster.lock_class,
                    cluster.channel,
                    cluster.settled_channel,
                    announcer,
                )
            store = PgStore(
                db, handoff=handoff, recipient_limit=options.engine.recipient_limit_per_hour
            )
            if not providers:
                # Made here, so closed here (their connections) when the node stops.
                providers = owned = default_providers(options.operators, options.operator_urls)
            dlr_keys = dict(options.dlr_keys)
            emitters: list[tuple[DlrEmitter, str]] = []
            if options.operator_dlr is not None:
                for provider, _ in providers:
                    if isinstance(provider, SimulatedOperator) and provider.dlr is None:
                        provider.dlr = DlrEmitter(provider.name, options.operator_dlr)
                        key = dlr_keys.setdefault(provider.name, secrets.token_urlsafe(32))
                        emitters.append((provider.dlr, key))
            poster = HttpCallbackPoster(
                production=options.engine.production,
                timeout=options.engine.callbacks.attempt_timeout_s,
            )
            engine = Engine(
                store,
                providers,
                options.engine,
                callback_store=store,
                callback_poster=poster,
                cluster=cluster,
                leases=options.leases,
            )
            node = Node(engine, store)
            node.node_id = node_id
            otp_store = PgOtpStore(db)
            otp_sweeper = OtpSweeper(otp_store)
            leases = engine.leases
            upkeep = StoreUpkeep(
                Partitions(db),
                options.upkeep,
                # The duty goes with shard 0's lease; a node without leases is alone.
                lambda: leases is None or 0 in leases.owned,
            )
            app = create_app(
                engine,
                store,
                admin_key=options.admin_key,
                metrics_public=options.metrics_public,
                dlr_keys=tuple(dlr_keys.items()),
                otp_store=otp_store,
            )

            async def http(
                *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
            ) -> None:
                config = HyperConfig()
                config.bind = [f"{options.host}:{options.port}"]
                if options.reuse_port:
                    config.bind = [f"fd://{reuse_port_socket(options.host, options.port)}"]
                config.accesslog = None
                # Hypercorn's own messages through our logging (text or JSON), once: its
                # default adds a second stderr handler of its own.
                config.errorlog = logging.getLogger("hypercorn.error")
                config.graceful_timeout = options.shutdown_grace
                config.keep_alive_timeout = 75
                try:
                    async with trio.open_nursery() as nursery:
                        binds = await nursery.start(
                            lambda task_status: hypercorn_serve(
                                app,
                                config,
                                shutdown_trigger=node.stop.wait,
                                task_status=task_status,
                            )
                        )
                        node.url = binds[0]
                        task_status.started()
                finally:
                    if node.stop.is_set():
                        node.http_done.set()

            async with trio.open_nursery() as nursery:
                for provider, _ in providers:
                    if isinstance(provider, SmppOperator):
                        # Receipts take the DLR endpoint's path: a deliver_sm is answered
                        # once record_deliveries returned, that is once it is committed.
                        if provider.on_receipts is None:
                            provider.on_receipts = engine.record_deliveries
                        # Binds in the background; cancelled last (below), they unbind.
                        if any(provider is p for p, _ in owned):
                            await nursery.start(provider.run)
                announcing = (
                    []
                    if announcer is None
                    else [ChildSpec("handoff_announcer", announcer.run, stats=announcer.stats)]
                )
                supervisor = await nursery.start(
                    engine.run,
                    [
                        ChildSpec("otp_sweeper", otp_sweeper.run, stats=otp_sweeper.stats),
                        ChildSpec("store_upkeep", upkeep.run, stats=upkeep.stats),
                        ChildSpec("http", http, restart=Restart.TRANSIENT),
                        *announcing,
                    ],
                )
                nursery.start_soon(_stop_on_signal, node)
                for emitter, key in emitters:
                    emitter.set_target(node.url, key)
                    nursery.start_soon(emitter.run)
                with trio.move_on_after(30):
                    await engine.ready.wait()
                freeze_startup_objects()
                task_status.started(node)
                await node.stop.wait()
                # HTTP drains within its grace period; then the engine is stopped.
                with trio.move_on_after(options.shutdown_grace + 1):
                    await node.http_done.wait()
                await supervisor.shutdown(options.shutdown_grace)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for provider, _ in owned:
                    if isinstance(provider, HttpOperator):
                        await provider.aclose()
                if poster is not None:
                    await poster.aclose()
                await db.close()


# The collector's thresholds once started (CPython's defaults: 700, 10, 10). A request makes
# and drops hundreds of container objects (the request and response objects, headers, the
# context, the message), so with the default the youngest generation was collected every
# request or two; every 20,000 net allocations it costs about 9% less CPU per accept
# (0.69-0.70 against 0.76 ms, 2 cores, 2026-12-03) and 6% for the no-op handler. Older
# generations go correspondingly less often.
GC_THRESHOLDS = (20_000, 20, 100)


def freeze_startup_objects() -> None:
    """Move what start-up made (modules, classes, functions, the app: about 80,000 objects)
    out of the garbage collector's sight, and collect young objects less often from now on
    (GC_THRESHOLDS). Start-up's objects live as long as the process, and every full
    collection walked them: full collections took 40-100 ms (the event loop standing still)
    before, 20-40 ms after. Frozen objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def reuse_port_socket(host: str, port: int) -> int:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, as a file descriptor for
    hypercorn's `fd://` bind: the kernel spreads connections over every node bound so."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
    except BaseException:
        sock.close()
        raise
    return sock.detach()


async def _stop_on_signal(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            log.info("stopping on signal")
            node.stop.set()
            return
