"""The CallbackSender in virtual time, against an in-memory outbox with the store's rules."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import trio

from smsgw.engine.callbacks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    CallbackPolicy,
    CallbackSender,
    verify,
)
from smsgw.engine.netguard import DestinationRefused
from smsgw.engine.ports import CallbackJob

SECRET = "whsec_test"


@dataclass
class Row:
    job: CallbackJob
    next_at: float = 0.0
    failed: str | None = None


class MemoryOutbox:
    """`CallbackStore` in memory: due rows, the oldest undelivered one of each message only,
    leased while claimed; as storage/delivery.py does in SQL."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self.next_id = 1

    def add(self, message_id: str, status: str, url: str) -> int:
        now = trio.current_time()
        row_id = self.next_id
        self.next_id += 1
        job = CallbackJob(
            id=row_id,
            message_id=message_id,
            account_id=1,
            url=url,
            status=status,
            reason=None,
            client_ref=None,
            at=now,
            created_at=now,
            attempts=0,
            secret=SECRET,
        )
        self.rows[row_id] = Row(job, next_at=now)
        return row_id

    async def claim_callbacks(self, limit: int, lease_s: float) -> list[CallbackJob]:
        now = trio.current_time()
        heads: dict[str, int] = {}
        for row_id in sorted(self.rows):
            row = self.rows[row_id]
            if row.failed is None:
                heads.setdefault(row.job.message_id, row_id)
        claimed = []
        for row_id in sorted(heads.values()):
            row = self.rows[row_id]
            if row.next_at <= now and len(claimed) < limit:
                row.job = msgspec.structs.replace(row.job, attempts=row.job.attempts + 1)
                row.next_at = now + lease_s
                claimed.append(row.job)
        return claimed

    async def settle_callbacks(
        self,
        delivered: Sequence[tuple[int, int]],
        retry: Sequence[tuple[int, float, str]],
        failed: Sequence[tuple[int, str]],
    ) -> None:
        now = trio.current_time()
        for row_id, _ in delivered:
            del self.rows[row_id]
        for row_id, delay, _ in retry:
            self.rows[row_id].next_at = now + delay
        for row_id, error in failed:
            self.rows[row_id].failed = error

    async def reconcile_deliveries(self, max_age_s: float, limit: int) -> int:
        return 0

    async def purge_delivery_records(self, older_than_s: float, limit: int) -> int:
        return 0


class Poster:
    """Refuses `fail[url]` attempts at each URL (None: every attempt), records them all."""

    def __init__(self, fail: Mapping[str, int | None]) -> None:
        self.fail = dict(fail)
        self.tries: dict[str, int] = {}
        self.log: list[tuple[float, str, bytes, dict[str, str], int]] = []

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        await trio.sleep(0.01)
        self.tries[url] = self.tries.get(url, 0) + 1
        limit = self.fail.get(url, 0)
        status = 500 if limit is None or self.tries[url] <= limit else 200
        self.log.append((trio.current_time(), url, body, dict(headers), status))
        return status


POLICY = CallbackPolicy(
    lifetime_s=600.0, backoff_base_s=1.0, backoff_cap_s=60.0, poll_s=0.1, concurrency=4
)


async def test_callbacks_retry_in_order_and_give_up_after_their_lifetime(
    autojump_clock: trio.abc.Clock,
) -> None:
    outbox = MemoryOutbox()
    poster = Poster({"http://127.0.0.1/flaky": 3, "http://127.0.0.1/down": None})
    sender = CallbackSender(outbox, poster, POLICY, clock=trio.current_time, seed=1)
    outbox.add("m1", "sent", "http://127.0.0.1/flaky")
    outbox.add("m1", "delivered", "http://127.0.0.1/flaky")
    outbox.add("m2", "sent", "http://127.0.0.1/down")
    outbox.add("m3", "sent", "http://127.0.0.1/ok")
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await trio.sleep(3_600)
        nursery.cancel_scope.cancel()

    by_message: dict[str, list[tuple[str, int]]] = {}
    for _, _, body, headers, status in poster.log:
        payload = msgspec.json.decode(body)
        by_message.setdefault(payload["message_id"], []).append((payload["status"], status))
        assert verify(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
        assert headers[DELIVERY_HEADER] == str(payload["delivery_id"])
    # m1: `sent` refused 3 times, then taken; only then `delivered`, taken at once.
    assert by_message["m1"] == [("sent", 500)] * 3 + [("sent", 200), ("delivered", 200)]
    assert by_message["m3"] == [("sent", 200)]
    # m2's receiver never answers 2xx: retried with backoff until its lifetime ran out.
    attempts = [t for t, url, *_ in poster.log if url.endswith("/down")]
    assert all(s == 500 for _, s in by_message["m2"]) and len(attempts) >= 5
    assert attempts[-1] <= POLICY.lifetime_s
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert max(gaps) <= POLICY.backoff_cap_s + POLICY.poll_s + 1
    assert [r.failed for r in outbox.rows.values()] == ["http_500"]
    assert sender.counts["delivered"] == 3 and sender.counts["given_up"] == 1
    assert sender.counts["retried"] == 3 + len(attempts) - 1


async def test_a_given_up_callback_does_not_block_the_next_change(
    autojump_clock: trio.abc.Clock,
) -> None:
    outbox = MemoryOutbox()
    poster = Poster({"http://127.0.0.1/down": None})
    policy = msgspec.structs.replace(POLICY, lifetime_s=30.0)
    sender = CallbackSender(outbox, poster, policy, clock=trio.current_time, seed=2)
    outbox.add("m1", "sent", "http://127.0.0.1/down")
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await trio.sleep(60)
        # The account fixed its receiver: the next change goes to the new URL at once.
        outbox.add("m1", "delivered", "http://127.0.0.1/fixed")
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert poster.log[-1][1:2] == ("http://127.0.0.1/fixed",) and poster.log[-1][4] == 200
    assert sender.counts["given_up"] == 1 and sender.counts["delivered"] == 1


async def test_a_refused_destination_is_given_up_at_once_and_counted(
    autojump_clock: trio.abc.Clock,
) -> None:
    outbox = MemoryOutbox()
    tries: list[str] = []

    class Guarded:
        """Refuses one host, as the HTTP poster does when a name resolves to loopback."""

        async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
            tries.append(url)
            if "rebound" in url:
                raise DestinationRefused("rebound.example.com: 127.0.0.1 is loopback")
            return 204

    outbox.add("m1", "sent", "http://rebound.example.com/cb")
    outbox.add("m1", "delivered", "http://rebound.example.com/cb")
    outbox.add("m2", "sent", "http://127.0.0.1/ok")
    sender = CallbackSender(outbox, Guarded(), POLICY, clock=trio.current_time, seed=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await trio.sleep(POLICY.lifetime_s * 2)
        nursery.cancel_scope.cancel()
    # One attempt each, no retries: a configuration problem is not a passing failure.
    assert tries.count("http://rebound.example.com/cb") == 2
    assert (
        sorted(r.failed or "" for r in outbox.rows.values())
        == ["refused: rebound.example.com: 127.0.0.1 is loopback"] * 2
    )
    assert sender.counts["refused"] == 2 and sender.counts["given_up"] == 2
    assert sender.counts["retried"] == 0 and sender.counts["delivered"] == 1


async def test_concurrency_is_bounded(autojump_clock: trio.abc.Clock) -> None:
    outbox = MemoryOutbox()
    in_flight = 0
    most = 0

    class Slow:
        async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await trio.sleep(1)
            in_flight -= 1
            return 204

    for i in range(50):
        outbox.add(f"m{i}", "sent", "http://127.0.0.1/cb")
    sender = CallbackSender(outbox, Slow(), POLICY, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert most == POLICY.concurrency and sender.counts["delivered"] == 50 and not outbox.rows
