"""The credit reconciliation: each account's credit lined up against its messages and ledger.

One statement, so one snapshot: the accounts, their messages and their ledger rows agree. The
simulator, the benchmarks and the tests all reconcile with this query. "Sent" is every message
the operator took: `sent`, and `delivered` or `undelivered` after a DLR (both stay captured);
"failed" every message refunded: `failed`, `expired` and `cancelled`; "pending" every message
not final, its price held: `scheduled`, `queued` and `sending`. The statement's rows (migration
015) are checked too: each row's balance less its effect is the row before's, the newest is
the balance, and a row's prices add up to its amount.
"""

from __future__ import annotations

from collections.abc import Mapping

LEDGER_SQL = """
SELECT a.id, a.balance, a.held, a.captured, a.topped_up,
       coalesce(m.n_all, 0) AS n_all, coalesce(m.n_sent, 0) AS n_sent,
       coalesce(m.n_failed, 0) AS n_failed, coalesce(m.n_pending, 0) AS n_pending,
       coalesce(m.price_all, 0) AS price_all, coalesce(m.price_sent, 0) AS price_sent,
       coalesce(m.price_failed, 0) AS price_failed,
       coalesce(m.price_pending, 0) AS price_pending,
       coalesce(l.topup, 0) AS l_topup, coalesce(l.hold, 0) AS l_hold,
       coalesce(l.capture, 0) AS l_capture, coalesce(l.release, 0) AS l_release,
       coalesce(l.hold_n, 0) AS l_hold_n, coalesce(l.capture_n, 0) AS l_capture_n,
       coalesce(l.release_n, 0) AS l_release_n,
       coalesce(s.last_balance, 0) AS l_last_balance,
       coalesce(s.chain_breaks, 0) AS l_chain_breaks,
       coalesce(s.price_breaks, 0) AS l_price_breaks
FROM accounts a
LEFT JOIN (
    SELECT account_id,
           -- The ledger's entries are messages that cost something (a free one has none).
           count(*) FILTER (WHERE price > 0) AS n_all,
           count(*) FILTER (WHERE price > 0 AND status IN ('sent', 'delivered', 'undelivered'))
               AS n_sent,
           count(*) FILTER (WHERE price > 0 AND status IN ('failed', 'expired', 'cancelled'))
               AS n_failed,
           count(*) FILTER (WHERE status IN ('scheduled', 'queued', 'sending')) AS n_pending,
           sum(price) AS price_all,
           sum(price) FILTER (WHERE status IN ('sent', 'delivered', 'undelivered'))
               AS price_sent,
           sum(price) FILTER (WHERE status IN ('failed', 'expired', 'cancelled'))
               AS price_failed,
           sum(price) FILTER (WHERE status IN ('scheduled', 'queued', 'sending')) AS price_pending
    FROM messages GROUP BY account_id
) m ON m.account_id = a.id
LEFT JOIN (
    SELECT account_id,
           sum(amount) FILTER (WHERE kind = 'topup') AS topup,
           sum(amount) FILTER (WHERE kind = 'hold') AS hold,
           sum(amount) FILTER (WHERE kind = 'capture') AS capture,
           sum(amount) FILTER (WHERE kind = 'release') AS release,
           sum(messages) FILTER (WHERE kind = 'hold') AS hold_n,
           sum(messages) FILTER (WHERE kind = 'capture') AS capture_n,
           sum(messages) FILTER (WHERE kind = 'release') AS release_n
    FROM credit_ledger GROUP BY account_id
) l ON l.account_id = a.id
LEFT JOIN (
    SELECT account_id,
           max(balance_after) FILTER (WHERE newest) AS last_balance,
           count(*) FILTER (WHERE balance_after - effect <> coalesce(previous, 0))
               AS chain_breaks,
           count(*) FILTER (WHERE priced <> amount) AS price_breaks
    FROM (
        SELECT account_id, amount, balance_after,
               CASE kind WHEN 'hold' THEN -amount WHEN 'capture' THEN 0 ELSE amount END
                   AS effect,
               lag(balance_after) OVER (PARTITION BY account_id ORDER BY id) AS previous,
               row_number() OVER (PARTITION BY account_id ORDER BY id DESC) = 1 AS newest,
               (SELECT sum(p) FROM unnest(prices) p) AS priced
        FROM credit_ledger
    ) x
    GROUP BY account_id
) s ON s.account_id = a.id
ORDER BY a.id
"""


def broken_identities(a: Mapping[str, int], *, final: bool = True) -> list[str]:
    """What one account row of LEDGER_SQL breaks. Together the identities say: every message
    is final, held once, captured once if sent, released once if failed, and the credit
    columns add up. With `final=False` messages may still be pending (their price held)."""
    identities = {
        "not final": not final or (a["n_pending"] == 0 and a["held"] == 0),
        "top-ups - captured - held != balance": (
            a["topped_up"] - a["captured"] - a["held"] == a["balance"]
        ),
        "negative": a["balance"] >= 0 and a["held"] >= 0,
        "captured != price of sent": a["captured"] == a["price_sent"],
        "held != price of pending": a["held"] == a["price_pending"],
        "ledger top-ups": a["l_topup"] == a["topped_up"],
        "ledger captures": a["l_capture"] == a["captured"],
        "ledger holds - captures - releases != held": (
            a["l_hold"] - a["l_capture"] - a["l_release"] == a["held"]
        ),
        "not one hold per message": a["l_hold_n"] == a["n_all"] and a["l_hold"] == a["price_all"],
        "not one capture per sent": a["l_capture_n"] == a["n_sent"],
        "not one release per failed": (
            a["l_release_n"] == a["n_failed"] and a["l_release"] == a["price_failed"]
        ),
        "statement's newest balance != balance": a["l_last_balance"] == a["balance"],
        "statement's balances do not follow each other": a["l_chain_breaks"] == 0,
        "ledger prices do not add up to amounts": a["l_price_breaks"] == 0,
    }
    return [name for name, holds in identities.items() if not holds]
