"""Operations: liveness, readiness, the supervision tree, the nodes sharing the database."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from quart import Response

from smsgw.engine.messages import SupervisorStatus
from smsgw.http.api import Api
from smsgw.http.context import gateway, json_response
from smsgw.http.problems import ProblemError
from smsgw.http.schemas import ClusterOut, HealthOut, ReadyOut

api = Api("ops", __name__, tag="ops")


LeaseDetail = Annotated[
    Literal["leases"],
    msgspec.Meta(
        description="`leases`: child `shard_leases` lists every lease with its fencing token"
        " (default: `lease_summary`, its count, shard ranges and token span)"
    ),
]


class SupervisorQuery(msgspec.Struct, frozen=True):
    detail: LeaseDetail | None = None


@api.route("GET", "/health", "Liveness", auth="none", responses={200: HealthOut})
async def health() -> Response:
    return json_response({"status": "ok"})


@api.route(
    "GET",
    "/ready",
    "Readiness: PostgreSQL answers and recovery is done",
    auth="none",
    responses={200: ReadyOut},
    problems=(503,),
)
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


@api.route(
    "GET",
    "/v1/ops/supervisor",
    "The supervision tree: each actor's state, restarts, inbox and own figures",
    auth="admin",
    query=SupervisorQuery,
    responses={200: SupervisorStatus},
    problems=(503,),
)
async def supervisor_status() -> Response:
    gw = gateway()
    gw.require_admin()
    detail = gw.query(SupervisorQuery).detail
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


@api.route(
    "GET",
    "/v1/ops/cluster",
    "The nodes sharing this database: heartbeats and leased shards",
    auth="admin",
    responses={200: ClusterOut},
    problems=(503,),
    description=(
        "Accounts hash into 256 shards; each is dispatched by the one live node holding its"
        " lease. This node's own leases (with their fencing tokens) are in"
        " /v1/ops/supervisor, child `shard_leases`."
    ),
)
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
