"""The engine's outward face: the Protocols it needs from outside, and the types they share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any, Literal, NamedTuple, Protocol

import msgspec

from smsgw.engine.messages import (
    AcceptResult,
    Account,
    AccountRecord,
    AccountSettings,
    Attempt,
    DeliveryReport,
    DeliveryResult,
    OutboundSms,
    Outcome,
    SendResult,
)

# A bulk message as a mailbox holds it: (created_at in whole microseconds, id, segments).
# The first two are its position in the account's queue, the same order as PostgreSQL's
# (created_at, id), so a page query can continue after any entry. No body: bodies live in
# PostgreSQL (and, while there is room, in the Scheduler's body cache).
Entry = tuple[int, str, int]
Position = tuple[int, str]

# PostgreSQL's epoch (2000-01-01) in Unix seconds.
_PG_EPOCH_S = 946_684_800


def micros(created_at: float) -> int:
    """The microsecond (since the Unix epoch) PostgreSQL stores for `to_timestamp(created_at)`.
    It moves the float to its own epoch first, then rounds `* 1e6` half to even, as Python's
    round does; rounding `created_at * 1e6` directly was a microsecond off for about one
    value in sixteen."""
    return round((created_at - _PG_EPOCH_S) * 1_000_000) + _PG_EPOCH_S * 1_000_000


def entry_of(sms: OutboundSms) -> Entry:
    """`sms` as its account's mailbox holds it."""
    return (micros(sms.created_at), sms.id, sms.segments)


def slots(segments: int) -> int:
    """What a message of `segments` takes of a window or a rate: operators count PDUs, one a
    segment, so every dispatch limit counts segments; at least one, whatever a row says."""
    return segments if segments > 1 else 1


def slots_of(batch: Iterable[OutboundSms]) -> int:
    """The window slots `batch` takes (`slots` of each message)."""
    return sum(slots(sms.segments) for sms in batch)


# Accounts hash into SHARDS shards, each dispatched by the node that leases it
# (engine/shards.py); the store filters and hands off by the same mapping.
SHARDS = 256
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / phi
_MASK = (1 << 64) - 1


def dispatch_shard(sms: OutboundSms) -> int:
    """The shard whose lease dispatches `sms`: its account's, or the one its accepting node
    chose for it (`ShardLeases.home_shard`: every express message, and the bulk a node
    dispatches itself for an account whose shard another node leases)."""
    return shard_of(sms.account_id) if sms.shard is None else sms.shard


# A stream: an account's bulk under one dispatch shard, which the Scheduler queues and pages
# as a mailbox of its own (engine/mailboxes.py). An account's stream under its own shard is
# keyed by the account id itself; under another shard (the home shard of the node that
# accepted it) by the account id with the shard above STREAM_BITS. Each stream lives on
# exactly one node at a time (the lease of its shard), so a node that takes a shard over
# takes whole streams, never the older part of one it pages already.
STREAM_BITS = 48
_ACCOUNT_BITS = (1 << STREAM_BITS) - 1


def stream_key(account_id: int, shard: int | None) -> int:
    """The key of `account_id`'s stream under `shard` (None: its own shard)."""
    if shard is None or shard == shard_of(account_id):
        return account_id
    return account_id | ((shard + 1) << STREAM_BITS)


def stream_of(sms: OutboundSms) -> int:
    """The key of the stream `sms` is queued in (`stream_key`)."""
    return sms.account_id if sms.shard is None else stream_key(sms.account_id, sms.shard)


def stream_parts(key: int) -> tuple[int, int]:
    """(account, dispatch shard) of a stream's key."""
    account_id = key & _ACCOUNT_BITS
    above = key >> STREAM_BITS
    return account_id, shard_of(account_id) if above == 0 else above - 1


def stream_account(key: int) -> int:
    """The account of a stream's key."""
    return key & _ACCOUNT_BITS


def shard_of(account_id: int) -> int:
    """The account's shard: the top 8 bits of `account_id * 2^64/phi mod 2^64` (Fibonacci
    hashing), so consecutive ids spread evenly. PostgreSQL's `shard_of()` is the same."""
    return ((account_id * _GOLDEN) & _MASK) >> 56


class Provider(Protocol):
    """An operator connection.

    `send_batch` submits a window of messages and returns one result per message, in order;
    each message's id is its idempotency key, so the operator can drop a repeat after a crash.
    It must honour trio cancellation: the pool times a batch out, and a cancelled batch counts
    as a temporary failure for every message in it.
    """

    @property
    def name(self) -> str: ...

    async def send_batch(self, batch: Sequence[OutboundSms]) -> list[SendResult]: ...


class WriteGroup:
    """One group commit's work, in arrival order; the store does it in one transaction."""

    __slots__ = (
        "accepts",
        "attempts",
        "creates",
        "deliveries",
        "outcomes",
        "session",
        "topups",
        "written",
    )

    def __init__(self) -> None:
        # Called by the store (without waiting) once the group is durable, before it returns.
        self.written: Callable[[], None] | None = None
        # The store's note of where the group ran (PostgreSQL: the server process of its
        # connection), for `commit_fate` when its commit ends in doubt.
        self.session: object = None
        self.accepts: list[tuple[Sequence[OutboundSms], bool]] = []
        self.outcomes: list[Outcome] = []
        # Attempts failed for now, for the messages' history: before the outcomes, in
        # statements of their own (they move no credit; storage/commit.py says why).
        self.attempts: list[Attempt] = []
        self.topups: list[tuple[int, int]] = []
        self.creates: list[tuple[str, int, bytes]] = []
        # (operator, its reports): delivery reports, applied after the outcomes.
        self.deliveries: list[tuple[str, Sequence[DeliveryReport]]] = []


class GroupResult:
    __slots__ = ("accepts", "creates", "deliveries", "topups")

    def __init__(
        self,
        accepts: list[list[AcceptResult]],
        topups: list[int | None],
        creates: list[Account],
        deliveries: list[list[DeliveryResult]] | None = None,
    ) -> None:
        self.accepts = accepts
        self.topups = topups
        self.creates = creates
        self.deliveries = deliveries if deliveries is not None else []


class Recovered(msgspec.Struct, frozen=True):
    """What Recovery loads at start: express messages whole (they are few, and their deadline
    is near or gone), and bulk as a count per stream (paged in by the Scheduler). The send
    rates come from `dispatch_rates`, read before it."""

    express: list[OutboundSms]
    backlogs: list[tuple[int, int]]  # (stream, bulk messages not final): `stream_key`


class SchedulingStore(Protocol):
    """What the Scheduler reads back from the store: spilled mailbox entries and bodies."""

    async def page_entries(
        self, requests: Sequence[tuple[int, Position, int]]
    ) -> list[list[Entry]]:
        """For each (stream, cursor, n): up to n queued bulk messages of the stream
        (`stream_key`: an account's, under one dispatch shard) after the cursor, in
        (created_at, id) order, as (created_at in microseconds, id, segments). One query for
        all of them."""
        ...

    async def queued_messages(self, ids: Sequence[str]) -> list[OutboundSms]:
        """The messages with these ids that are still queued (any order)."""
        ...


class Promoted(NamedTuple):
    """What one `promote_due` did: the messages it moved from `scheduled` to `queued`, and the
    earliest `send_at` still scheduled in the shards it was given (None: none is)."""

    messages: list[OutboundSms]
    next_due: float | None


class ScheduledStore(Protocol):
    """Scheduled messages (engine/scheduled.py): they wait in the store, in no node's memory,
    until they are due; then the node that leases their shard promotes them a page at a time."""

    async def promote_due(
        self, shards: Mapping[int, int] | None, now: float, limit: int, per_shard: int
    ) -> Promoted:
        """Move up to `limit` scheduled messages whose `send_at` is at or before `now` (wall
        clock) from `scheduled` to `queued` in one transaction, at most `per_shard` of any one
        shard, the earliest of each shard first; return them and the next due time. `shards`
        maps each shard to promote to the lease token this node holds it under: a shard is
        promoted only while it is still this node's under that token, ordered against lease
        changes as an accept's hand-off is, so the shard's next owner recovers every message
        promoted here. None: every shard (a node without leases). A message cancelled
        meanwhile is not promoted."""
        ...


class StoreUnreachable(Exception):
    """The store could not be reached: no connection could be opened, or the one in use was
    lost or the server is shutting down. A read can simply be tried again; the HTTP API
    answers 503 with Retry-After. (A group commit's lost connection is `CommitInDoubt`.)"""


class CommitInDoubt(Exception):
    """A group commit failed at a point where the store cannot tell whether it committed (the
    connection was lost after the transaction's statements were sent). `commit_fate` tells."""


class MessageStore(SchedulingStore, ScheduledStore, Protocol):
    """Durable state. Every write goes through `commit_group`, one transaction per call.

    `commit_group` raises `CommitInDoubt` when the group may have committed although the call
    failed; any other exception means nothing of the group was stored."""

    async def commit_group(self, group: WriteGroup) -> GroupResult: ...

    async def commit_fate(self, group: WriteGroup) -> set[str]:
        """For a group whose `commit_group` was cancelled, timed out or ended in doubt: the ids
        of its accepted messages that are stored, once nothing can store more of them (the
        group's transaction, wherever it still runs, is ended first). Empty when the group did
        not commit (or committed without storing any message). Raises when the store cannot
        answer now; ask again later."""
        ...

    async def recover(self) -> Recovered:
        """Every message not yet final, for Recovery (see `Recovered`)."""
        ...

    async def dispatch_rates(self) -> list[tuple[int, float]]:
        """The send rates of the accounts dispatch must pace at start: each account with a
        send_rate of its own, and each suspended one at 0 (it dispatches nothing)."""
        ...


class CallbackJob(msgspec.Struct, frozen=True):
    """One status change to POST to a callback URL (a row of the outbox)."""

    id: int
    message_id: str
    account_id: int
    url: str
    status: str
    reason: str | None
    client_ref: str | None
    at: float  # when the status changed, seconds since the epoch
    created_at: float  # when the row was written: retries stop a lifetime after it
    attempts: int
    secret: str  # the account's signing secret now (a rotation applies to retries too)


class CallbackStore(Protocol):
    """The callback outbox (rows are written by the group commit with their status change)."""

    async def claim_callbacks(self, limit: int, lease_s: float) -> list[CallbackJob]:
        """Up to `limit` due rows, each the oldest undelivered row of its message, hidden from
        other claims for `lease_s` seconds (another node's, or this one's after a crash)."""
        ...

    async def settle_callbacks(
        self,
        delivered: Sequence[tuple[int, int]],
        retry: Sequence[tuple[int, float, str]],
        failed: Sequence[tuple[int, str]],
    ) -> None:
        """Delete delivered `(id, http_status)` rows; reschedule `(id, delay_s, error)`; give
        up `(id, error)`; each attempt goes in its message's history."""
        ...

    async def reconcile_deliveries(self, max_age_s: float, limit: int) -> int:
        """Apply kept `unknown` DLRs (younger than `max_age_s`) whose message is now `sent`;
        returns how many were applied."""
        ...

    async def purge_delivery_records(self, older_than_s: float, limit: int) -> int:
        """Delete up to `limit` kept DLRs and given-up callbacks older than `older_than_s`."""
        ...


class MessageQuery(msgspec.Struct, frozen=True, kw_only=True):
    """One page of an account's messages, in (created_at, id) order: newest first, or oldest
    first when `ascending`. `after` is the (created_at, id) of the last row of the previous
    page (keyset pagination: rows inserted meanwhile neither shift nor repeat a page)."""

    limit: int
    status: str | None = None
    to: str | None = None
    client_ref: str | None = None
    express: bool | None = None
    created_from: datetime | None = None  # inclusive
    created_to: datetime | None = None  # exclusive
    after: tuple[datetime, str] | None = None
    ascending: bool = False


class SummaryRow(msgspec.Struct, frozen=True):
    """Counts and money for one group of a report: a day (YYYY-MM-DD, in the report's time
    zone), a status, an operator (None: not sent to one yet), a sender or a country calling
    code."""

    key: str | None
    messages: int
    sent: int  # reached the operator: sent, delivered or undelivered
    failed: int  # refunded: failed, expired or cancelled
    pending: int  # not final yet: scheduled, queued or sending
    segments: int
    cost: int  # captured: the prices of sent messages
    held: int  # the prices of messages not final yet
    delivered: int = 0  # of `sent`: a DLR said delivered
    undelivered: int = 0  # of `sent`: a DLR said undelivered (still charged)
    expired: int = 0  # of `failed`: not sent within its validity
    cancelled: int = 0  # of `failed`: cancelled by the account while scheduled or queued
    scheduled: int = 0  # of `pending`: waiting for its send_at


class CancelResult(msgspec.Struct, frozen=True):
    """What a cancel found: `cancelled` (and its price released), else the status that kept
    it from being cancelled."""

    cancelled: bool
    status: str
    price: int


class StatementEntry(msgspec.Struct, frozen=True):
    """One line of an account's statement: a top-up, or one message's hold, capture or
    release, with the account's balance once it applied. `position` is its place in the
    account's ledger, (ledger row, place in the row): later moves have higher positions."""

    kind: Literal["topup", "hold", "capture", "release"]
    amount: int
    balance_after: int
    message_id: str | None
    at: datetime
    position: tuple[int, int]


class IdempotencyClaim(msgspec.Struct, frozen=True):
    """What claiming an Idempotency-Key found: `claimed` (the caller runs the request and
    then finishes or releases the key), `in_progress` (another request holds it), `mismatch`
    (the key was used for a different request) or `done` (replay `status` and `body`)."""

    state: Literal["claimed", "in_progress", "mismatch", "done"]
    status: int | None = None
    body: bytes | None = None


class MessageHistory(NamedTuple):
    """What the store keeps of a message's history: when it was accepted and, if it was
    scheduled, for when; then each event after the accept, oldest first, as a dict of the
    event's fields (`type`, `at`, and those the event has; the others None)."""

    created_at: datetime
    send_at: datetime | None
    events: list[dict[str, Any]]


class Reads(Protocol):
    """What the HTTP front door reads directly (one query each; none is on the accept path)."""

    async def account_by_key_hash(self, key_hash: bytes) -> Account | None: ...

    async def account(self, account_id: int) -> Account | None: ...

    async def message(self, account_id: int, message_id: str) -> dict[str, Any] | None: ...

    async def message_by_client_ref(
        self, account_id: int, client_ref: str
    ) -> dict[str, Any] | None: ...

    async def messages(self, account_id: int, query: MessageQuery) -> list[dict[str, Any]]:
        """One page, each row in the shape of `message`."""
        ...

    async def message_events(self, account_id: int, message_id: str) -> MessageHistory | None:
        """The history of the account's message; None when it has no such message."""
        ...

    async def messages_csv(
        self, account_id: int, query: MessageQuery
    ) -> tuple[bytes, tuple[datetime, str] | None]:
        """One page as CSV rows (no header), formatted by the database, and the position of
        its last row to continue after; None when this is the last page."""
        ...

    async def summary(
        self,
        account_id: int,
        created_from: datetime | None,
        created_to: datetime | None,
        group_by: Literal["day", "status", "operator", "sender", "country"],
        tz: str = "UTC",
    ) -> list[SummaryRow]:
        """One row per day (in the IANA zone `tz`), status, operator, sender or country
        calling code with messages created in [created_from, created_to)."""
        ...

    async def ping(self) -> bool: ...


class FrontDoorStore(Reads, Protocol):
    """Reads plus the few writes the front door makes directly, outside the group commit: none
    touches credit or messages, and none is on the accept path of a request that does not ask
    for it (an Idempotency-Key header, a key rotation)."""

    async def claim_idempotency_key(
        self, account_id: int, key: str, request_hash: bytes, ttl_s: float
    ) -> IdempotencyClaim:
        """Record `key` as in progress unless a live (younger than `ttl_s`) record exists;
        an older record is replaced. Atomic: of concurrent claims, exactly one is `claimed`."""
        ...

    async def finish_idempotency_key(
        self, account_id: int, key: str, status: int, body: bytes
    ) -> None: ...

    async def release_idempotency_key(self, account_id: int, key: str) -> None:
        """Forget a claimed key whose request changed nothing, so it may be sent again."""
        ...

    async def purge_idempotency_keys(self, ttl_s: float, limit: int) -> int:
        """Delete up to `limit` records older than `ttl_s`; returns how many."""
        ...

    async def update_settings(
        self, account_id: int, settings: AccountSettings
    ) -> AccountSettings | None:
        """Store the account's settings (None for an unknown account)."""
        ...

    async def rotate_key(self, account_id: int, old_hash: bytes, new_hash: bytes) -> bool:
        """Replace the account's key digest if it is still `old_hash`; False otherwise."""
        ...

    async def set_callback_url(self, account_id: int, url: str | None) -> Account | None:
        """Set (or clear, with None) the account's callback URL; the account, None if gone."""
        ...

    async def rotate_signing_secret(self, account_id: int, secret: str) -> bool:
        """Replace the account's callback signing secret; False for an unknown account."""
        ...

    async def accounts_page(
        self, after_id: int, limit: int, name: str | None = None
    ) -> list[AccountRecord]:
        """Up to `limit` accounts with ids above `after_id`, in id order; with `name`, only
        those whose name contains it (case-insensitively)."""
        ...

    async def account_record(self, account_id: int) -> AccountRecord | None: ...

    async def set_suspended(self, account_id: int, suspended: bool) -> AccountRecord | None:
        """Suspend (keeping the first suspension's time) or resume the account; the account
        after it, None for an unknown one. Every node learns it from the accounts trigger's
        notification (migration 011)."""
        ...

    async def cancel(
        self, account_id: int, message_id: str, shards: Sequence[int] | None
    ) -> CancelResult | None:
        """Cancel the account's message if it is still `scheduled`, or `queued` and of one of
        `shards` (the ones the asking node dispatches; None: any): status `cancelled`, its
        hold released, in one transaction, exact across nodes. None when the account has no
        such message; else whether it was cancelled and its status and price (`queued` and
        not cancelled: another node dispatches it)."""
        ...


class OtpVerdict(NamedTuple):
    """What verifying a one-time code found: `reason` says why it is not valid (None when it
    is): `mismatch` (a wrong code; the code stays live until MAX_ATTEMPTS of them),
    `too_many_attempts` (this wrong code was the last allowed: the code is invalidated),
    `expired`, or `no_code` (none is live for the number: none was sent, it was used or
    invalidated, or the last one sent failed)."""

    valid: bool
    reason: Literal["mismatch", "too_many_attempts", "expired", "no_code"] | None = None


class OtpStore(Protocol):
    """One-time codes (engine/otp.py), shared by every node. The code is never stored, nor
    sent to the database: only a salted hash of it."""

    async def issue(
        self,
        account_id: int,
        number: str,
        message_id: str,
        code: str,
        redacted_text: str,
        ttl_s: float,
    ) -> None:
        """Record the code of the OTP message `message_id`, before the message is accepted:
        it becomes the number's live code (replacing any earlier one) when the message is
        stored, and never if it is not. It expires `ttl_s` seconds from now."""
        ...

    async def verify(
        self, account_id: int, number: str, code: str, max_attempts: int
    ) -> OtpVerdict:
        """Check `code` against the number's live code: valid once; a wrong one counts an
        attempt, and the `max_attempts`-th in a row invalidates the code."""
        ...

    async def settle(self, message_id: str, *, void: bool) -> bool:
        """The OTP message's outcome is known to its request: store its redacted text if it
        is final (True when it was redacted now), and with `void` invalidate its code (its
        send failed, or its outcome is unknown)."""
        ...

    async def sweep(self, limit: int) -> tuple[int, int]:
        """Redact up to `limit` final OTP messages not yet redacted, and delete up to `limit`
        code rows long expired; returns (redacted, deleted)."""
        ...


class Dropped(msgspec.Struct):
    """What a round of retention did: partitions dropped, and those past the retention kept
    because they still hold a message that is not final."""

    dropped: list[str] = msgspec.field(default_factory=list)
    kept: list[str] = msgspec.field(default_factory=list)


class UpkeepStore(Protocol):
    """The stored days of messages (engine/upkeep.py): partitions made ahead, old days
    dropped whole, old bodies redacted."""

    async def add_partitions(self) -> list[str]:
        """Make the day partitions of the days ahead that are missing; returns their names."""
        ...

    async def drop_partitions(self, before: date) -> Dropped:
        """Drop the day partitions of the UTC days before `before` that hold no pending
        message."""
        ...

    async def redact_bodies(self, before: datetime, limit: int) -> int:
        """Empty the bodies of final messages made before `before`, in bounded batches, at
        most about `limit`; returns how many."""
        ...

    async def analyze_grown(self, days: Sequence[date]) -> list[str]:
        """Take new planner statistics of the partitions of `days` that grew several times
        since their last; returns their names."""
        ...


class Notices(NamedTuple):
    """What the nodes of one database tell each other, each handler called with the
    notification's text (synchronously, from the listening connection's callback)."""

    # Hand-offs to this node: a JSON list of OutboundSms, empty for "claim now".
    handoffs: Callable[[str], None]
    # Express outcomes recorded by any node: a JSON list of `Settled`, for `"wait": true`.
    settled: Callable[[str], None]
    # An account's key or settings changed: one `AccountChanged` as JSON.
    account_changed: Callable[[str], None]


class Beat(NamedTuple):
    """What a heartbeat learns of the cluster."""

    live: int  # nodes heartbeating within the ttl
    renewed: dict[int, int]  # leases renewed (shard -> token); one missing changed hands
    # Other nodes' shards whose owner has not heartbeated for `stalled_after` seconds or whose
    # lease expired (not those nobody leases: they are in transit).
    stalled: frozenset[int]
    # Other nodes' shards whose owner publishes a pressure (shard -> its JSON).
    pressure: dict[int, str]


class ClusterStore(Protocol):
    """The shared state of the nodes on one database: heartbeats, shard leases (owner, expiry,
    fencing token) and the hand-offs of messages accepted by a node that does not lease their
    shard. Every lease change is ordered against the accept transactions of its shards, so
    `load` after a change sees every message whose accept did not hand it off."""

    @property
    def node_id(self) -> str: ...

    async def join(self, ttl: float) -> None:
        """Register this node; release the leases a previous run of this node id held."""
        ...

    async def heartbeat(
        self, held: Mapping[int, int], ttl: float, stalled_after: float, pressure: str | None
    ) -> Beat:
        """Record that this node lives, with its published `pressure` (admission's, as JSON;
        None: it admits everything), and extend by `ttl` each lease of `held` (shard -> token)
        that is still this node's under that token, even one that expired meanwhile: nobody
        took it, so nobody else dispatched the shard. See `Beat` for what comes back."""
        ...

    async def acquire(self, count: int, ttl: float) -> dict[int, int]:
        """Lease up to `count` free or expired shards; returns shard -> new token."""
        ...

    async def release(self, shards: Sequence[int]) -> None: ...

    async def leave(self, shards: Sequence[int]) -> None:
        """Release `shards` and mark this node gone (a clean stop)."""
        ...

    async def load_backlog(
        self, shards: Sequence[int]
    ) -> tuple[list[OutboundSms], list[tuple[int, int]]]:
        """What is not final in `shards`, bulk only counted per account (the Scheduler pages
        it in; their hand-offs are dropped: this covers them): the express messages, and
        (account, bulk messages)."""
        ...

    async def claim(self, known: Callable[[str], bool]) -> list[tuple[OutboundSms, int]]:
        """Take the hand-offs waiting for shards this node leases: (message, lease token) for
        each whose id is not `known` (dispatched from its notification already)."""
        ...

    async def listen(self, notices: Notices) -> None:
        """Call `notices`' handlers for each notification, once committed (see `Notices`);
        returns when the connection is lost."""
        ...

    async def api_demand(self, mine: Mapping[int, int], horizon: float) -> dict[int, int]:
        """Publish this node's requests per account in the last tick (`mine`) and return the
        other nodes' latest figures for those accounts, published within `horizon` seconds."""
        ...

    async def send_demand(self, mine: Mapping[int, int], horizon: float) -> dict[int, int]:
        """As `api_demand`, of this node's backlog per paced account (engine/shares.py)."""
        ...

    async def cluster(self, ttl: float) -> dict[str, Any]:
        """Every node with its heartbeat and shard count, and the shards nobody leases."""
        ...
