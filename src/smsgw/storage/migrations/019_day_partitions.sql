-- Daily partitions of `messages` (issue 27; docs/architecture.md, "Storage for years").
--
-- At 100M messages a day one table grows by 3 billion rows a month; whole days are dropped
-- as partitions instead of deleted row by row, and a day's indexes stay the size of a day.
-- The partition key is the id: message ids are UUIDv7 made by the node (http/context.py),
-- whose first 48 bits are Unix milliseconds, so a UTC day is one range of ids and every
-- statement that finds a message by id (outcomes, bodies, reads) prunes to one partition
-- without knowing when it was made. The primary key stays (id): a partitioned table's unique
-- index must contain the partition key, which it does.

-- The least UUIDv7 of the millisecond `at` falls in: the id bound of a day or of a time range.
-- Clamped to the 48 bits an id has (a cursor may start at the year 1).
CREATE FUNCTION uuid7_floor(at timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (lpad(to_hex(least(greatest(floor(extract(epoch FROM at) * 1000), 0),
                              281474976710655)::bigint), 12, '0')
            || '00000000000000000000')::uuid
$$;

-- A random UUIDv7 of the time `at`, as the node makes them: for data made in SQL (tests,
-- benchmarks); the gateway's own ids come from the node.
CREATE FUNCTION uuid7_at(at timestamptz) RETURNS uuid LANGUAGE sql VOLATILE STRICT AS $$
    SELECT overlay(overlay(replace(gen_random_uuid()::text, '-', '')
                           PLACING left(replace(uuid7_floor(at)::text, '-', ''), 12) FROM 1)
                   PLACING '7' FROM 13)::uuid
$$;

-- The tables partitioned by day on a UUIDv7 column; storage/partitions.py keeps their
-- partitions (made ahead, dropped past the retention). `each_partition`: DDL run on each new
-- partition before it is attached, format()ted with the partition's name, for what cannot be
-- declared on the parent; `pending`: a query, format()ted with a partition's name, true when
-- the partition holds a row that keeps it from being dropped;
-- `redacted_through`: the last id whose body the redaction reached (messages only).
CREATE TABLE day_partitioned (
    parent           text PRIMARY KEY,
    each_partition   text,
    pending          text,
    redacted_through uuid
);

-- The partition of `parent` for the UTC day `day`, named parent_YYYYMMDD, unless it exists;
-- returns its name when it made it. Made apart and then attached: ATTACH PARTITION takes a
-- SHARE UPDATE EXCLUSIVE lock on the parent, which no read or write waits for (CREATE TABLE
-- ... PARTITION OF would take an ACCESS EXCLUSIVE one), and the parent's indexes are built on
-- the empty table as it is attached. An advisory lock orders the nodes that make them.
CREATE FUNCTION smsgw_add_day_partition(parent text, day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    part text := parent || '_' || to_char(day, 'YYYYMMDD');
    extra text;
BEGIN
    PERFORM pg_advisory_xact_lock(727275);
    IF to_regclass(quote_ident(part)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS'
                   ' INCLUDING STORAGE INCLUDING COMPRESSION)', part, parent);
    SELECT d.each_partition INTO extra FROM day_partitioned d WHERE d.parent = $1;
    IF extra IS NOT NULL THEN
        EXECUTE format(extra, part);
    END IF;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, uuid7_floor(day::timestamp AT TIME ZONE 'UTC'),
                   uuid7_floor((day + 1)::timestamp AT TIME ZONE 'UTC'));
    RETURN part;
END
$$;

-- The conversion: a partitioned table of the same columns (whatever earlier migrations added),
-- a partition for every day from the oldest message's through today and a week ahead, the
-- rows moved, and the old table's indexes made again on the parent (as partitioned indexes:
-- each partition gets its own, and new ones get them as they are attached).
ALTER TABLE messages RENAME TO messages_unpartitioned;
ALTER INDEX messages_pkey RENAME TO messages_unpartitioned_pkey;
CREATE TABLE messages (
    LIKE messages_unpartitioned
    INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION
) PARTITION BY RANGE (id);

-- client_ref was unique per account through one index over every message. A unique index on
-- a partitioned table must contain the partition key, so (account_id, client_ref) can only be
-- unique per partition: each day's partition has its own index, which arbitrates within the
-- day (exact across nodes, as before; the intake's ON CONFLICT DO NOTHING names no target, so
-- a partition's own index counts), and the group commit probes the day before (and the hour
-- after) under the account's row lock (storage/commit_sql.py): a ref is unique for at least
-- 24 hours.
-- A partition holding a queued, sending or scheduled message is never dropped: asked of the
-- small partial indexes messages_pending and messages_scheduled, one EXISTS each (one OR'ed
-- condition would walk messages_account_status instead).
INSERT INTO day_partitioned (parent, each_partition, pending) VALUES (
    'messages',
    'CREATE UNIQUE INDEX %1$s_client_ref ON %1$s (account_id, client_ref)'
    ' WHERE client_ref IS NOT NULL',
    $$SELECT EXISTS (SELECT FROM %1$I WHERE status IN ('queued', 'sending'))
          OR EXISTS (SELECT FROM %1$I WHERE status = 'scheduled')$$
);

-- The UTC day a UUIDv7 names (its first 48 bits, Unix milliseconds).
CREATE OR REPLACE FUNCTION pg_temp.id_day(id uuid) RETURNS date LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (to_timestamp(('x' || left(replace(id::text, '-', ''), 12))::bit(48)::bigint / 1000.0)
            AT TIME ZONE 'UTC')::date
$$;

-- Every id's day has a partition: the days of UUIDv7 ids from the oldest on (a run of days,
-- today and a week ahead included), and the day any other id's first 48 bits name (the
-- gateway made none; rows written by hand or by old test data may have them), or any id past
-- the week ahead (a node's clock gone wrong).
SELECT smsgw_add_day_partition('messages', day)
FROM (
    SELECT generate_series(
               coalesce((SELECT pg_temp.id_day(id) FROM messages_unpartitioned
                         WHERE substr(id::text, 15, 1) = '7' ORDER BY id LIMIT 1),
                        (now() AT TIME ZONE 'UTC')::date),
               (now() AT TIME ZONE 'UTC')::date + 7,
               interval '1 day')::date AS day
    UNION
    SELECT DISTINCT pg_temp.id_day(id) FROM messages_unpartitioned
    WHERE substr(id::text, 15, 1) <> '7'
       OR id >= uuid7_floor(((now() AT TIME ZONE 'UTC')::date + 8)::timestamp AT TIME ZONE 'UTC')
) days
ORDER BY day;

INSERT INTO messages SELECT * FROM messages_unpartitioned;

DO $$
DECLARE
    defs text[];
    def text;
BEGIN
    -- The old table's indexes but its primary key and the client_ref index (above).
    SELECT array_agg(indexdef ORDER BY indexname) INTO defs FROM pg_indexes
    WHERE schemaname = current_schema() AND tablename = 'messages_unpartitioned'
      AND indexname NOT IN ('messages_unpartitioned_pkey', 'messages_account_client_ref');
    DROP TABLE messages_unpartitioned;
    ALTER TABLE messages ADD PRIMARY KEY (id);
    FOREACH def IN ARRAY coalesce(defs, '{}') LOOP
        EXECUTE regexp_replace(def, ' ON \S+ USING ', ' ON messages USING ');
    END LOOP;
END
$$;

-- Migration 002's statistic, on the parent: an ANALYZE of `messages` gathers it over all the
-- partitions (autovacuum analyzes each partition, never a partitioned parent).
CREATE STATISTICS messages_created_day ON ((created_at AT TIME ZONE 'UTC')::date) FROM messages;
ANALYZE messages;
