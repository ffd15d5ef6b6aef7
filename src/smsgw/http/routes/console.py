"""The ops console: the page (GET /ops), the figures it polls, and draining an operator."""

from __future__ import annotations

import logging
from importlib import resources
from typing import Annotated

import msgspec
from quart import Response, current_app, request

from smsgw.http.api import Api, Content
from smsgw.http.console import ClusterCache, ConsoleOut, DrainOut, operator_out, snapshot
from smsgw.http.context import gateway, json_response
from smsgw.http.problems import ProblemError

api = Api("console", __name__, tag="ops")
Operator = Annotated[str, msgspec.Meta(description="the operator's name")]
log = logging.getLogger("smsgw.ops")

# The page runs one inline script, draws with SVG, and talks only to its own node. No frame
# may embed it: its buttons drain operators.
_CONSOLE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)


@api.route(
    "GET",
    "/ops",
    "The ops console: a live page of the supervision tree, queues, operators and nodes",
    auth="none",
    responses={200: Content("text/html", {"type": "string"})},
    description=(
        "Self-contained (no CDN). It asks for the admin key once, keeps it in the tab's"
        " sessionStorage and sends it as a Bearer header to GET /v1/ops/console every"
        " second; the drain and release buttons call the routes above after a confirm."
    ),
)
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


@api.route(
    "GET",
    "/v1/ops/console",
    "Everything the ops console (GET /ops) draws, in one answer",
    auth="admin",
    responses={200: ConsoleOut},
    description=(
        "The supervision tree, the scheduler's lanes, each operator's breaker and figures,"
        " cumulative counters (a poller turns them into rates) and the nodes with the"
        " shard map, from the node that answered (`node_id`). The nodes' view is read from"
        " PostgreSQL at most once a second; `cluster.error` says why it is missing."
    ),
)
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


@api.route(
    "POST",
    "/v1/ops/operators/<name>/drain",
    "Drain an operator: hold its breaker open on this node until released",
    auth="admin",
    responses={200: DrainOut},
    description=(
        "No call to the operator begins on the node that answers (`node_id`); its"
        " messages go to the other operators (a route override's only with `fallback`),"
        " calls in flight finish. Logged. Idempotent."
    ),
)
async def drain_operator(name: Operator) -> Response:
    gw = gateway()
    gw.require_admin()
    _known_operator(name)
    gw.engine.pool.drain(name, "drained by an admin")
    log.warning(
        "operator %r drained by an admin (from %s): its breaker is held open on this node"
        " until released",
        name,
        request.remote_addr,
    )
    return _operator_answer(name)


@api.route(
    "POST",
    "/v1/ops/operators/<name>/release",
    "Release a drained operator: its breaker probes (half-open), then closes",
    auth="admin",
    responses={200: DrainOut},
    description="Logged. An operator that is not drained is left as it is.",
)
async def release_operator(name: Operator) -> Response:
    gw = gateway()
    gw.require_admin()
    _known_operator(name)
    if gw.engine.pool.release(name):
        log.warning(
            "operator %r released by an admin (from %s): its breaker probes (half-open)",
            name,
            request.remote_addr,
        )
    return _operator_answer(name)


def _known_operator(name: str) -> None:
    if name not in gateway().engine.pool.names:
        raise ProblemError(404, "unknown_operator", f"no operator is named {name!r}")


def _operator_answer(name: str) -> Response:
    engine = gateway().engine
    figures = engine.pool.stats()["operators"][name]
    node_id = engine.leases.store.node_id if engine.leases is not None else ""
    return json_response(DrainOut(node_id=node_id, operator=operator_out(name, figures)))
