-- Per-account scheduling and rate settings (issue 4). NULL means the node's default
-- (EngineConfig): most accounts never set any, and a default changed in the configuration
-- applies to them at once.
ALTER TABLE accounts
    ADD COLUMN send_rate double precision CHECK (send_rate > 0),
    ADD COLUMN express_deadline_ms int CHECK (express_deadline_ms BETWEEN 100 AND 600000),
    ADD COLUMN recipient_limit_per_hour int CHECK (recipient_limit_per_hour >= 1),
    ADD COLUMN api_rate double precision CHECK (api_rate > 0);

-- No new index on messages: the Scheduler pages an account's queued bulk messages back in
-- (created_at, id) order after a cursor, which messages_account_status (account_id, status,
-- created_at DESC, id DESC) already serves as a backward range scan; another index would tax
-- every insert and status update for it.
