"""Status callbacks: the signature schemes, URL rules, and the CallbackSender that drains the
outbox (plus the DlrReconciler that applies delivery reports which overtook their `sent`).

Each callback is signed as Standard Webhooks (https://www.standardwebhooks.com) prescribe, so
receivers verify it with the published libraries:

    webhook-id: <delivery_id>            the same on every retry of this callback: dedupe on it
    webhook-timestamp: <unix seconds>    of this attempt
    webhook-signature: v1,<base64 of HMAC-SHA256(key, id + "." + timestamp + "." + body)>

where `key` is the account's signing secret `whsec_<base64>` with the prefix taken off and
the rest base64-decoded (as the libraries do), and `body` the exact request bytes. A
receiver recomputes it, compares in constant time, and refuses timestamps far from its clock
(a replayed old request carries an old timestamp, and changing it breaks the signature).

The gateway's own earlier scheme is sent alongside, for receivers written against it; it is
deprecated and goes in a later version:

    X-Smsgw-Timestamp: <unix seconds>
    X-Smsgw-Delivery: <delivery_id>
    X-Smsgw-Signature: sha256=<hex of HMAC-SHA256(key=secret, msg=timestamp + "." + body)>

with the whole secret's UTF-8 bytes (prefix included) as the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec
import trio

from smsgw.engine.netguard import DestinationRefused, host_problem
from smsgw.engine.ports import CallbackJob, CallbackStore
from smsgw.engine.retry import backoff
from smsgw.logs import redact_url

log = logging.getLogger("smsgw.callbacks")

# Standard Webhooks (lower case, as the specification writes them).
WEBHOOK_ID_HEADER = "webhook-id"  # the outbox row's id: the same on every retry
WEBHOOK_TIMESTAMP_HEADER = "webhook-timestamp"
WEBHOOK_SIGNATURE_HEADER = "webhook-signature"
# The earlier scheme of our own: deprecated, sent alongside for one more version.
SIGNATURE_HEADER = "X-Smsgw-Signature"
TIMESTAMP_HEADER = "X-Smsgw-Timestamp"
DELIVERY_HEADER = "X-Smsgw-Delivery"  # the outbox row's id: the same on every retry
MAX_URL_LENGTH = 2_000
SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key of the Standard Webhooks signature for a `whsec_<base64>` secret: the
    base64 after the prefix, decoded the way the published libraries decode it (padding
    added, characters outside the alphabet skipped), so both sides derive the same bytes. The
    gateway's secrets (`whsec_` and 64 hex digits: 48 bytes decoded) always decode; one that
    does not (never made by the gateway) is used as its UTF-8 bytes, rather than leave its
    callbacks unsigned."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "==")
    except (binascii.Error, ValueError):
        key = b""
    return key or secret.encode()


def sign_webhook(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature value (Standard Webhooks v1) for `body` sent as `webhook_id` at
    `timestamp` (unix seconds), with `key` from `signing_key`."""
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_headers(secret: str, delivery_id: int, timestamp: int, body: bytes) -> dict[str, str]:
    """Every signature header of one attempt: Standard Webhooks' and the deprecated ones."""
    webhook_id = str(delivery_id)
    return {
        WEBHOOK_ID_HEADER: webhook_id,
        WEBHOOK_TIMESTAMP_HEADER: str(timestamp),
        WEBHOOK_SIGNATURE_HEADER: sign_webhook(signing_key(secret), webhook_id, timestamp, body),
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        DELIVERY_HEADER: webhook_id,
    }


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The deprecated X-Smsgw-Signature value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver of the deprecated scheme does (without the clock check): recompute and
    compare in constant time."""
    if not timestamp.isdigit():
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


def callback_url_problem(url: str, *, production: bool) -> str | None:
    """Why `url` cannot take callbacks, or None. http(s) with a host only; outside production,
    only loopback hosts (a development or test node must not call out to the world); in
    production, no IP literal of a private, loopback, link-local or other non-public class and
    no local or metadata name (engine/netguard.py; the poster checks the resolved addresses
    again at each connection)."""
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  # raises ValueError for a bad port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not host:
        return "must name a host"
    if any(c.isspace() for c in url):
        return "must not contain whitespace"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@)"
    if production:
        return host_problem(host)
    if not _is_loopback(host):
        return (
            "must be a loopback address (127.0.0.1, ::1, localhost) unless the node runs in"
            " production mode"
        )
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CallbackBody(msgspec.Struct, frozen=True):
    """What a callback POSTs (application/json)."""

    event: str  # "message.status"
    delivery_id: int  # the same on every retry of this callback: dedupe on it
    message_id: str
    status: str  # sent, failed, expired, cancelled, delivered, undelivered
    reason: str | None
    client_ref: str | None
    at: str  # RFC 3339, UTC: when the status changed


_encode = msgspec.json.Encoder().encode


def callback_body(job: CallbackJob) -> bytes:
    at = datetime.fromtimestamp(job.at, UTC).isoformat(timespec="microseconds")
    return _encode(
        CallbackBody(
            event="message.status",
            delivery_id=job.id,
            message_id=job.message_id,
            status=job.status,
            reason=job.reason,
            client_ref=job.client_ref,
            at=at.replace("+00:00", "Z"),
        )
    )


class CallbackPoster(Protocol):
    """Makes one POST; returns the HTTP status. Raises on a transport error or timeout, and
    DestinationRefused when the URL's host resolves to an address callbacks must not reach
    (engine/netguard.py); never follows a redirect."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int: ...


class CallbackPolicy(msgspec.Struct, frozen=True):
    lifetime_s: float = 24 * 3600.0  # retried until this long after the status change
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 3_600.0
    attempt_timeout_s: float = 10.0
    concurrency: int = 32  # POSTs in flight at once
    claim_batch: int = 200
    lease_s: float = 60.0  # a claimed row is hidden this long (longer than one attempt)
    poll_s: float = 0.2  # how often an idle sender looks for due rows


class CallbackSender:
    """Drains the callback outbox: claims due rows (only the oldest undelivered one of each
    message, so a message's callbacks arrive in the order of its changes), POSTs them signed
    with at most `concurrency` in flight, and settles them in batches: delivered rows are
    deleted, failed ones rescheduled with exponential backoff and full jitter, and ones past
    their lifetime given up (kept with `failed_at`). At least once: a crash after a POST and
    before its settle sends it again when the lease runs out; `delivery_id` lets receivers
    dedupe. The outbox is PostgreSQL's, so nothing is lost with this actor's state.
    """

    def __init__(
        self,
        store: CallbackStore,
        poster: CallbackPoster,
        policy: CallbackPolicy = CallbackPolicy(),
        *,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self._store = store
        self._poster = poster
        self.policy = policy
        self._clock = clock
        self._rng = random.Random(seed)
        self._outstanding = 0
        self._delivered: list[tuple[int, int]] = []  # (row, the receiver's HTTP status)
        self._retry: list[tuple[int, float, str]] = []
        self._failed: list[tuple[int, str]] = []
        self._settle_wanted = trio.Event()
        self._room = trio.Event()
        self.counts: dict[str, int] = {
            "claimed": 0,
            "delivered": 0,
            "retried": 0,
            "given_up": 0,
            "refused": 0,  # given up at once: the host is a forbidden address (in given_up too)
            "settle_failures": 0,
            "claim_failures": 0,
        }
        self.last_error: str | None = None

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "in_flight": self._outstanding, "last_error": self.last_error}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # After a restart, jobs that were in flight are gone with their tasks; their rows stay
        # leased in the outbox and are claimed again when the lease runs out. Results not yet
        # settled are kept and settled by this run.
        self._outstanding = len(self._delivered) + len(self._retry) + len(self._failed)
        self._settle_wanted = trio.Event()
        if self._outstanding:
            self._settle_wanted.set()
        send_jobs, receive_jobs = trio.open_memory_channel[CallbackJob](self.policy.concurrency)
        async with trio.open_nursery() as nursery:
            for _ in range(self.policy.concurrency):
                nursery.start_soon(self._worker, receive_jobs)
            nursery.start_soon(self._settler)
            task_status.started()
            await self._claimer(send_jobs)

    async def _claimer(self, send_jobs: trio.MemorySendChannel[CallbackJob]) -> None:
        limit = 2 * self.policy.concurrency
        while True:
            room = limit - self._outstanding
            if room <= 0:
                self._room = trio.Event()
                await self._room.wait()
                continue
            try:
                jobs = await self._store.claim_callbacks(
                    min(room, self.policy.claim_batch), self.policy.lease_s
                )
            except Exception as exc:  # PostgreSQL away: the rows wait in the outbox
                self.counts["claim_failures"] += 1
                self.last_error = f"claim: {type(exc).__name__}: {exc}"
                log.warning("claiming callbacks failed: %s", self.last_error)
                await trio.sleep(1.0)
                continue
            if not jobs:
                await trio.sleep(self.policy.poll_s)
                continue
            self.counts["claimed"] += len(jobs)
            self._outstanding += len(jobs)
            for job in jobs:
                await send_jobs.send(job)

    async def _worker(self, receive_jobs: trio.MemoryReceiveChannel[CallbackJob]) -> None:
        async for job in receive_jobs:
            try:
                answer = await self._attempt(job)
            except DestinationRefused as exc:
                self._refuse(job, str(exc))
            else:
                if isinstance(answer, int):
                    self._delivered.append((job.id, answer))
                else:
                    self._decide(job, answer)
            self._settle_wanted.set()

    async def _attempt(self, job: CallbackJob) -> int | str:
        """POST one callback; the HTTP status when the receiver took it (2xx), else why not."""
        body = callback_body(job)
        timestamp = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            **signature_headers(job.secret, job.id, timestamp, body),
        }
        try:
            with trio.fail_after(self.policy.attempt_timeout_s):
                status = await self._poster.post(job.url, body, headers)
        except trio.TooSlowError:
            return "timeout"
        except DestinationRefused:
            raise
        except Exception as exc:
            # Kept in the outbox and logged: never with the URL's query string (it may hold
            # the receiver's token), should the error quote the URL.
            error = f"{type(exc).__name__}: {exc}".replace(job.url, redact_url(job.url))
            return error[:500]
        return status if 200 <= status < 300 else f"http_{status}"

    def _refuse(self, job: CallbackJob, reason: str) -> None:
        # The account named a host that callbacks must not reach: retrying cannot help (and
        # would probe that address again for 24 hours), so the callback is given up now, kept
        # in the outbox with the reason for the account's owner to see.
        self.counts["refused"] += 1
        self._failed.append((job.id, f"refused: {reason}"[:500]))
        log.warning(
            "callback %d for message %s of account %d to %s refused: %s",
            job.id,
            job.message_id,
            job.account_id,
            redact_url(job.url),
            reason,
        )

    def _decide(self, job: CallbackJob, error: str) -> None:
        delay = backoff(
            job.attempts,
            base=self.policy.backoff_base_s,
            cap=self.policy.backoff_cap_s,
            rng=self._rng,
        )
        if self._clock() + delay > job.created_at + self.policy.lifetime_s:
            self._failed.append((job.id, error))
            log.warning(
                "callback %d for message %s to %s given up after %d attempts: %s",
                job.id,
                job.message_id,
                redact_url(job.url),
                job.attempts,
                error,
            )
        else:
            self._retry.append((job.id, delay, error))

    async def _settler(self) -> None:
        try:
            await self._settle_loop()
        finally:
            # Stopping: settle what was already answered, briefly, so a graceful stop does
            # not send those callbacks again once their leases run out.
            if self._delivered or self._retry or self._failed:
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    await self._settle_once()

    async def _settle_loop(self) -> None:
        while True:
            await self._settle_wanted.wait()
            self._settle_wanted = trio.Event()
            # A moment for more results to arrive: one write for many callbacks.
            await trio.sleep(0.01)
            if not await self._settle_once():
                await trio.sleep(1.0)
                self._settle_wanted.set()

    async def _settle_once(self) -> bool:
        """Write the results gathered so far in one transaction; False if that failed (they
        are kept for the next try)."""
        delivered, retry, failed = self._delivered, self._retry, self._failed
        self._delivered, self._retry, self._failed = [], [], []
        try:
            await self._store.settle_callbacks(delivered, retry, failed)
        except Exception as exc:
            # The rows stay leased; when the lease runs out they are claimed and sent again
            # (at least once). Keep them to settle with the next batch.
            self.counts["settle_failures"] += 1
            self.last_error = f"settle: {type(exc).__name__}: {exc}"
            log.warning("settling callbacks failed: %s", self.last_error)
            self._delivered[:0], self._retry[:0], self._failed[:0] = delivered, retry, failed
            return False
        self.counts["delivered"] += len(delivered)
        self.counts["retried"] += len(retry)
        self.counts["given_up"] += len(failed)
        self._outstanding -= len(delivered) + len(retry) + len(failed)
        self._room.set()
        return True


class DlrReconciler:
    """Now and then, applies the kept `unknown` delivery reports whose message has reached
    `sent` since (an operator's DLR can overtake its own answer to the submit)."""

    def __init__(
        self,
        store: CallbackStore,
        *,
        every_s: float = 2.0,
        max_age_s: float = 24 * 3600.0,
        keep_s: float = 30 * 24 * 3600.0,
    ) -> None:
        self._store = store
        self._every = every_s
        self._max_age = max_age_s
        # Kept `unknown` reports and given-up callbacks are there to be looked at; after
        # `keep_s` they are deleted (a batch every minute), so the tables do not grow forever.
        self._keep = keep_s
        self.applied = 0
        self.purged = 0
        self.runs = 0
        self.last_error: str | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "purged": self.purged,
            "runs": self.runs,
            "last_error": self.last_error,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._every)
            try:
                while (n := await self._store.reconcile_deliveries(self._max_age, 10_000)) > 0:
                    self.applied += n
                if self.runs % max(1, round(60 / self._every)) == 0:
                    self.purged += await self._store.purge_delivery_records(self._keep, 10_000)
            except Exception as exc:  # a conflict with a DLR group, or PostgreSQL away
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("reconciling delivery reports failed: %s", self.last_error)
            self.runs += 1
