-- Scheduled sends (issue 24; engine/scheduled.py, storage/scheduled.py). A message accepted
-- with a `send_at` in the future is stored `scheduled`, its price held, and stays in
-- PostgreSQL only, in no node's memory, until it is due: then the node that leases its shard
-- moves it to `queued` and into dispatch, a page at a time. A nullable column without a
-- default is a catalog change only: no rewrite of `messages`.
ALTER TABLE messages ADD COLUMN send_at timestamptz;

-- The due-time index: each shard's scheduled messages in send_at order, so a node reads the
-- due messages of the shards it leases (a range of this index per shard, however many other
-- nodes' messages are due) and the next due time (the first entry per shard). Only
-- `scheduled` rows are in it: a message leaves it when it is promoted or cancelled, and every
-- other insert pays one predicate test. The shard is the dispatching shard, computed as
-- `dispatch_shard()` computes it (shard_of is IMMUTABLE); storage/scheduled.py writes the
-- expression exactly so, for the planner to match it. The first build reads `messages` once
-- (no row matches yet).
CREATE INDEX messages_scheduled
    ON messages ((coalesce(dispatch_shard, shard_of(account_id))), send_at)
    WHERE status = 'scheduled';
