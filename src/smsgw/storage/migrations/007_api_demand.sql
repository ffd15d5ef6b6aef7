-- Each node's latest count of requests per rate-limited account (engine/shares.py): every node
-- lets through a share of the account's api_rate in proportion to its own demand, so the rate
-- holds for the account across the cluster. One row per (account, node), overwritten every
-- tick: small, and updated in place (fillfactor leaves room for HOT updates).
CREATE TABLE api_demand (
    account_id bigint NOT NULL,
    node_id    text NOT NULL,
    demand     int NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (account_id, node_id)
) WITH (fillfactor = 50);
