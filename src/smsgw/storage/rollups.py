"""Rollups of messages (migration 018): the SQL that keeps them in step with `messages`.

Each statement that changes messages adds one data-modifying CTE (`upsert`) fed by the rows it
changed, signed: +1 for a message that entered a group (inserted, or its new status), -1 for
one that left it (deleted, or its old status). The CTE aggregates them per rollup row and
applies each row once, in key order, so two transactions that count the same rows take their
locks in the same order. A message an UPDATE did not change (an outcome delivered twice, a DLR
for a message no longer `sent`) is not among its RETURNING rows, and counts nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import micros
from smsgw.storage.database import StorePart

BUCKET_S = 900  # migration 018's smsgw_rollup_bucket: 15 minutes from the Unix epoch

# What a source of rollup deltas gives: the group's columns, then the signed count, segments
# and price. `recipient` may be any prefix of the number of at least four characters.
_DELTA = (
    "account_id, created_at, status, express, operator, sender, recipient, messages, segments,"
    " price"
)


def upsert(source: str) -> str:
    """The INSERT ... ON CONFLICT that adds the signed rows of `source` (a SELECT giving
    `_DELTA`'s columns) to message_rollups, one row per group, in key order."""
    return f"""
    INSERT INTO message_rollups AS r (account_id, bucket, status, express, operator, sender,
                                      country, messages, segments, price)
    SELECT d.account_id, smsgw_rollup_bucket(d.created_at), d.status, d.express, d.operator,
           d.sender, smsgw_calling_code(d.recipient), sum(d.messages), sum(d.segments),
           sum(d.price)
    FROM ({source}) AS d ({_DELTA})
    GROUP BY 1, 2, 3, 4, 5, 6, 7
    HAVING sum(d.messages) <> 0 OR sum(d.segments) <> 0 OR sum(d.price) <> 0
    ORDER BY 1, 2, 3, 4, 5, 6, 7
    ON CONFLICT (account_id, bucket, status, express, operator, sender, country) DO UPDATE
    SET messages = r.messages + excluded.messages, segments = r.segments + excluded.segments,
        price = r.price + excluded.price"""


def added(rows: str, sign: int = 1) -> str:
    """The deltas of messages entering (or, with `sign` -1, leaving) their groups: `rows`
    names a relation with the message's columns (a CTE's RETURNING)."""
    return f"""
        SELECT account_id, created_at, status, express, operator, sender, recipient,
               {sign}, {sign} * segments, {sign} * price
        FROM {rows}"""


def moved(rows: str, old_status: str, old_operator: str = "operator") -> str:
    """The deltas of messages that changed group: `rows` (an UPDATE's RETURNING) has each one's
    new status and operator; its old ones are the SQL expressions `old_status` and
    `old_operator` over the same row."""
    return f"""
        SELECT account_id, created_at, {old_status}, express, {old_operator}, sender,
               recipient, -1, -segments, -price
        FROM {rows}
        UNION ALL
        {added(rows)}"""


def copied(param: str) -> str:
    """The deltas of messages a group stored by COPY, already summed per group (copy_rollup),
    as rows of the JSON in `param`: account, bucket start (Unix seconds), status, express,
    sender, the number's first four characters (its calling code is among them), the sums."""
    return f"""
        SELECT x.a, to_timestamp(x.b), x.s, x.e, NULL::text, x.f, x.p, x.n, x.g, x.c
        FROM json_to_recordset({param}::json)
             AS x(a bigint, b bigint, s text, e bool, f text, p text, n int, g int, c int)"""


class _Copied(msgspec.Struct):
    a: int
    b: int
    s: str
    e: bool
    f: str
    p: str
    n: int
    g: int
    c: int


_json = msgspec.json.Encoder()
_BUCKET_US = BUCKET_S * 1_000_000


def copy_rollup(stored: Sequence[OutboundSms]) -> str:
    """The rollup deltas of messages stored by COPY, summed here (a batch's messages mostly
    share one account, time, sender and calling code, so this is a few rows) as `copied`
    reads them. The bucket is that of the time COPY stores (`micros`)."""
    sums: dict[tuple[int, int, str, bool, str, str], list[int]] = {}
    buckets: dict[float, int] = {}
    for s in stored:
        bucket = buckets.get(s.created_at)
        if bucket is None:
            bucket = buckets[s.created_at] = micros(s.created_at) // _BUCKET_US * BUCKET_S
        key = (
            s.account_id,
            bucket,
            "queued" if s.send_at is None else "scheduled",
            s.express,
            s.sender,
            s.to[:4],
        )
        found = sums.get(key)
        if found is None:
            sums[key] = [1, s.segments, s.price]
        else:
            found[0] += 1
            found[1] += s.segments
            found[2] += s.price
    return _json.encode([_Copied(*k, *v) for k, v in sums.items()]).decode()


class Rollups(StorePart):
    """PgStore's repair of rollups."""

    async def rebuild_rollups(self, account_id: int | None = None) -> int:
        """Computes the rollups of `account_id` (None: every account) again from a scan of
        its messages (migration 018's smsgw_rollup_rebuild, which says what it locks);
        returns the rollup rows written."""
        written = await self.db.run(
            lambda c: c.fetchval("SELECT smsgw_rollup_rebuild($1)", account_id),
            name="PgStore.rebuild_rollups",
        )
        return int(written)
