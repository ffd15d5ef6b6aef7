-- The account statement (issue 24): every top-up, hold, capture and release, message by message,
-- each with the balance after it (GET /v1/account/statement, storage/statement.py).
--
-- A ledger row stays one per account, kind and group commit (one per top-up): a row per message
-- would double the rows a batch writes. It now also carries the messages it covers, in the
-- order it applied them (`message_ids`, with each one's `prices`; NULL for a top-up and for
-- rows written before this migration), and `balance_after`, the account's balance once the
-- row applied, written under the account's row lock like everything in a group commit. The ids
-- of one account's rows are drawn while that lock is held, so they follow the order its credit
-- changed: the statement pages by (row id, place in the row), and an entry's balance is the
-- row's minus what the later messages of the same row moved.
ALTER TABLE credit_ledger
    ADD COLUMN balance_after bigint,
    ADD COLUMN message_ids uuid[],
    ADD COLUMN prices int[],
    ADD CONSTRAINT credit_ledger_messages CHECK (
        (message_ids IS NULL) = (prices IS NULL)
        AND cardinality(message_ids) = messages
        AND cardinality(prices) = messages
    );

-- A row's ids stay uncompressed: random past their time prefix, they do not compress, and pglz
-- spent half a microsecond a message of a batch finding that out (prices, alike in a row,
-- compress to almost nothing and stay as they are).
ALTER TABLE credit_ledger ALTER COLUMN message_ids SET STORAGE EXTERNAL;

-- The rows written before: the balance after each, summed in id order (the order above).
-- A hold lowers the balance, a release or top-up raises it, a capture leaves it. (Within one
-- of their groups a hold came before a release, so such a sum may dip below zero where the
-- group's hold used the release: no CHECK on it.)
UPDATE credit_ledger l SET balance_after = w.after
FROM (
    SELECT id, sum(CASE kind WHEN 'hold' THEN -amount WHEN 'capture' THEN 0 ELSE amount END)
                   OVER (PARTITION BY account_id ORDER BY id) AS after
    FROM credit_ledger
) w
WHERE w.id = l.id;
ALTER TABLE credit_ledger ALTER COLUMN balance_after SET NOT NULL;

-- The statement's walk, newest first; (account_id, at) served no query.
CREATE INDEX credit_ledger_statement ON credit_ledger (account_id, id);
DROP INDEX credit_ledger_account;
