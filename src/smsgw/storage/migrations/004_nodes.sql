-- Several nodes on one PostgreSQL: node heartbeats, shard leases with fencing tokens, and the
-- hand-off of messages accepted by a node that does not lease their shard (docs/architecture.md,
-- "Nodes").

-- An account's shard: Fibonacci hashing, the top 8 bits of id * 2^64/phi (mod 2^64), so the
-- consecutive ids of a sequence spread evenly over 256 shards. smsgw.engine.shards.shard_of
-- computes the same in Python (a test holds them equal). numeric, because the product
-- overflows bigint; only recovery queries call it, never the accept path.
CREATE FUNCTION shard_of(account_id bigint) RETURNS int
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT div(mod(account_id::numeric * 11400714819323198485, 18446744073709551616),
               72057594037927936)::int
$$;

CREATE TABLE nodes (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          int NOT NULL,
    url          text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Fencing tokens: one sequence for all shards, so a token names one lease (shard, owner, term)
-- and grows every time a shard changes hands. Every status write carries the token its
-- message was dispatched under and lands only while that token is still the shard's.
CREATE SEQUENCE lease_tokens;

CREATE TABLE shard_leases (
    shard       int PRIMARY KEY CHECK (shard >= 0 AND shard < 256),
    owner       text,
    token       bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity',
    acquired_at timestamptz
);
INSERT INTO shard_leases (shard) SELECT generate_series(0, 255);

-- Messages accepted by a node that does not lease their shard, waiting for the shard's owner
-- (woken by NOTIFY, or its short poll) to claim them. Written in the accept transaction, so a
-- hand-off is as durable as the message; claimed with DELETE ... RETURNING, so exactly once.
CREATE TABLE shard_inbox (
    shard      int NOT NULL,
    message_id uuid NOT NULL,
    PRIMARY KEY (shard, message_id)
);

-- Called in each group commit that stores messages, after their INSERT. A shared advisory
-- lock per shard orders it against lease changes (which take the lock exclusively): a lease
-- cannot change hands between this reading the owner and the commit, so a message is either
-- handed off here or committed before the new owner's recovery reads its shard. Returns each
-- handed-off message with the owner to wake ('' for a shard nobody leases); the caller
-- NOTIFYs them after the commit (a NOTIFY in this transaction would hold PostgreSQL's
-- notify lock through the commit and serialise the group commits of every node).
CREATE FUNCTION smsgw_handoff(me text, lock_class int, shards int[], ids uuid[])
RETURNS TABLE (owner text, message_id uuid) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_advisory_xact_lock_shared(lock_class, d.s)
    FROM (SELECT DISTINCT x AS s FROM unnest(shards) AS x ORDER BY 1) AS d;
    RETURN QUERY
    WITH h AS (
        INSERT INTO shard_inbox AS i (shard, message_id)
        SELECT x.shard, x.id
        FROM unnest(shards, ids) AS x(shard, id)
        JOIN shard_leases l ON l.shard = x.shard
        WHERE l.owner IS DISTINCT FROM me
        ON CONFLICT DO NOTHING
        RETURNING i.shard AS shard, i.message_id AS id
    )
    SELECT coalesce(l.owner, ''), h.id FROM h JOIN shard_leases l ON l.shard = h.shard;
END
$$;
