"""The SQL of report pages: one bound on each side of (created_at, id), the tightest one, each
with an id bound for the day partitions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from smsgw.engine.ports import MessageQuery
from smsgw.storage.reads import messages_sql
from smsgw.storage.rows import ID_SLACK, id_floor

T0 = datetime(2025, 1, 1, tzinfo=UTC)
ID = "0194199d-0000-7000-8000-000000000001"


def bounds(sql: str) -> list[str]:
    where = sql.split(" WHERE ", 1)[1].split(" ORDER BY ", 1)[0]
    return [c for c in where.split(" AND ") if "created_at" in c]


@pytest.mark.parametrize("ascending", [True, False])
def test_a_range_alone_gives_two_time_bounds(ascending: bool) -> None:
    query = MessageQuery(
        limit=10, created_from=T0, created_to=T0 + timedelta(days=1), ascending=ascending
    )
    sql, args = messages_sql(1, query)
    assert bounds(sql) == ["created_at >= $2", "created_at < $4"]
    assert args[1:5] == [
        T0,
        id_floor(T0, -ID_SLACK),
        T0 + timedelta(days=1),
        id_floor(T0 + timedelta(days=1), ID_SLACK),
    ]


def test_each_bound_bounds_the_ids_too_for_the_day_partitions() -> None:
    after = (T0 + timedelta(hours=5), ID)
    sql, args = messages_sql(
        1, MessageQuery(limit=10, after=after, created_from=T0, created_to=T0 + timedelta(days=1))
    )
    where = sql.split(" WHERE ", 1)[1].split(" ORDER BY ", 1)[0].split(" AND ")
    assert [c for c in where if c.startswith("id ")] == ["id >= $3", "id < $6"]
    assert args[2] == id_floor(T0, -ID_SLACK)
    assert args[5] == id_floor(after[0], ID_SLACK)
    # Without an upper bound, the ids stop at now (the days ahead are not read).
    sql, args = messages_sql(1, MessageQuery(limit=10, created_from=T0))
    assert "id < $4" in sql and args[3] > id_floor(datetime.now(UTC))
    # The least UUIDv7 of the millisecond: its 48 bits of time, the rest zero.
    assert id_floor(T0) == uuid.UUID(f"{int(T0.timestamp() * 1000):012x}" + "0" * 20)


def test_a_cursor_inside_the_range_replaces_the_bound_on_its_side() -> None:
    after = (T0 + timedelta(hours=5), ID)
    range_ = {"created_from": T0, "created_to": T0 + timedelta(days=1)}
    sql, args = messages_sql(1, MessageQuery(limit=10, after=after, ascending=True, **range_))
    assert bounds(sql) == ["(created_at, id) > ($2, $3::uuid)", "created_at < $5"]
    assert [args[1], args[2], args[4]] == [after[0], ID, T0 + timedelta(days=1)]
    sql, _ = messages_sql(1, MessageQuery(limit=10, after=after, **range_))
    assert bounds(sql) == ["created_at >= $2", "(created_at, id) < ($4, $5::uuid)"]


def test_a_cursor_outside_the_range_leaves_the_range_bound() -> None:
    # A newest-first cursor later than created_to (say, from a page with other filters).
    late = (T0 + timedelta(days=3), ID)
    sql, args = messages_sql(
        1, MessageQuery(limit=10, after=late, created_to=T0 + timedelta(days=1))
    )
    assert bounds(sql) == ["created_at < $2"] and args[1] == T0 + timedelta(days=1)


def test_a_page_end_bounds_the_other_side() -> None:
    after, through = (T0, ID), (T0 + timedelta(minutes=1), ID)
    sql, _ = messages_sql(
        1,
        MessageQuery(limit=10, after=after, ascending=True, created_to=T0 + timedelta(days=1)),
        through=through,
    )
    assert bounds(sql) == [
        "(created_at, id) > ($2, $3::uuid)",
        "(created_at, id) <= ($5, $6::uuid)",
    ]


def test_order_names_the_table_columns() -> None:
    sql, _ = messages_sql(1, MessageQuery(limit=10))
    assert sql.endswith("ORDER BY messages.created_at DESC, messages.id DESC LIMIT $3")
