-- Each node's backlog per paced account (engine/shares.py, SendShares): a paced account's bulk
-- goes to its shard's owner, but what other nodes accepted for it before it was paced stays
-- with them; each node paces the account at the share of its rate that its backlog is of the
-- cluster's, so the rate holds for the account as a whole. Shaped and kept as api_demand
-- (migrations 007, 012): a row per (account, node), overwritten every tick.
CREATE TABLE send_demand (
    account_id bigint NOT NULL,
    node_id    text NOT NULL,
    demand     int NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (account_id, node_id)
) WITH (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200,
    autovacuum_vacuum_cost_delay = 0
);
