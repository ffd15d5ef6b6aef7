-- Accounts, messages and the credit ledger.
-- A balance is what the account may still hold; the CHECKs make the ledger identity a property
-- PostgreSQL itself enforces on every row update: topped_up - captured - held = balance.
CREATE TABLE accounts (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    balance     bigint NOT NULL CHECK (balance >= 0),
    held        bigint NOT NULL DEFAULT 0 CHECK (held >= 0),
    captured    bigint NOT NULL DEFAULT 0 CHECK (captured >= 0),
    topped_up   bigint NOT NULL DEFAULT 0 CHECK (topped_up >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (topped_up - captured - held = balance)
);

-- No foreign key to accounts: the accept transaction has locked the account row already, and a
-- per-row FK probe would cost the batch insert path for nothing.
CREATE TABLE messages (
    id                  uuid PRIMARY KEY,
    account_id          bigint NOT NULL,
    recipient           text NOT NULL,
    sender              text NOT NULL,
    body                text NOT NULL,
    segments            int NOT NULL,
    price               int NOT NULL,
    express             boolean NOT NULL,
    client_ref          text,
    status              text NOT NULL,
    reason              text,
    attempts            int NOT NULL DEFAULT 0,
    operator            text,
    operator_message_id text,
    deadline            timestamptz,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
CREATE INDEX messages_account_created ON messages (account_id, created_at);
-- Recovery reads only the non-final rows.
CREATE INDEX messages_pending ON messages (created_at) WHERE status IN ('queued', 'sending');

-- One row per account, kind and group commit: `messages` counts what the amount covers.
CREATE TABLE credit_ledger (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    kind        text NOT NULL CHECK (kind IN ('topup', 'hold', 'capture', 'release')),
    amount      bigint NOT NULL CHECK (amount > 0),
    messages    int NOT NULL DEFAULT 0,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_ledger_account ON credit_ledger (account_id, at);
