-- Rollups of messages (issue 27; storage/rollups.py): what GET /v1/reports/summary reads
-- instead of scanning an account's messages. One row per account, 15-minute bucket of the
-- messages' `created_at`, status, express or not, operator, sender and country: how many
-- messages are in that group now, their segments and their prices. Every statement that
-- inserts messages, deletes them or changes their status or operator moves its rows' counts
-- here in the same statement (or the same transaction), aggregated per group: a message that
-- moves from `queued` to `sent` takes one from the first row and adds one to the second.
--
-- A bucket is 15 minutes because every UTC offset in use is a multiple of 15 minutes (Iran's
-- +03:30, Nepal's +05:45): a day in any zone is an exact sum of whole buckets.
--
-- `operator` is NULL until a message has one (a unique index that treats NULLs as equal, so
-- ON CONFLICT finds that row). `country` is the recipient's country calling code, the digits
-- after the '+' ("98" for Iran, "1" for all of North America): exact from the number itself,
-- where a two-letter country would need the numbering plans' area codes.
--
-- The counters are not indexed, so updating them is a HOT update when the page has room: a
-- row is updated by every group that counts a message of its group.
CREATE TABLE message_rollups (
    account_id bigint NOT NULL,
    bucket     timestamptz NOT NULL,
    status     text NOT NULL,
    express    boolean NOT NULL,
    operator   text,
    sender     text NOT NULL,
    country    text NOT NULL,
    messages   bigint NOT NULL,
    segments   bigint NOT NULL,
    price      bigint NOT NULL,
    CONSTRAINT message_rollups_key
        UNIQUE NULLS NOT DISTINCT (account_id, bucket, status, express, operator, sender, country)
) WITH (fillfactor = 50);

-- The bucket of a time: the 15 minutes from the Unix epoch that hold it.
CREATE FUNCTION smsgw_rollup_bucket(at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN date_bin('15 minutes', at, TIMESTAMPTZ '1970-01-01 00:00:00+00');

-- The country calling code of an E.164 number ('+' and digits), or of its first four
-- characters. Calling codes are prefix-free: the one-digit codes are 1 and 7, the two-digit
-- ones are listed (those of the `phonenumbers` metadata, the numbers the gateway accepts), and
-- every other code has three digits.
CREATE FUNCTION smsgw_calling_code(number text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN substr(number, 2, 1) IN ('1', '7') THEN substr(number, 2, 1)
    WHEN substr(number, 2, 2) IN (
        '20', '27', '30', '31', '32', '33', '34', '36', '39', '40', '41', '43', '44', '45',
        '46', '47', '48', '49', '51', '52', '53', '54', '55', '56', '57', '58', '60', '61',
        '62', '63', '64', '65', '66', '81', '82', '84', '86', '90', '91', '92', '93', '94',
        '95', '98') THEN substr(number, 2, 2)
    ELSE substr(number, 2, 3)
END;

-- An account's rollups (all accounts' with NULL) computed again from a scan of its messages:
-- the tests' oracle, the fill after a bulk load that bypassed the group commit (the reports
-- benchmark), and a repair. The EXCLUSIVE lock waits for every transaction that already
-- changed rollups and holds off the others until this one commits; each statement after it
-- reads a snapshot taken once it is held. So every message committed before counts in the
-- scan, and every later change adds to the rebuilt rows: exact under load, but while it runs
-- no group commit that counts a message can finish. Returns the rows written.
CREATE FUNCTION smsgw_rollup_rebuild(only_account bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
BEGIN
    LOCK TABLE message_rollups IN EXCLUSIVE MODE;
    IF only_account IS NULL THEN
        DELETE FROM message_rollups;
        INSERT INTO message_rollups (account_id, bucket, status, express, operator, sender,
                                     country, messages, segments, price)
        SELECT account_id, smsgw_rollup_bucket(created_at), status, express, operator, sender,
               smsgw_calling_code(recipient), count(*), sum(segments), sum(price)
        FROM messages
        GROUP BY 1, 2, 3, 4, 5, 6, 7;
    ELSE
        DELETE FROM message_rollups WHERE account_id = only_account;
        INSERT INTO message_rollups (account_id, bucket, status, express, operator, sender,
                                     country, messages, segments, price)
        SELECT account_id, smsgw_rollup_bucket(created_at), status, express, operator, sender,
               smsgw_calling_code(recipient), count(*), sum(segments), sum(price)
        FROM messages WHERE account_id = only_account
        GROUP BY 1, 2, 3, 4, 5, 6, 7;
    END IF;
    GET DIAGNOSTICS written = ROW_COUNT;
    RETURN written;
END
$$;

-- The messages stored before this migration.
SELECT smsgw_rollup_rebuild(NULL);
