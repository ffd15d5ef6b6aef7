"""PgCluster: node heartbeats, shard leases and hand-offs in PostgreSQL (migration 004).

The engine's `ClusterStore`. Lease changes (acquire, release) take each shard's advisory lock
exclusively; the accept transaction's `smsgw_handoff()` takes it shared before it reads the
owner. So a shard never changes hands between an accept deciding "the owner is me, no hand-off"
and that accept's commit, and the new owner's `load`, which runs after its change committed,
sees every message that was not handed off.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
import trio

from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import SHARDS, Beat, Notices, stream_key
from smsgw.storage.database import Database, bridge
from smsgw.storage.payloads import owner_channel
from smsgw.storage.rows import (
    NOT_FINAL,
    PENDING_COLUMNS,
    STREAM_SHARD,
    Days,
    ids_days,
    pending_sms,
    within_days,
)

log = logging.getLogger("smsgw.cluster")


def channel_and_lock_class(schema: str) -> tuple[str, int]:
    """The hand-off NOTIFY channel and the advisory lock class of a schema's nodes: nodes in
    other schemas of the same database (tests) neither wake nor wait for each other. Each
    node listens on its own channel of it (payloads.owner_channel)."""
    digest = hashlib.sha256(schema.encode()).digest()
    return f"smsgw_handoff_{_schema_tag(schema)}", int.from_bytes(digest[8:12], "big", signed=True)


def settled_channel(schema: str) -> str:
    """Where a schema's nodes announce the express outcomes they commit (`Settled`)."""
    return f"smsgw_settled_{_schema_tag(schema)}"


def account_channel(schema: str) -> str:
    """Where migration 006's trigger announces a schema's account changes (the same name,
    computed in SQL from the table's schema)."""
    return f"smsgw_account_{_schema_tag(schema)}"


def listen_name(schema: str, node_id: str) -> str:
    """The application_name of a node's LISTEN session: its schema's tag and its id, within
    PostgreSQL's 63 characters (`_END_STALLED_LISTENERS` finds it by them)."""
    return f"smsgw-listen {_schema_tag(schema)} {node_id}"[:63]


def _schema_tag(schema: str) -> str:
    """The 16 hex digits that set a schema's channels apart (migration 006 computes the same)."""
    return hashlib.sha256(schema.encode()).digest()[:8].hex()


_LOCK_EXCLUSIVE = """
SELECT count(pg_advisory_xact_lock($1, s)) FROM (SELECT unnest($2::int[]) AS s ORDER BY 1) q
"""

_LOAD_EXPRESS = f"""
SELECT {PENDING_COLUMNS} FROM messages
WHERE status IN ('queued', 'sending') AND express
  AND {STREAM_SHARD} = ANY($1::int[])
ORDER BY created_at
"""

# Each stream's bulk (ports.stream_key) in the shards: an account's under its own shard, and
# the bulk other nodes accepted for it under their home shards.
_COUNT_BULK = f"""
SELECT account_id, {STREAM_SHARD} AS shard, count(*) AS n FROM messages
WHERE status IN ('queued', 'sending') AND NOT express AND {STREAM_SHARD} = ANY($1::int[])
GROUP BY 1, 2
"""

_CLAIM = """
DELETE FROM shard_inbox i USING shard_leases l
WHERE l.shard = i.shard AND l.owner = $1
RETURNING i.message_id::text AS id, l.token
"""

# By primary key whatever the statistics say (rows.NOT_FINAL: with a literal status list and this
# order, a walk of messages_pending filtered by id can look cheaper after an ANALYZE taken while
# few messages were pending).
_READ_CLAIMED = f"""
SELECT {PENDING_COLUMNS}
FROM (SELECT DISTINCT id FROM unnest($1::uuid[]) AS u(id)) x JOIN messages ON messages.id = x.id
WHERE {{within}} AND status {NOT_FINAL}
ORDER BY messages.created_at
"""


@functools.lru_cache(maxsize=16)
def read_claimed_sql(days: Days | None) -> str:
    """_READ_CLAIMED for messages made in `days` (their ids' days: rows.within_days)."""
    return _READ_CLAIMED.replace("{within}", within_days("messages.id", days))


# The stranded-message sweep (ShardLeases.sweep): a page of the leased shards' pending
# messages older than $2 seconds, after the sweep's position ($3, $4), oldest first. It walks
# messages_pending (created_at, partial on the pending statuses) and stops at $5 rows: the
# cost is bounded by the LIMIT however many messages are pending, and the shard filter reads
# only the index's rows of that page's span (pending messages of other nodes' shards are
# skipped on the way, at most a few pages' worth with a few nodes). ORDER BY names the table's
# columns: the output's `created_at` and `id` (epoch seconds, text) would sort every pending
# row instead of walking the index (an incremental sort on created_at then id).
_SWEEP = f"""
SELECT {PENDING_COLUMNS} FROM messages
WHERE status IN ('queued', 'sending')
  AND created_at < now() - make_interval(secs => $2)
  AND created_at >= to_timestamp($3)
  AND (created_at, id) > (to_timestamp($3), $4::uuid)
  AND {STREAM_SHARD} = ANY($1::int[])
ORDER BY messages.created_at, messages.id
LIMIT $5
"""
# The plan must be the bounded walk of messages_pending whatever the statistics say: a table
# ANALYZEd while few messages were pending makes a bitmap scan and a sort of every pending
# message look cheaper (measured: it read all 20,000 of a test's pending rows for a page of
# 1,000). Set inside the sweep's own transaction: SET LOCAL ends with it.
_SWEEP_SETTINGS = "SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off"
_NO_ID = "00000000-0000-0000-0000-000000000000"

# The heartbeat, every tick: this node's row (HOT updates, migration 012) and the renewal of
# the leases it holds under their tokens.
_BEAT = """
INSERT INTO nodes (id, host, pid, url, pressure) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), url = $4, pressure = $5
"""
# The held shards' leases ($3), each renewed only under the token it was taken with: $4 holds
# the tokens by shard (`renewal_tokens`), so each lease finds its own in one step. Joined with
# the held list instead, the generic plan (which guesses 10 held) read the whole list again for
# each of the node's leases: up to 256 x 256 rows a tick.
_RENEW = """
UPDATE shard_leases AS l SET expires_at = now() + make_interval(secs => $2)
WHERE l.owner = $1 AND l.shard = ANY($3::int[]) AND l.token = ($4::bigint[])[l.shard + 1]
RETURNING l.shard, l.token
"""


def renewal_tokens(held: Mapping[int, int]) -> list[int | None]:
    """_RENEW's $4: the token of each held shard at the shard's place (NULL elsewhere)."""
    tokens: list[int | None] = [None] * SHARDS
    for shard, token in held.items():
        tokens[shard] = token
    return tokens


_LIVE = "SELECT count(*) FROM nodes WHERE heartbeat_at > now() - make_interval(secs => $1)"

# The LISTEN sessions ($2: their application_names, `listen_name`) of the nodes $1 that stopped
# heartbeating $3 seconds ago, ended. A node paused (SIGSTOP, a hung process) keeps its LISTEN
# session open and reads nothing from it: PostgreSQL keeps every notification since its oldest
# unread one for it, and once the queue is full every NOTIFY, of every node, fails. A node
# that comes back finds its session gone and listens again (ShardLeases._listen; its poll
# covers the gap). A killed node's session ended with it.
_END_STALLED_LISTENERS = """
SELECT count(pg_terminate_backend(a.pid))
FROM unnest($1::text[], $2::text[]) AS g(id, name)
JOIN nodes n ON n.id = g.id
JOIN pg_stat_activity a ON a.application_name = g.name AND a.datname = current_database()
WHERE n.heartbeat_at < now() - make_interval(secs => $3)
"""


# Other nodes' shards whose dispatch is stalled (lease expired, or the owner's heartbeat is
# late) or whose owner publishes a pressure. A shard nobody leases is in transit between live
# nodes (a rebalance): not stalled. Usually no row at all.
_OTHERS = """
SELECT shard, stalled, pressure FROM (
    SELECT l.shard, n.pressure,
           l.expires_at < now() OR n.heartbeat_at IS NULL
           OR n.heartbeat_at < now() - make_interval(secs => $2) AS stalled
    FROM shard_leases l LEFT JOIN nodes n ON n.id = l.owner
    WHERE l.owner <> $1
) o
WHERE stalled OR pressure IS NOT NULL
"""

# This node's demand per account into `{table}` (api_demand: requests, send_demand: backlog of a
# paced account), and the other nodes' latest for the same accounts.
_DEMAND = """
WITH mine AS (
    INSERT INTO {table} AS d (account_id, node_id, demand, at)
    SELECT a, $1, n, now() FROM unnest($2::bigint[], $3::int[]) AS x(a, n)
    ON CONFLICT (account_id, node_id) DO UPDATE SET demand = excluded.demand, at = excluded.at
)
SELECT account_id, sum(demand)::bigint AS total FROM {table}
WHERE account_id = ANY($2::bigint[]) AND node_id <> $1
  AND at > now() - make_interval(secs => $4)
GROUP BY account_id
"""
_API_DEMAND = _DEMAND.format(table="api_demand")
_SEND_DEMAND = _DEMAND.format(table="send_demand")


class PgCluster:
    """This node's view of the shared cluster tables, for `ShardLeases`."""

    def __init__(
        self,
        db: Database,
        url: str,
        node_id: str,
        *,
        advertised_url: Callable[[], str] = lambda: "",
    ) -> None:
        self.db = db
        self._url = url
        self._node_id = node_id
        self._advertised_url = advertised_url
        self.channel, self.lock_class = channel_and_lock_class(db.schema)
        self.settled_channel = settled_channel(db.schema)
        self.account_channel = account_channel(db.schema)
        self.host = socket.gethostname()
        self.pid = os.getpid()

    @property
    def node_id(self) -> str:
        return self._node_id

    async def join(self, ttl: float) -> None:
        """Register. A row of this id that is alive elsewhere (another process on this host,
        or one heartbeating from another host) is an error: two nodes must never share an id.
        A row left by a dead process of this host, or gone stale, is taken over."""
        for _ in range(int(ttl * 4) + 8):
            row = await self.db.run(
                lambda c: c.fetchrow(
                    "SELECT host, pid, heartbeat_at > now() - make_interval(secs => $2) AS fresh"
                    " FROM nodes WHERE id = $1",
                    self._node_id,
                    ttl,
                )
            )
            if row is None or not row["fresh"] or self._is_dead(row["host"], row["pid"]):
                break
            if row["host"] == self.host:
                raise RuntimeError(
                    f"node id {self._node_id!r} is in use by pid {row['pid']} on this host;"
                    " give each node its own --node-id"
                )
            await trio.sleep(0.5)
        else:
            raise RuntimeError(f"node id {self._node_id!r} is heartbeating on another host")

        async def register(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                mine = [
                    r[0]
                    for r in await conn.fetch(
                        "SELECT shard FROM shard_leases WHERE owner = $1 ORDER BY shard FOR UPDATE",
                        self._node_id,
                    )
                ]
                if mine:
                    # A previous run's leases: what it held in memory died with it.
                    await conn.execute(_LOCK_EXCLUSIVE, self.lock_class, mine)
                    await conn.execute(
                        "UPDATE shard_leases SET owner = NULL, expires_at = '-infinity'"
                        " WHERE shard = ANY($1::int[])",
                        mine,
                    )
                # Nodes gone for a day leave the cluster view (their leases expired long ago).
                await conn.execute(
                    "DELETE FROM nodes WHERE heartbeat_at < now() - interval '1 day'"
                )
                await conn.execute(
                    "INSERT INTO nodes (id, host, pid, url) VALUES ($1, $2, $3, $4)"
                    " ON CONFLICT (id) DO UPDATE SET host = $2, pid = $3, url = $4,"
                    " started_at = now(), heartbeat_at = now()",
                    self._node_id,
                    self.host,
                    self.pid,
                    self._advertised_url(),
                )

        await self.db.run(register)

    def _is_dead(self, host: str, pid: int) -> bool:
        if host != self.host:
            return False
        if pid == self.pid:
            return True  # this very process (a restart of the node inside it)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    async def heartbeat(
        self, held: Mapping[int, int], ttl: float, stalled_after: float, pressure: str | None
    ) -> Beat:
        async def beat(conn: asyncpg.Connection) -> Beat:
            await conn.execute(
                _BEAT,
                self._node_id,
                self.host,
                self.pid,
                self._advertised_url(),
                pressure,
            )
            renewed: dict[int, int] = {}
            if held:
                rows = await conn.fetch(
                    _RENEW,
                    self._node_id,
                    ttl,
                    list(held),
                    renewal_tokens(held),
                )
                renewed = {r["shard"]: r["token"] for r in rows}
            live = await conn.fetchval(_LIVE, ttl)
            others = await conn.fetch(_OTHERS, self._node_id, stalled_after)
            return Beat(
                int(live),
                renewed,
                frozenset(r["shard"] for r in others if r["stalled"]),
                {r["shard"]: r["pressure"] for r in others if r["pressure"] is not None},
            )

        return await self.db.run(beat)

    async def acquire(self, count: int, ttl: float) -> dict[int, int]:
        async def take(conn: asyncpg.Connection) -> dict[int, int]:
            async with conn.transaction():
                # SKIP LOCKED: nodes taking shards at the same moment take different ones.
                candidates = await conn.fetch(
                    "SELECT shard, owner FROM shard_leases"
                    " WHERE owner IS NULL OR expires_at < now()"
                    " ORDER BY shard LIMIT $1 FOR UPDATE SKIP LOCKED",
                    count,
                )
                free = [r["shard"] for r in candidates]
                if not free:
                    return {}
                gone = sorted({r["owner"] for r in candidates} - {None, self._node_id})
                if gone:
                    names = [listen_name(self.db.schema, node_id) for node_id in gone]
                    await conn.fetchval(_END_STALLED_LISTENERS, gone, names, ttl)
                await conn.execute(_LOCK_EXCLUSIVE, self.lock_class, free)
                rows = await conn.fetch(
                    "UPDATE shard_leases SET owner = $1, token = nextval('lease_tokens'),"
                    " expires_at = now() + make_interval(secs => $2), acquired_at = now()"
                    " WHERE shard = ANY($3::int[]) RETURNING shard, token",
                    self._node_id,
                    ttl,
                    free,
                )
                return {r["shard"]: r["token"] for r in rows}

        if count <= 0:
            return {}
        return await self.db.run(take)

    async def release(self, shards: Sequence[int]) -> None:
        async def give(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(_LOCK_EXCLUSIVE, self.lock_class, sorted(shards))
                await conn.execute(
                    "UPDATE shard_leases SET owner = NULL, expires_at = '-infinity'"
                    " WHERE owner = $1 AND shard = ANY($2::int[])",
                    self._node_id,
                    list(shards),
                )

        if shards:
            await self.db.run(give)

    async def leave(self, shards: Sequence[int]) -> None:
        await self.release(shards)
        await self.db.run(lambda c: c.execute("DELETE FROM nodes WHERE id = $1", self._node_id))

    async def load_backlog(
        self, shards: Sequence[int]
    ) -> tuple[list[OutboundSms], list[tuple[int, int]]]:
        async def read(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], list[Any]]:
            async with conn.transaction(isolation="repeatable_read"):
                await conn.execute("DELETE FROM shard_inbox WHERE shard = ANY($1::int[])", shards)
                express = await conn.fetch(_LOAD_EXPRESS, shards)
                counts = await conn.fetch(_COUNT_BULK, shards)
                return express, [(stream_key(r["account_id"], r["shard"]), r["n"]) for r in counts]

        express, counts = await self.db.run(read)
        return [pending_sms(r) for r in express], counts

    async def pending_page(
        self,
        shards: Sequence[int],
        older_than_s: float,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[OutboundSms]:
        """Up to `limit` pending messages of `shards` created more than `older_than_s` ago and
        after `after` ((created_at, id); None: from the oldest), oldest first."""
        # The position is a created_at read back as epoch seconds: a float may round it by a
        # microsecond, which re-reads or skips the odd message until the sweep wraps around.
        at, after_id = after if after is not None else (float("-inf"), _NO_ID)

        async def read(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            async with conn.transaction():
                await conn.execute(_SWEEP_SETTINGS)
                rows: list[asyncpg.Record] = await conn.fetch(
                    _SWEEP, list(shards), older_than_s, at, after_id, limit
                )
            return rows

        return [pending_sms(r) for r in await self.db.run(read)]

    async def still_pending(self, ids: Sequence[str]) -> list[OutboundSms]:
        """The messages of `ids` that are still queued or sending."""

        async def read(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            rows: list[asyncpg.Record] = await conn.fetch(
                read_claimed_sql(ids_days(ids)), list(ids)
            )
            return rows

        return [pending_sms(r) for r in await self.db.run(read)]

    async def claim(self, known: Callable[[str], bool]) -> list[tuple[OutboundSms, int]]:
        async def take(conn: asyncpg.Connection) -> list[tuple[OutboundSms, int]]:
            claimed = await conn.fetch(_CLAIM, self._node_id)
            # Most were dispatched from their notification already: read only the others.
            tokens = {r["id"]: r["token"] for r in claimed if not known(r["id"])}
            if not tokens:
                return []
            rows = await conn.fetch(read_claimed_sql(ids_days(tokens)), list(tokens))
            return [(pending_sms(r), tokens[r["id"]]) for r in rows]

        return await self.db.run(take)

    async def listen(self, notices: Notices) -> None:
        me = self._node_id

        def on_handoff(conn: object, pid: int, channel: str, payload: str) -> None:
            owner, _, body = payload.partition("\n")
            if owner == me:
                notices.handoffs(body)

        def on_settled(conn: object, pid: int, channel: str, payload: str) -> None:
            notices.settled(payload)

        def on_account(conn: object, pid: int, channel: str, payload: str) -> None:
            notices.account_changed(payload)

        async def hold() -> None:
            conn = await asyncpg.connect(
                self._url,
                server_settings={"application_name": listen_name(self.db.schema, me)},
            )
            closed = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _: closed.set())
                await conn.add_listener(owner_channel(self.channel, me), on_handoff)
                await conn.add_listener(self.settled_channel, on_settled)
                await conn.add_listener(self.account_channel, on_account)
                await closed.wait()
            finally:
                if not conn.is_closed():
                    await conn.close(timeout=2)

        await bridge(hold)()

    async def api_demand(self, mine: Mapping[int, int], horizon: float) -> dict[int, int]:
        return await self._demand(_API_DEMAND, mine, horizon)

    async def send_demand(self, mine: Mapping[int, int], horizon: float) -> dict[int, int]:
        return await self._demand(_SEND_DEMAND, mine, horizon)

    async def _demand(self, sql: str, mine: Mapping[int, int], horizon: float) -> dict[int, int]:
        # The CTE's upsert is not visible to the same statement's read: others' rows only.
        rows = await self.db.run(
            lambda c: c.fetch(sql, self._node_id, list(mine), list(mine.values()), horizon)
        )
        return {r["account_id"]: r["total"] for r in rows}

    async def cluster(self, ttl: float) -> dict[str, Any]:
        async def read(conn: asyncpg.Connection) -> dict[str, Any]:
            nodes = await conn.fetch(
                "SELECT n.id, n.host, n.pid, n.url, n.started_at, n.heartbeat_at,"
                " extract(epoch FROM now() - n.heartbeat_at)::float8 AS heartbeat_age_s,"
                " n.heartbeat_at > now() - make_interval(secs => $1) AS alive,"
                " count(l.shard) FILTER (WHERE l.expires_at > now()) AS shards,"
                " count(l.shard) FILTER (WHERE l.expires_at <= now()) AS expired_shards"
                " FROM nodes n LEFT JOIN shard_leases l ON l.owner = n.id"
                " GROUP BY n.id ORDER BY n.id",
                ttl,
            )
            unowned = await conn.fetchval(
                "SELECT count(*) FROM shard_leases WHERE owner IS NULL OR expires_at <= now()"
            )
            waiting = await conn.fetchval("SELECT count(*) FROM shard_inbox")
            queue = await conn.fetchval("SELECT pg_notification_queue_usage()")
            return {
                "nodes": [
                    {
                        "id": r["id"],
                        "host": r["host"],
                        "pid": r["pid"],
                        "url": r["url"],
                        "alive": r["alive"],
                        "started_at": r["started_at"],
                        "heartbeat_at": r["heartbeat_at"],
                        "heartbeat_age_s": round(r["heartbeat_age_s"], 3),
                        "shards": r["shards"],
                        "expired_shards": r["expired_shards"],
                    }
                    for r in nodes
                ],
                "shards": 256,
                "unowned_shards": int(unowned),
                "handoffs_waiting": int(waiting),
                "notify_queue_usage": float(queue),
            }

        return await self.db.run(read)
