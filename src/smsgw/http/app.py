"""The HTTP front door: the quart-trio app, its error handlers and its route modules."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import HTTPException

from smsgw.engine.node import Engine
from smsgw.engine.ports import FrontDoorStore
from smsgw.http import observe
from smsgw.http.context import MAX_BATCH_BODY_BYTES, Gateway
from smsgw.http.metrics import registry as metrics_registry
from smsgw.http.problems import ProblemError, problem_response
from smsgw.http.routes import accounts, batch, delivery, docs, messages, metrics, ops, reports

log = logging.getLogger("smsgw.http")
# Blueprint names by endpoint: the endpoints are the app's routes (None: unmatched).
_blueprints_of: dict[str | None, tuple[str, ...]] = {}


class GatewayRequest(TrioRequest):
    """quart's request, but `blueprints` is worked out once per endpoint, not on each of the
    three or more times quart reads it per request (a split and an import each time)."""

    @property
    def blueprints(self) -> list[str]:
        endpoint = self.url_rule.endpoint if self.url_rule is not None else None
        names = _blueprints_of.get(endpoint)
        if names is None:
            names = _blueprints_of[endpoint] = tuple(super().blueprints)
        return list(names)


def create_app(
    engine: Engine,
    reads: FrontDoorStore,
    *,
    admin_key: str,
    metrics_public: bool = False,
    dlr_keys: Sequence[tuple[str, str]] = (),
) -> QuartTrio:
    app = QuartTrio("smsgw")
    app.request_class = GatewayRequest
    # The largest body any route takes; each route enforces its own (Gateway.body).
    app.config["MAX_CONTENT_LENGTH"] = MAX_BATCH_BODY_BYTES
    app.extensions["smsgw"] = Gateway(engine, reads, admin_key=admin_key)
    app.extensions["smsgw.dlr_keys"] = delivery.OperatorKeys(dlr_keys)
    for module in (accounts, messages, batch, delivery, ops, reports, docs, metrics):
        app.register_blueprint(module.bp)
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
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return problem_response(exc.status, exc.code, exc.detail, headers=headers, **exc.extra)

    @app.errorhandler(HTTPException)
    async def on_http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        return problem_response(status, code, exc.description or exc.name or "error")

    @app.errorhandler(Exception)
    async def on_crash(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(500, "internal", "an internal error; nothing was changed")

    return app
