"""The message row as storage reads it back: "not final", dispatch's columns, exact times.

Shared by the group commit, the backlog's reads, the message reads and the cluster's loads.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import asyncpg

from smsgw.engine.messages import OutboundSms

# A message not final yet, tested on a row already found otherwise: `status IN ('queued',
# 'sending')` with values the planner cannot read while it plans (each one an InitPlan). From
# the literal list it would prove the predicate of the partial index messages_pending (and of
# messages_account_status) and could choose to scan that index instead of probing the primary
# key; it prices that scan by the last ANALYZE, and one taken while few messages were pending
# prices a scan of every pending message as a scan of none (issue 29: an outcome UPDATE that
# walked all pending messages once per outcome). Written so, messages are reached by their
# primary key whatever the statistics say.
NOT_FINAL = "IN ((SELECT 'queued'), (SELECT 'sending'))"

# The shard a message is dispatched under (ports.dispatch_shard): the one it was stamped with,
# else its account's. With the account, it names the message's stream (ports.stream_key).
STREAM_SHARD = "coalesce(dispatch_shard, shard_of(account_id))"

# What dispatch needs of a stored message (pending_sms makes it an OutboundSms).
PENDING_COLUMNS = """
messages.id::text, account_id, recipient, sender, body, segments, price, express, client_ref,
extract(epoch FROM created_at)::float8 AS created_at,
extract(epoch FROM deadline)::float8 AS deadline, attempts, callback_url, dispatch_shard,
validity_s, extract(epoch FROM send_at)::float8 AS send_at"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)


def at_micros(us: int) -> datetime:
    """The time `us` microseconds after the Unix epoch, exact (asyncpg sends whole
    microseconds, as PostgreSQL stores them)."""
    return _EPOCH + us * _ONE_MICROSECOND


def micros_of(at: datetime) -> int:
    """The microseconds from the Unix epoch to `at`, exact (the inverse of `at_micros`)."""
    return (at - _EPOCH) // _ONE_MICROSECOND


# The least and the greatest uuid: a keyset cursor before every message at its time; an id
# range of every day.
MIN_UUID = uuid.UUID(int=0)
MAX_UUID = uuid.UUID(int=2**128 - 1)


def pending_sms(r: asyncpg.Record) -> OutboundSms:
    """A row of PENDING_COLUMNS as the message dispatch sends."""
    return OutboundSms(
        id=r["id"],
        account_id=r["account_id"],
        to=r["recipient"],
        sender=r["sender"],
        text=r["body"],
        segments=r["segments"],
        price=r["price"],
        express=r["express"],
        client_ref=r["client_ref"],
        created_at=r["created_at"],
        deadline=r["deadline"],
        attempts=r["attempts"],
        callback_url=r["callback_url"],
        shard=r["dispatch_shard"],
        validity=r["validity_s"],
        send_at=r["send_at"],
    )


# A message's id (a UUIDv7: its first 48 bits are the Unix millisecond it was made) is made
# just after its created_at, by the same node's clock, within the request that accepts it. So
# the messages made in a time range have ids within that range widened by ID_SLACK, a bound a
# read states for the day partitions (migration 019) to be pruned to the range's days: it
# allows for a request that took long to make its ids, and for rounding at the millisecond.
ID_SLACK = timedelta(hours=1)
_ID_MAX_MS = (1 << 48) - 1


DAY_S = 86_400


def id_floor_s(at: float) -> uuid.UUID:
    """The least UUIDv7 of the millisecond `at` (Unix seconds) falls in."""
    return uuid.UUID(int=min(max(int(at * 1000), 0), _ID_MAX_MS) << 80)


# A span of UTC days, each the number of days since 1970-01-01: the first and the last.
Days = tuple[int, int]


def days_of(first_s: float, last_s: float) -> Days:
    """The UTC days from the one of `first_s` to the one of `last_s` (Unix seconds)."""
    return int(first_s // DAY_S), int(last_s // DAY_S)


def day_number(day: date) -> int:
    """`day` as the number of days since 1970-01-01 (`Days`)."""
    return (day - _EPOCH.date()).days


def made_at_s(message_id: str) -> float:
    """When a message id (a UUIDv7 as text) was made, in Unix seconds: its first 48 bits are
    the millisecond."""
    return int(message_id[:8] + message_id[9:13], 16) / 1000


def ids_days(ids: Iterable[str]) -> Days | None:
    """The days the messages of these ids were made in (their partitions); None: no id."""
    times = [made_at_s(i) for i in ids]
    return days_of(min(times), max(times)) if times else None


def within_days(column: str, days: Days | None) -> str:
    """`column` (a UUIDv7, a day-partitioned table's key) bounded to the day partitions of
    `days` by literals; None: to no day, a bound nothing meets. A statement's text so names its
    days, and PostgreSQL prunes the other partitions as it plans, cached plans too: bounds
    given as parameters leave a cached (generic) plan holding every day partition, each one
    planned, its scan started at every execution and its statistics' changes replanning the
    whole statement (with the 90 days of the default retention: about 30 ms a plan of the
    group commit's one_statement). A statement made so is one text a span of days: a few a
    day, each prepared once per connection. No day is an empty range, not FALSE: PostgreSQL
    prunes by a range, but plans every partition under a constant false (16 ms a plan of
    one_statement with 98 day partitions)."""
    if days is None:
        low = high = MIN_UUID
    else:
        low, high = id_floor_s(days[0] * DAY_S), id_floor_s((days[1] + 1) * DAY_S)
    return f"{column} >= '{low}'::uuid AND {column} < '{high}'::uuid"


def within_days_or_all(column: str, days: Days | None) -> str:
    """`within_days`, but None is every day (no bound), for a statement that may also be
    asked to read them all."""
    return "TRUE" if days is None else within_days(column, days)


def id_floor(at: datetime, shift: timedelta = timedelta(0)) -> uuid.UUID:
    """The least UUIDv7 of the millisecond `at + shift` falls in (SQL's uuid7_floor, migration
    019); a time past either end of datetime's range is taken as that end."""
    with contextlib.suppress(OverflowError):  # past an end: the clamp below takes that end
        at += shift
    ms = min(max((at - _EPOCH) // timedelta(milliseconds=1), 0), _ID_MAX_MS)
    return uuid.UUID(int=ms << 80)
