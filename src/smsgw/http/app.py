"""The HTTP front door: the quart-trio app, its error handlers and its route modules."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from smsgw.engine.admission import RequestBodies
from smsgw.engine.node import Engine
from smsgw.engine.ports import FrontDoorStore, OtpStore, StoreUnreachable
from smsgw.http import observe
from smsgw.http.api import Operation
from smsgw.http.context import MAX_BATCH_BODY_BYTES, Gateway, GatewayRequest, read_within
from smsgw.http.metrics import registry as metrics_registry
from smsgw.http.params import AsciiIntegerConverter
from smsgw.http.problems import ProblemError, problem_response, storage_unavailable
from smsgw.http.routes import (
    accounts,
    batch,
    cancel,
    console,
    delivery,
    docs,
    messages,
    metrics,
    ops,
    optouts,
    otp,
    reports,
    senders,
    statement,
)

log = logging.getLogger("smsgw.http")
P = ParamSpec("P")
T = TypeVar("T")
# Every route the app serves, by area; the OpenAPI document lists their operations in this
# order.
APIS = (
    accounts.api,
    statement.api,
    senders.api,
    messages.api,
    cancel.api,
    batch.api,
    optouts.api,
    otp.api,
    delivery.api,
    reports.api,
    ops.api,
    console.api,
    docs.api,
    metrics.api,
)
OPERATIONS: tuple[Operation, ...] = tuple(op for api in APIS for op in api.operations)


class GatewayApp(QuartTrio):
    """quart-trio's app, but `ensure_async`, which quart calls on every hook and view of every
    request, remembers its answer per function instead of asking `inspect` each time (about
    2 µs a call, four or more calls a request); and with `bodies`, every HTTP request's body
    is held within the node's budget of bytes (`context.read_within`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._async_of: dict[Callable[..., Any], Callable[..., Awaitable[Any]]] = {}
        self.bodies: RequestBodies | None = None

    async def asgi_app(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        # Outside quart: its request starts reading the body at once, before any hook runs.
        if scope["type"] == "http" and self.bodies is not None:
            await read_within(self.bodies, super().asgi_app, scope, receive, send)
        else:
            await super().asgi_app(scope, receive, send)

    def ensure_async(
        self, func: Callable[P, Awaitable[T]] | Callable[P, T]
    ) -> Callable[P, Awaitable[T]]:
        known = self._async_of.get(func)
        if known is None:
            known = super().ensure_async(func)
            # The app's hooks and views are few and live as long as the app; anything else
            # asked about is not kept.
            if len(self._async_of) < 1_000:
                self._async_of[func] = known
        return known


def create_app(
    engine: Engine,
    reads: FrontDoorStore,
    *,
    admin_key: str,
    metrics_public: bool = False,
    dlr_keys: Sequence[tuple[str, str]] = (),
    otp_store: OtpStore | None = None,
) -> QuartTrio:
    app = GatewayApp("smsgw")
    app.request_class = GatewayRequest
    app.url_map.converters["int"] = AsciiIntegerConverter  # before any rule is added
    # The largest body any route takes; each route enforces its own (Gateway.body).
    app.config["MAX_CONTENT_LENGTH"] = MAX_BATCH_BODY_BYTES
    app.extensions["smsgw"] = Gateway(engine, reads, admin_key=admin_key)
    app.bodies = engine.admission.bodies
    app.extensions["smsgw.dlr_keys"] = delivery.OperatorKeys(dlr_keys)
    app.extensions[otp.EXTENSION] = otp_store
    for api in APIS:
        app.register_blueprint(api.blueprint)
    app.extensions[docs.OPERATIONS] = OPERATIONS
    # Request ids, access log, request counts and durations; GET /metrics reads them.
    app.config["SMSGW_METRICS_PUBLIC"] = metrics_public
    http_stats = observe.install(app)
    app.extensions["smsgw.metrics"] = metrics_registry(app.extensions["smsgw"], http_stats)

    @app.after_request
    async def close_after_refusal(response: Response) -> Response:
        # A refusal sent before the request body was read leaves hypercorn's HTTP/1.1
        # connection neither reusable nor closed (the next request on it hangs): tell the
        # client to open a new one.
        if response.status_code >= 400 and request.content_length:
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(ProblemError)
    async def on_problem(exc: ProblemError) -> Response:
        return exc.response()

    @app.errorhandler(HTTPException)
    async def on_http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        return problem_response(status, code, exc.description or exc.name or "error")

    @app.errorhandler(StoreUnreachable)
    async def on_store_unreachable(exc: StoreUnreachable) -> Response:
        # A read of the store (a key lookup, a report) while PostgreSQL is away: as an
        # engine call's StoreUnavailable (Gateway.call), not an internal error.
        log.warning("store unreachable: %s", exc)
        return storage_unavailable().response()

    @app.errorhandler(Exception)
    async def on_crash(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(500, "internal", "an internal error; nothing was changed")

    return app
