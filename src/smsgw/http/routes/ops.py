"""Operations: liveness, readiness, the supervision tree, the nodes sharing the database."""

from __future__ import annotations

from typing import Any

import msgspec
from quart import Blueprint, Response, request

from smsgw.http.context import gateway, json_response
from smsgw.http.params import query_params
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
    params = query_params(request.args, ("detail",))
    detail = params.get("detail")
    if detail not in (None, "leases"):
        raise ProblemError(422, "invalid_field", "`detail` is `leases` or absent", field="detail")
    if gw.engine.supervisor is None:
        raise ProblemError(503, "starting", "the supervisor is starting")
    tree = msgspec.to_builtins(gw.engine.supervisor.status())
    if detail != "leases":
        for child in tree["children"]:
            if child["name"] == "shard_leases" and isinstance(child["stats"].get("leases"), list):
                child["stats"] = summarise_leases(child["stats"])
    return json_response(tree)


def summarise_leases(stats: dict[str, Any]) -> dict[str, Any]:
    """The shard leases' figures with the list of every lease (up to 256 entries, most of the
    page) in place of a summary: how many, the shards as ranges, the fencing tokens' span.
    `?detail=leases` keeps the list."""
    leases = stats["leases"]
    tokens = [lease["token"] for lease in leases]
    summary = {
        "count": len(leases),
        "shards": shard_ranges(sorted(lease["shard"] for lease in leases)),
        "token_min": min(tokens, default=None),
        "token_max": max(tokens, default=None),
    }
    return {**{k: v for k, v in stats.items() if k != "leases"}, "lease_summary": summary}


def shard_ranges(shards: list[int]) -> str:
    """Sorted shard numbers as compact ranges: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts: list[str] = []
    start = previous = None
    for shard in [*shards, None]:
        if shard is not None and previous is not None and shard == previous + 1:
            previous = shard
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = shard
    return ",".join(parts)


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
