-- Every node learns of a changed API key or setting within a notification's latency, rather
-- than when its key cache expires (docs/architecture.md, "One gateway, however many nodes").
-- A trigger, so a change made by any node, or by hand in psql, reaches them all. It fires
-- only when a key or a setting changes: the group commit's balance updates never notify.
-- The channel is smsgw.storage.cluster.account_channel(schema): one per schema, as the
-- hand-off channel is, so nodes of other schemas (tests) do not hear each other.
CREATE FUNCTION smsgw_account_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'smsgw_account_'
            || left(encode(sha256(convert_to(TG_TABLE_SCHEMA, 'UTF8')), 'hex'), 16),
        json_build_object(
            'id', NEW.id,
            'send_rate', NEW.send_rate,
            'express_deadline_ms', NEW.express_deadline_ms,
            'recipient_limit_per_hour', NEW.recipient_limit_per_hour,
            'api_rate', NEW.api_rate
        )::text
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER accounts_changed
    AFTER UPDATE OF key_hash, send_rate, express_deadline_ms, recipient_limit_per_hour, api_rate
    ON accounts
    FOR EACH ROW
    WHEN (OLD.key_hash IS DISTINCT FROM NEW.key_hash
          OR OLD.send_rate IS DISTINCT FROM NEW.send_rate
          OR OLD.express_deadline_ms IS DISTINCT FROM NEW.express_deadline_ms
          OR OLD.recipient_limit_per_hour IS DISTINCT FROM NEW.recipient_limit_per_hour
          OR OLD.api_rate IS DISTINCT FROM NEW.api_rate)
    EXECUTE FUNCTION smsgw_account_changed();
