"""Delayed delivery reports from a simulated operator, POSTed in batches to a gateway.

A `DlrEmitter` is told each new `sent` (its operator message id); it draws the outcome
(delivered with probability `delivered_ratio`, else undelivered) and a lognormal delay, and
when reports are due it POSTs them in batches to `POST {gateway}/v1/dlr/{operator}` with the
operator's key, as a real operator's DLR feed would. Loopback gateways only: this is a fake.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import random
from statistics import NormalDist
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

log = logging.getLogger("smsgw.sim.dlr")

_Z_99 = NormalDist().inv_cdf(0.99)
UNDELIVERED_ERRORS = ("absent_subscriber", "expired", "handset_full", "rejected")


class DlrProfile(msgspec.Struct, frozen=True):
    """How a simulated operator reports delivery: the share delivered, and the delay from
    `sent` to the report (lognormal, fitted to its median and p99)."""

    delivered_ratio: float = 0.95
    delay_ms_median: float = 500.0
    delay_ms_p99: float = 3_000.0
    batch: int = 1_000  # reports per POST
    flush_ms: float = 100.0  # how often due reports are collected and sent
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.delivered_ratio <= 1.0:
            raise ValueError("delivered_ratio must be within [0, 1]")
        if not 0.0 < self.delay_ms_median <= self.delay_ms_p99:
            raise ValueError("DLR delay needs 0 < delay_ms_median <= delay_ms_p99")
        if not 1 <= self.batch <= 10_000:
            raise ValueError("batch must be 1 to 10,000 reports")
        if not self.flush_ms > 0:
            raise ValueError("flush_ms must be > 0")


def require_loopback(url: str) -> None:
    """ValueError unless `url` is http(s) on a loopback host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http(s) URL")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"{url!r} is not on a loopback address")


class DlrEmitter:
    """Holds the reports of one operator until they are due, then POSTs them in batches.

    `schedule` is synchronous and cheap (a heap push), so the operator calls it as it answers.
    At most `capacity` reports wait; beyond that new ones are dropped and counted (a real
    operator loses DLRs too). A POST that fails (refused, 5xx, 429) is retried with the same
    reports after a pause; one the gateway refuses with another 4xx is dropped and counted.
    """

    def __init__(self, operator: str, profile: DlrProfile, *, capacity: int = 1_000_000) -> None:
        self.operator = operator
        self.profile = profile
        self._capacity = capacity
        self._rng = random.Random(f"{profile.seed}/dlr/{operator}")
        self._mu = math.log(profile.delay_ms_median / 1000.0)
        self._sigma = math.log(profile.delay_ms_p99 / profile.delay_ms_median) / _Z_99
        self._heap: list[tuple[float, int, str, str, str | None]] = []
        self._seq = 0
        self._target: tuple[str, str] | None = None
        self._target_set = trio.Event()
        self.counts: dict[str, int] = {
            "scheduled": 0,
            "posted": 0,
            "delivered": 0,
            "undelivered": 0,
            "requests": 0,
            "failed_requests": 0,
            "rejected": 0,
            "dropped": 0,
        }
        self.results: dict[str, int] = {}  # the gateway's answers, by result

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "waiting": len(self._heap), "results": dict(self.results)}

    def set_target(self, gateway_url: str, key: str) -> None:
        """Where to send: the gateway's base URL (loopback) and this operator's DLR key."""
        require_loopback(gateway_url)
        self._target = (gateway_url.rstrip("/"), key)
        self._target_set.set()

    def schedule(self, operator_message_id: str) -> None:
        """A message was just answered `sent`: its report becomes due after a drawn delay."""
        if len(self._heap) >= self._capacity:
            self.counts["dropped"] += 1
            return
        delivered = self._rng.random() < self.profile.delivered_ratio
        error = None if delivered else self._rng.choice(UNDELIVERED_ERRORS)
        due = trio.current_time() + self._rng.lognormvariate(self._mu, self._sigma)
        self._seq += 1
        status = "delivered" if delivered else "undelivered"
        heapq.heappush(self._heap, (due, self._seq, operator_message_id, status, error))
        self.counts["scheduled"] += 1

    def _due(self) -> list[tuple[float, int, str, str, str | None]]:
        now = trio.current_time()
        due: list[tuple[float, int, str, str, str | None]] = []
        while self._heap and self._heap[0][0] <= now and len(due) < self.profile.batch:
            due.append(heapq.heappop(self._heap))
        return due

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send due reports until cancelled; waits for `set_target` first."""
        task_status.started()
        await self._target_set.wait()
        async with httpx.AsyncClient(timeout=30.0) as client:
            while True:
                due = self._due()
                if not due:
                    await trio.sleep(self.profile.flush_ms / 1000.0)
                    continue
                if not await self._post(client, due):
                    for entry in due:
                        heapq.heappush(self._heap, entry)
                    await trio.sleep(1.0)

    async def _post(
        self, client: httpx.AsyncClient, due: list[tuple[float, int, str, str, str | None]]
    ) -> bool:
        """POST one batch; False when it should be tried again."""
        assert self._target is not None
        url, key = self._target
        reports = [
            {"operator_message_id": omid, "status": status} | ({"error": error} if error else {})
            for _, _, omid, status, error in due
        ]
        self.counts["requests"] += 1
        try:
            response = await client.post(
                f"{url}/v1/dlr/{self.operator}",
                content=msgspec.json.encode({"reports": reports}),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
        except httpx.TransportError as exc:
            self.counts["failed_requests"] += 1
            log.debug("DLR post to %s failed: %r", url, exc)
            return False
        if response.status_code in (429,) or response.status_code >= 500:
            self.counts["failed_requests"] += 1
            return False
        if response.status_code != 200:
            self.counts["rejected"] += len(due)
            log.warning("gateway refused %d DLRs: %s", len(due), response.text[:200])
            return True
        self.counts["posted"] += len(due)
        for _, _, _, status, _ in due:
            self.counts[status] += 1
        for item in response.json().get("results", []):
            result = item.get("result", "?")
            self.results[result] = self.results.get(result, 0) + 1
        return True
