-- The group commit's one statement (storage/commit_sql.py, ONE_STATEMENT) locks its accounts
-- through this function rather than a FOR UPDATE of its own.
--
-- Why: a row lock that finds the row changed by a transaction that committed after the
-- statement's snapshot re-checks it (PostgreSQL's EvalPlanQual), and in PostgreSQL 18.6 such
-- a re-check inside a statement leaves that statement's run-time partition pruning broken:
-- the next Append it prunes by a join's value crashed the server (SIGSEGV in
-- perform_pruning_base_step, under ExecAppend, in cores taken from two nodes committing
-- groups of the same accounts). Here the lock is a query of its own, with its own executor
-- state, and the statement that calls it has none of its rows to re-check. The function's
-- query takes a new snapshot (a volatile function's query does), so it returns the rows as
-- they are once locked.
CREATE FUNCTION smsgw_lock_accounts(ids bigint[], default_per_hour int)
RETURNS TABLE (id bigint, balance bigint, callback_url text, version xid, per_hour int)
LANGUAGE plpgsql VOLATILE ROWS 10 AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT a.id, a.balance, a.callback_url, a.xmin, coalesce(a.recipient_limit_per_hour, $2)
    FROM accounts a
    WHERE a.id = ANY ($1)
    ORDER BY a.id
    FOR UPDATE;
END
$$;
