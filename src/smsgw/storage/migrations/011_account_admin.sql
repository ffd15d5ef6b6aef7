-- Account administration (issue 24): an account the admin suspended sends nothing (its sends
-- get 403, its queued messages wait unsent and uncharged until it resumes), and an account's
-- own prices (NULL: the node's `--price-per-segment` and `--express-surcharge`).
ALTER TABLE accounts
    ADD COLUMN suspended_at timestamptz,
    ADD COLUMN price_per_segment int CHECK (price_per_segment >= 0),
    ADD COLUMN express_surcharge int CHECK (express_surcharge >= 0);

-- The accounts trigger (migrations 006, 010) with the suspension and the prices in its payload
-- and among the columns whose change it notifies: every node learns them within a
-- notification's latency (a suspension stops sends and dispatch everywhere within a second).
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
            'default_sender', NEW.default_sender,
            'suspended', NEW.suspended_at IS NOT NULL,
            'price_per_segment', NEW.price_per_segment,
            'express_surcharge', NEW.express_surcharge
        )::text
    );
    RETURN NULL;
END
$$;

DROP TRIGGER accounts_changed ON accounts;
CREATE TRIGGER accounts_changed
    AFTER UPDATE OF key_hash, send_rate, express_deadline_ms, recipient_limit_per_hour, api_rate,
                    default_country, senders, default_sender, suspended_at, price_per_segment,
                    express_surcharge
    ON accounts
    FOR EACH ROW
    WHEN (OLD.key_hash IS DISTINCT FROM NEW.key_hash
          OR OLD.send_rate IS DISTINCT FROM NEW.send_rate
          OR OLD.express_deadline_ms IS DISTINCT FROM NEW.express_deadline_ms
          OR OLD.recipient_limit_per_hour IS DISTINCT FROM NEW.recipient_limit_per_hour
          OR OLD.api_rate IS DISTINCT FROM NEW.api_rate
          OR OLD.default_country IS DISTINCT FROM NEW.default_country
          OR OLD.senders IS DISTINCT FROM NEW.senders
          OR OLD.default_sender IS DISTINCT FROM NEW.default_sender
          OR (OLD.suspended_at IS NULL) <> (NEW.suspended_at IS NULL)
          OR OLD.price_per_segment IS DISTINCT FROM NEW.price_per_segment
          OR OLD.express_surcharge IS DISTINCT FROM NEW.express_surcharge)
    EXECUTE FUNCTION smsgw_account_changed();
