-- One-time codes (issue 24; storage/otp.py). A row per OTP send, written before the send's
-- accept: the code is live once its message is stored (verification joins `messages`), so an
-- accept that is refused, or a node that dies before its commit, leaves a row no one can
-- verify, and the group commit is not touched. The code itself is never stored, only an
-- HMAC-SHA256 of it keyed by the row's own random salt. The newest row of an (account,
-- number) whose message exists is the live one: a new OTP replaces the previous one.
CREATE TABLE otp_codes (
    message_id    uuid PRIMARY KEY,
    account_id    bigint NOT NULL,
    recipient     text NOT NULL,
    salt          bytea NOT NULL,
    digest        bytea NOT NULL,
    attempts      int NOT NULL DEFAULT 0,  -- wrong codes tried against it
    used          boolean NOT NULL DEFAULT false,  -- verified, invalidated, or its send failed
    expires_at    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- The message's text with the code's digits as '*': its body once it is final.
    redacted_body text NOT NULL,
    redacted      boolean NOT NULL DEFAULT false
);
-- Verification: the newest row of an (account, number), in the index's order (no sort).
CREATE INDEX otp_codes_recipient
    ON otp_codes (account_id, recipient, created_at DESC, message_id DESC);
-- The sweep's catch-up: rows whose message body may still hold the code (few at any time).
CREATE INDEX otp_codes_unredacted ON otp_codes (created_at) WHERE NOT redacted;
-- The sweep's purge of rows long expired.
CREATE INDEX otp_codes_expires ON otp_codes (expires_at);
