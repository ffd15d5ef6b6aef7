"""Operations: liveness, readiness, the supervision tree, the nodes sharing the database."""

from __future__ import annotations

import msgspec
from quart import Blueprint, Response

from smsgw.http.context import gateway, json_response
from smsgw.http.problems import ProblemError
from smsgw.http.schemas import ClusterOut

bp = Blueprint("ops", __name__)


@bp.get("/health")
async def health() -> Response:
    return json_response({"status": "ok"})


@bp.get("/ready")
async def ready() -> Response:
    gw = gateway()
    if not gw.engine.ready.is_set():
        raise ProblemError(503, "recovering", "recovering pending messages")
    failing = gw.engine.writer.commits_failing()
    if failing is not None:
        # Accepts would time out or fail here: a load balancer should send them elsewhere.
        raise ProblemError(503, "commits_failing", failing)
    try:
        await gw.reads.ping()
    except Exception as exc:
        raise ProblemError(503, "database_unreachable", f"PostgreSQL: {exc}") from None
    return json_response({"status": "ready", "recovered": gw.engine.recovered})


@bp.get("/v1/ops/supervisor")
async def supervisor_status() -> Response:
    gw = gateway()
    gw.require_admin()
    if gw.engine.supervisor is None:
        raise ProblemError(503, "starting", "the supervisor is starting")
    return json_response(gw.engine.supervisor.status())


@bp.get("/v1/ops/cluster")
async def cluster_status() -> Response:
    """Every node on this database, its heartbeat and its shard count (one query)."""
    gw = gateway()
    gw.require_admin()
    leases = gw.engine.leases
    if leases is None:
        raise ProblemError(503, "not_clustered", "this node runs alone, without shard leases")
    try:
        view = await leases.store.cluster(leases.config.ttl)
    except Exception as exc:
        raise ProblemError(503, "database_unreachable", f"PostgreSQL: {exc}") from None
    return json_response(msgspec.convert({**view, "node_id": leases.store.node_id}, ClusterOut))
