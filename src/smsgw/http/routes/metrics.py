"""GET /metrics for Prometheus: the admin key, unless the node says metrics are public."""

from __future__ import annotations

from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from quart import Response, current_app

from smsgw.http.api import Api, Content
from smsgw.http.context import gateway

api = Api("metrics", __name__, tag="ops")


@api.route(
    "GET",
    "/metrics",
    "Prometheus metrics (text format)",
    auth="admin",
    responses={200: Content("text/plain", {"type": "string"})},
    description=(
        "Needs the admin key unless the node runs with SMSGW_METRICS_PUBLIC=1; then it is"
        " open (keep it off public networks)."
    ),
)
async def metrics() -> Response:
    # Open only by choice (SMSGW_METRICS_PUBLIC=1, for a scraper on a private network): the
    # figures name operators and failure reasons, and are no business of the public.
    if not current_app.config.get("SMSGW_METRICS_PUBLIC", False):
        gateway().require_admin()
    registry = cast(CollectorRegistry, current_app.extensions["smsgw.metrics"])
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
