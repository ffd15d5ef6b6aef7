"""Message ids: RFC 9562 version 7, time-ordered, unique."""

from __future__ import annotations

import time
import uuid

from smsgw.http.context import uuid7


def test_ids_are_version_7_uuids_carrying_the_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(10_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower case, dashes in place
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after


def test_ids_of_later_milliseconds_sort_after() -> None:
    first = uuid7()
    time.sleep(0.002)
    assert uuid7() > first
