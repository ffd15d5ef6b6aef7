-- The tables every node writes on every tick stay small (issue 29): shard_leases (each held
-- lease renewed) and nodes (each heartbeat). An UPDATE that changes no indexed column is HOT
-- (a heap-only tuple: no new index entry, the old version pruned on the page as soon as no
-- snapshot needs it) only when the new version fits on the same page. Packed full, as these
-- were, every renewal went to another page with a new index entry, and a lease lookup walked
-- every version its index kept (155 per probe, seen in an outage). With 80% of each page left
-- free, a renewal always finds room beside its row: the table holds one page per 20 or so
-- leases, and the primary key one entry per lease.
--
-- Neither statement changes an indexed column: the renewal writes expires_at, the heartbeat
-- heartbeat_at, url and pressure; each table's only index is its primary key (shard, id),
-- which the tick never writes. An index on any of these columns would end the HOT updates.
--
-- A new fillfactor applies to the pages written from now on. The rows in place move on their
-- first renewal (to a page with room, once), so no rewrite is needed, nor the lock it takes
-- while the nodes renew their leases.
--
-- Autovacuum: after 200 dead versions that pruning left (whatever the table's size, not a
-- fifth of it), without the cost-based pauses meant to spare large tables; a vacuum of these
-- tables reads a few dozen pages.
ALTER TABLE shard_leases SET (
    fillfactor = 20,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE nodes SET (
    fillfactor = 20,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0
);
-- Each node's demand per rate-limited account, overwritten every tick (migration 008: already
-- fillfactor 50): cleaned as promptly.
ALTER TABLE api_demand SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0
);
