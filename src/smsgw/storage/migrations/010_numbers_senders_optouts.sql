-- Numbers as people type them, sender IDs, opt-outs (issue 24).

-- Per-account settings, cached by every node with the others (AccountSettings) and NOTIFYed on
-- change by the accounts trigger below, so the accept path reads none of them.
-- default_country: ISO 3166 alpha-2 whose national forms `to` takes; NULL: the node's
-- (`serve --default-country`, IR unless set).
-- senders: the senders the admin allowed the account; NULL: any valid sender (as before).
-- default_sender: the sender of a send without one; NULL: "smsgw".
ALTER TABLE accounts
    ADD COLUMN default_country text CHECK (default_country ~ '^[A-Z]{2}$'),
    ADD COLUMN senders text[] CHECK (cardinality(senders) BETWEEN 1 AND 100),
    ADD COLUMN default_sender text
        CHECK (default_sender IS NULL OR senders IS NULL OR default_sender = ANY (senders));

-- Numbers (E.164) that asked this account to stop sending to them: its bulk messages to them
-- are refused (`opted_out`) in the group commit, an index probe per number of the group.
-- No foreign key, as for messages: the rows are only ever written by the account's own key.
CREATE TABLE opt_outs (
    account_id bigint NOT NULL,
    number     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, number)
);

-- Numbers no account may send to, express included (the gateway's admin keeps it).
CREATE TABLE blocklist (
    number     text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The accounts trigger of migration 006, with the new settings in its payload and among the
-- columns whose change it notifies: every node learns them within a notification's latency.
CREATE OR REPLACE FUNCTION smsgw_account_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'smsgw_account_'
            || left(encode(sha256(convert_to(TG_TABLE_SCHEMA, 'UTF8')), 'hex'), 16),
        json_build_object(
            'id', NEW.id,
            'send_rate', NEW.send_rate,
            'express_deadline_ms', NEW.express_deadline_ms,
            'recipient_limit_per_hour', NEW.recipient_limit_per_hour,
            'api_rate', NEW.api_rate,
            'default_country', NEW.default_country,
            'senders', NEW.senders,
            'default_sender', NEW.default_sender
        )::text
    );
    RETURN NULL;
END
$$;

DROP TRIGGER accounts_changed ON accounts;
CREATE TRIGGER accounts_changed
    AFTER UPDATE OF key_hash, send_rate, express_deadline_ms, recipient_limit_per_hour, api_rate,
                    default_country, senders, default_sender
    ON accounts
    FOR EACH ROW
    WHEN (OLD.key_hash IS DISTINCT FROM NEW.key_hash
          OR OLD.send_rate IS DISTINCT FROM NEW.send_rate
          OR OLD.express_deadline_ms IS DISTINCT FROM NEW.express_deadline_ms
          OR OLD.recipient_limit_per_hour IS DISTINCT FROM NEW.recipient_limit_per_hour
          OR OLD.api_rate IS DISTINCT FROM NEW.api_rate
          OR OLD.default_country IS DISTINCT FROM NEW.default_country
          OR OLD.senders IS DISTINCT FROM NEW.senders
          OR OLD.default_sender IS DISTINCT FROM NEW.default_sender)
    EXECUTE FUNCTION smsgw_account_changed();
