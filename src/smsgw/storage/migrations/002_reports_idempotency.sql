-- Reports (listing, summaries, exports), client_ref uniqueness and idempotency keys.
--
-- Every report reads one account's messages in (created_at, id) order. This index serves the
-- list pages (a keyset range scan, however deep the page), exports (the same scan, ascending)
-- and, through INCLUDE, the summaries as index-only scans. It supersedes
-- messages_account_created: one index less to write on every insert and status update.
CREATE INDEX messages_account_recent ON messages (account_id, created_at DESC, id DESC)
    INCLUDE (status, segments, price);
DROP INDEX messages_account_created;

-- Tells the planner how many UTC days a range holds, so a summary by day aggregates in a small
-- hash table instead of sorting every row of the range (it would guess one day per row).
CREATE STATISTICS messages_created_day ON ((created_at AT TIME ZONE 'UTC')::date) FROM messages;

-- Filtered pages. Without these, a filter that matches few rows (a rare status, one
-- recipient) walks the whole account to fill a page. Every index costs the write path: status
-- updates are not HOT (messages_pending's predicate reads status), so each index gets an entry
-- per insert and per update. Measured with COPY and 2,000-row status updates on 2 cores
-- (medians of 4 rounds): 001's indexes alone 116k inserts/s and 63k updates/s; with these,
-- 66k and 33k. Nearly all of that is the recipient index, whose insertion points are random:
-- without it, 117k and 47k. It is kept because a lookup by recipient must not walk an
-- account's whole history; drop it if the write path needs the room more.
--
-- The status index leaves out `sent`, the status nearly every message ends in: a page of sent
-- messages is found on messages_account_recent at once, and the rare statuses (queued, failed)
-- get an index a twentieth of the size that `sent` rows never enter. Queries name the status as
-- a literal so the planner can prove the predicate. When delivery reports add statuses, the
-- common final ones belong in the predicate too.
CREATE INDEX messages_account_status ON messages (account_id, status, created_at DESC, id DESC)
    WHERE status <> 'sent';
CREATE INDEX messages_account_recipient
    ON messages (account_id, recipient, created_at DESC, id DESC);
CREATE INDEX messages_account_express ON messages (account_id, created_at DESC, id DESC)
    WHERE express;

-- client_ref is unique per account: the index is the arbiter, exact across requests and
-- nodes; it also serves `?client_ref=` lookups.
CREATE UNIQUE INDEX messages_account_client_ref ON messages (account_id, client_ref)
    WHERE client_ref IS NOT NULL;

-- Idempotency-Key records (Stripe's semantics), kept 24 hours. `status` NULL: the first
-- request with this key is still running. No foreign key to accounts: rows are written only
-- for an authenticated account and die with their ttl.
CREATE TABLE idempotency_keys (
    account_id   bigint NOT NULL,
    key          text NOT NULL,
    request_hash bytea NOT NULL,
    status       int,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
