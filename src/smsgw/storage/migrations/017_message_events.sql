-- A message's history (issue 27; GET /v1/messages/{id}/events) and when it was sent and
-- delivered. Nullable columns without a default: a catalog change only, no rewrite of
-- `messages`. The statements that move a message to `sent` and to `delivered` set them.
ALTER TABLE messages ADD COLUMN sent_at timestamptz, ADD COLUMN delivered_at timestamptz;

-- One row per thing that happened to a message after its accept: each attempt at an
-- operator, the final outcome (sent, failed, expired, cancelled), the receipt, each callback
-- delivery. The accept (and a schedule) is not stored: the read makes it from the message
-- row, so intake writes nothing here. Rows are written by the statements that make the
-- change, from what their UPDATE returned (a change made twice writes one row).
--
-- Ordered by time, then `seq`, the event's rank among events at the same instant (an attempt
-- 1, an outcome 2, a receipt 3, a callback 4): an attempt and the outcome it decided share
-- their time. The key starts with message_id so the table can be partitioned like `messages`
-- (by message_id, UUIDv7 day bounds); no foreign key (a probe per row, as for `messages`).
-- A column is NULL where the event has no such field; the API shows the others.
CREATE TABLE message_events (
    message_id uuid NOT NULL,
    at timestamptz NOT NULL,
    seq smallint NOT NULL,
    type text NOT NULL,             -- attempt, sent, failed, expired, cancelled, receipt, callback
    attempt smallint,               -- attempt: its number; callback: the delivery's attempt
    operator text,                  -- attempt, sent
    result text,                    -- attempt: sent, temporary or permanent
    operator_message_id text,       -- sent
    status text,                    -- receipt: delivered or undelivered; callback: its status
    reason text,                    -- attempt, failed, expired, receipt (the operator's error)
    delivery_id bigint,             -- callback: the callback's delivery_id
    http_status smallint,           -- callback: the receiver's answer
    error text,                     -- callback: why it was not delivered
    PRIMARY KEY (message_id, at, seq)
);

-- The callback attempt whose retry was last written: a settle done twice (its first commit's
-- answer lost) changes nothing the second time, and writes no second history row.
ALTER TABLE callback_outbox ADD COLUMN settled_attempts int;
