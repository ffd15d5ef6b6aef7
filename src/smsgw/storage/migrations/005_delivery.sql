-- Delivery reports (DLRs) and status callbacks.
--
-- A DLR names a message by the operator and the id that operator gave it at `sent`: this index
-- finds it. It costs the outcome path one more index entry per `sent` (status updates are not
-- HOT), which is the price of a set-based DLR update (one `unnest` join per group commit)
-- instead of a scan. Not unique: an operator's ids are its own business, and a repeat must not
-- fail the group commit it rides in; the DLR update applies to `sent` rows only.
-- created_at: were an operator to reuse an id, its newest message is the one meant, found
-- without a sort.
CREATE INDEX messages_operator_message_id
    ON messages (operator, operator_message_id, created_at DESC)
    WHERE operator_message_id IS NOT NULL;

-- With DLRs, `delivered` is the status most messages end in; like `sent` in 002, it stays out
-- of the status index (a page of delivered messages is found on messages_account_recent), so
-- the rare statuses keep a small index that the common ones never enter.
DROP INDEX messages_account_status;
CREATE INDEX messages_account_status ON messages (account_id, status, created_at DESC, id DESC)
    WHERE status NOT IN ('sent', 'delivered');

-- Where status changes are POSTed: the message's own URL, else its account's.
ALTER TABLE messages ADD COLUMN callback_url text;
ALTER TABLE accounts ADD COLUMN callback_url text;
-- The HMAC key of the account's callbacks. It has to be kept as it is (a receiver verifies
-- with the same key), so it is a secret at rest like a password in a config file; it is shown
-- to the account once, at creation or rotation. Existing accounts get one from PostgreSQL's
-- strong random source (gen_random_uuid: 122 random bits each, two of them).
ALTER TABLE accounts ADD COLUMN signing_secret text NOT NULL
    DEFAULT 'whsec_' || replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');

-- DLRs that named no `sent` message of that operator: kept, answered `unknown`, and applied
-- later if the message's `sent` arrives (a DLR can overtake the operator's own answer).
-- `message_id` is set when a later reconciliation applied it.
CREATE TABLE dlr_unmatched (
    id                  bigserial PRIMARY KEY,
    operator            text NOT NULL,
    operator_message_id text NOT NULL,
    status              text NOT NULL CHECK (status IN ('delivered', 'undelivered')),
    error               text,
    received_at         timestamptz NOT NULL DEFAULT now(),
    message_id          uuid,
    resolved_at         timestamptz
);
CREATE INDEX dlr_unmatched_open ON dlr_unmatched (received_at)
    WHERE message_id IS NULL;
CREATE INDEX dlr_unmatched_operator_id ON dlr_unmatched (operator, operator_message_id);

-- The status callbacks still to be delivered, written in the same transaction as the status
-- change (so a crash loses none). A row is deleted once the receiver answered 2xx; one that
-- could not be delivered within its lifetime keeps `failed_at` and its last error. Per message,
-- only the oldest row not yet delivered may be sent (id order = the order of the changes).
CREATE TABLE callback_outbox (
    id                  bigserial PRIMARY KEY,
    message_id          uuid NOT NULL,
    account_id          bigint NOT NULL,
    url                 text NOT NULL,
    status              text NOT NULL,
    reason              text,
    client_ref          text,
    at                  timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    attempts            int NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    last_error          text,
    failed_at           timestamptz
);
CREATE INDEX callback_outbox_due ON callback_outbox (next_attempt_at) WHERE failed_at IS NULL;
CREATE INDEX callback_outbox_message ON callback_outbox (message_id, id) WHERE failed_at IS NULL;
