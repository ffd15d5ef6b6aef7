"""The ops console: the page (GET /ops), the figures it polls, and draining an operator."""

from __future__ import annotations

import logging
from importlib import resources

from quart import Blueprint, Response, current_app, request

from smsgw.http.console import ClusterCache, DrainOut, operator_out, snapshot
from smsgw.http.context import gateway, json_response
from smsgw.http.problems import ProblemError

bp = Blueprint("console", __name__)
log = logging.getLogger("smsgw.ops")

# The page runs one inline script, draws with SVG, and talks only to its own node. No frame
# may embed it: its buttons drain operators.
_CONSOLE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)


@bp.get("/ops")
async def console_page() -> Response:
    page = current_app.extensions.get("smsgw.console")
    if page is None:
        page = resources.files("smsgw.http").joinpath("console.html").read_bytes()
        current_app.extensions["smsgw.console"] = page
    return Response(
        page,
        content_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": _CONSOLE_CSP,
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
        },
    )


@bp.get("/v1/ops/console")
async def console_figures() -> Response:
    gw = gateway()
    gw.require_admin()
    cache = current_app.extensions.get("smsgw.console.cluster")
    if cache is None:
        cache = current_app.extensions["smsgw.console.cluster"] = ClusterCache()
    figures = await snapshot(gw.engine, cache)
    response = json_response(figures)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/v1/ops/operators/<name>/drain")
async def drain_operator(name: str) -> Response:
    gw = gateway()
    gw.require_admin()
    routing = gw.engine.pool.routing
    if name not in routing.router.by_name:
        raise ProblemError(404, "unknown_operator", f"no operator is named {name!r}")
    routing.drain(name, "drained by an admin")
    log.warning(
        "operator %r drained by an admin (from %s): its breaker is held open on this node"
        " until released",
        name,
        request.remote_addr,
    )
    return _operator_answer(name)


@bp.post("/v1/ops/operators/<name>/release")
async def release_operator(name: str) -> Response:
    gw = gateway()
    gw.require_admin()
    routing = gw.engine.pool.routing
    if name not in routing.router.by_name:
        raise ProblemError(404, "unknown_operator", f"no operator is named {name!r}")
    if routing.router.by_name[name].breaker.held is not None:
        routing.release(name)
        log.warning(
            "operator %r released by an admin (from %s): its breaker probes (half-open)",
            name,
            request.remote_addr,
        )
    return _operator_answer(name)


def _operator_answer(name: str) -> Response:
    engine = gateway().engine
    figures = engine.pool.stats()["operators"][name]
    node_id = engine.leases.store.node_id if engine.leases is not None else ""
    return json_response(DrainOut(node_id=node_id, operator=operator_out(name, figures)))
