"""Every message that crosses between actors: frozen msgspec Structs, declared once."""

from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec

from smsgw.engine.actor import Reply


class Status(enum.StrEnum):
    # Accepted with a `send_at` ahead: held, waiting in the store until it is due
    # (engine/scheduled.py), then `queued`.
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    # From a delivery report (DLR), after `sent`: the handset got it, or the operator gave up.
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    # Not sent within its validity (bulk; an express message past its deadline is `failed`),
    # or cancelled by its account while still queued: both release the hold, as `failed` does.
    EXPIRED = "expired"
    CANCELLED = "cancelled"


# Final for dispatch and credit: a DLR may still move `sent` on, but never charges or refunds.
FINAL_STATUSES = frozenset(
    {
        Status.SENT,
        Status.FAILED,
        Status.DELIVERED,
        Status.UNDELIVERED,
        Status.EXPIRED,
        Status.CANCELLED,
    }
)

# How a message's attempts end: `sent` captures its hold, the others release it.
OutcomeStatus = Literal["sent", "failed", "expired", "cancelled"]


class OutboundSms(msgspec.Struct, frozen=True):
    """One accepted message on its way to an operator: everything dispatch needs."""

    id: str
    account_id: int
    to: str
    sender: str
    text: str
    segments: int
    price: int
    express: bool
    created_at: float  # wall clock, seconds since the epoch
    deadline: float | None = None  # wall clock; express only
    # Seconds from `created_at` it may wait to be sent (bulk only; None: the node's default,
    # `RetryPolicy.validity_s`). Stored.
    validity: int | None = None
    client_ref: str | None = None
    attempts: int = 0
    last_reason: str | None = None
    # The HTTP request that accepted it (X-Request-Id), for log lines; not stored: a message
    # recovered after a restart has none.
    request_id: str | None = None
    # The fencing token of the shard lease this node dispatches it under (engine/shards.py):
    # stamped when it enters the Scheduler; its status is written only while that lease holds.
    fence: int | None = None
    # Where its status changes are POSTed (else its account's callback_url, if any).
    callback_url: str | None = None
    # The operator of the last attempt, which failed for now: a retry goes to another operator
    # while one may take calls (engine/routing.py).
    last_operator: str | None = None
    # The shard whose lease dispatches it, when not its account's: an express message is
    # dispatched by the node that accepted it, under a shard that node leases, so its deadline
    # does not depend on another node; so is a bulk one whose account's shard another node
    # leases, so it costs no hand-off (engine/shards.py; `dispatch_shard`, engine/ports.py).
    # Stored.
    shard: int | None = None
    # When it may be sent (wall clock), for a message accepted `scheduled`: it waits in the
    # store until then (engine/scheduled.py), and its validity and express deadline count
    # from it. Set at accept only when ahead of the accept; None: sent as soon as accepted.
    # Stored.
    send_at: float | None = None


class SendResult(msgspec.Struct, frozen=True):
    """What an operator said about one attempt."""

    kind: Literal["sent", "temporary", "permanent"]
    operator_message_id: str | None = None
    reason: str | None = None


class AcceptResult(msgspec.Struct, frozen=True):
    """The store's answer for one item of an accept group."""

    accepted: bool
    # duplicate_client_ref: the account already has a message with this client_ref (the
    # unique index said so at insert); nothing was stored or held for this item.
    # recipient_rate_limited: the account's messages to this number in the last hour, on
    # every node, already reach its hourly limit; `retry_after` says when one more fits.
    # opted_out: the number is on the gateway's blocklist, or (bulk only) on the account's
    # opt-out list; nothing was stored or held.
    reason: (
        Literal[
            "insufficient_credit",
            "unknown_account",
            "batch_rejected",
            "duplicate_client_ref",
            "recipient_rate_limited",
            "opted_out",
        ]
        | None
    ) = None
    balance: int | None = None  # the account's balance after this group
    retry_after: float | None = None


class Outcome(msgspec.Struct, frozen=True):
    """A final state for one message: `sent` captures its hold, the others release it."""

    sms: OutboundSms
    status: OutcomeStatus
    operator: str | None
    operator_message_id: str | None
    reason: str | None
    attempts: int
    at: float
    # What the operator said to the attempt that decided it (its history records the attempt);
    # None when no attempt did (it expired waiting, was cancelled or swept).
    attempt: Literal["sent", "temporary", "permanent"] | None = None


class Attempt(msgspec.Struct, frozen=True):
    """An attempt the operator failed for now, to be tried again: only its history records
    it (the message's row keeps its count, so a recovered message goes on counting)."""

    sms: OutboundSms  # its `attempts` counts this one
    operator: str
    reason: str | None
    at: float


class Settled(msgspec.Struct, frozen=True, array_like=True):
    """What a `"wait": true` request learns of its message's outcome: an Outcome without the
    message, small enough that the node that recorded it can NOTIFY it to every node."""

    id: str
    status: OutcomeStatus
    operator: str | None
    operator_message_id: str | None
    reason: str | None
    attempts: int
    at: float

    @classmethod
    def of(cls, outcome: Outcome) -> Settled:
        return cls(
            outcome.sms.id,
            outcome.status,
            outcome.operator,
            outcome.operator_message_id,
            outcome.reason,
            outcome.attempts,
            outcome.at,
        )


class AccountSettings(msgspec.Struct, frozen=True):
    """Per-account scheduling and rate settings (migration 003); None: the node's default."""

    send_rate: float | None = None  # bulk messages a second dispatched to operators
    express_deadline_ms: int | None = None  # from accept to the operator
    recipient_limit_per_hour: int | None = None  # messages to one number
    api_rate: float | None = None  # API requests a second
    # ISO 3166 alpha-2: whose national forms `to` takes (engine/numbers.py; None: the node's).
    default_country: str | None = None
    # The senders the admin allowed this account (empty: any valid sender), and the one a
    # send without `sender` uses (None: "smsgw"). Migration 010.
    senders: tuple[str, ...] = ()
    default_sender: str | None = None
    # Suspended by the admin: its sends are refused (403) and its queued messages wait, unsent
    # and uncharged, until it resumes. Migration 011.
    suspended: bool = False
    # The account's own prices, smallest currency unit (None: the node's): per segment, and
    # added per segment for express.
    price_per_segment: int | None = None
    express_surcharge: int | None = None


DEFAULT_SETTINGS = AccountSettings()


class AccountChanged(msgspec.Struct, frozen=True):
    """An account's key or settings changed (on any node: a trigger NOTIFYs every node, so
    a rotated key or a new rate holds everywhere within a notification's latency)."""

    id: int
    send_rate: float | None = None
    express_deadline_ms: int | None = None
    recipient_limit_per_hour: int | None = None
    api_rate: float | None = None
    default_country: str | None = None
    senders: tuple[str, ...] | None = None  # a NULL column: none
    default_sender: str | None = None
    suspended: bool = False
    price_per_segment: int | None = None
    express_surcharge: int | None = None

    @property
    def settings(self) -> AccountSettings:
        return AccountSettings(
            self.send_rate,
            self.express_deadline_ms,
            self.recipient_limit_per_hour,
            self.api_rate,
            self.default_country,
            self.senders or (),
            self.default_sender,
            self.suspended,
            self.price_per_segment,
            self.express_surcharge,
        )


class Account(msgspec.Struct, frozen=True):
    id: int
    name: str
    balance: int
    held: int
    callback_url: str | None = None
    # Only when it was just made (account creation): it is shown to the account once.
    signing_secret: str | None = None
    settings: AccountSettings = DEFAULT_SETTINGS


class AccountRecord(msgspec.Struct, frozen=True):
    """An account as the gateway's admin sees it: its credit, when it was made, whether it is
    suspended (since when), and its settings."""

    id: int
    name: str
    balance: int
    held: int
    captured: int
    topped_up: int
    created_at: float  # seconds since the epoch
    suspended_at: float | None
    callback_url: str | None
    settings: AccountSettings


class DeliveryReport(msgspec.Struct, frozen=True):
    """One operator's delivery report (DLR) about a message it answered `sent`."""

    operator_message_id: str
    status: Literal["delivered", "undelivered"]
    error: str | None = None


# What became of one report: `applied` (sent -> delivered/undelivered), `duplicate` (the
# message already has this status), `conflict` (it is final otherwise: the other DLR status,
# or failed), `unknown` (no sent message of this operator has that id, yet: kept, and applied
# if its `sent` arrives later).
DeliveryResultKind = Literal["applied", "duplicate", "conflict", "unknown"]


class DeliveryResult(msgspec.Struct, frozen=True, omit_defaults=True):
    operator_message_id: str
    result: DeliveryResultKind
    message_id: str | None = None
    status: str | None = None  # the message's status after this report


# --- StoreWriter inbox -------------------------------------------------------------------


class Accept(msgspec.Struct, frozen=True):
    """Hold credit for and store these messages in one group commit; all-or-none if atomic."""

    items: tuple[OutboundSms, ...]
    atomic: bool
    reply: Reply[list[AcceptResult]]


class RecordOutcome(msgspec.Struct, frozen=True):
    outcome: Outcome


class RecordAttempt(msgspec.Struct, frozen=True):
    attempt: Attempt


class TopUp(msgspec.Struct, frozen=True):
    account_id: int
    amount: int
    reply: Reply[int | None]  # the new balance, None for an unknown account


class CreateAccount(msgspec.Struct, frozen=True):
    name: str
    credit: int
    key_hash: bytes
    reply: Reply[Account]


class RecordDeliveries(msgspec.Struct, frozen=True):
    """Apply one operator's delivery reports, in one group commit with whatever else waits."""

    operator: str
    reports: tuple[DeliveryReport, ...]
    reply: Reply[list[DeliveryResult]]


WriterMessage = Accept | RecordOutcome | RecordAttempt | TopUp | CreateAccount | RecordDeliveries


# --- Scheduler inbox ---------------------------------------------------------------------


class Enqueue(msgspec.Struct, frozen=True):
    """Committed messages (new, recovered, or due for a retry) to dispatch."""

    items: tuple[OutboundSms, ...]


class Backlog(msgspec.Struct, frozen=True):
    """Recovery: these streams (`ports.stream_key`: an account's bulk under one dispatch
    shard) have this many bulk messages waiting in the store, to be paged in (from the start
    of each stream's queue)."""

    counts: tuple[tuple[int, int], ...]


class ForgetShards(msgspec.Struct, frozen=True):
    """Forget the bulk streams of these shards, their entries, counts and paging cursors: the
    shards left this node (lost to another node, or being given away), whose next owner reads
    their messages from the store; or they were just leased, and their recovery pages each
    stream from the start. A cursor kept from an earlier lease passed over the messages this
    node held then and dropped at the send check: no page would read them again."""

    shards: tuple[int, ...]


class Paged(msgspec.Struct, frozen=True):
    """The Scheduler's pager read a stream's next entries back from the store."""

    key: int  # the stream's (`ports.stream_key`)
    rows: tuple[tuple[int, str, int], ...]  # (created_at in microseconds, id, segments)
    size: int  # how many were asked for
    ok: bool = True


class SendRate(msgspec.Struct, frozen=True):
    """Pace this account's bulk dispatch (messages a second; None: unpaced)."""

    account_id: int
    rate: float | None


class SendShare(msgspec.Struct, frozen=True):
    """This node's share of a paced account's send rate (engine/shares.py: by where the
    account's bulk waits, among the nodes)."""

    account_id: int
    share: float


class BatchDone(msgspec.Struct, frozen=True):
    """The ProviderPool is done with a `Dispatch`: each of its messages was handed on (an
    outcome to the writer, a retry to the RetryTimer) or dropped (a repeat of one in flight,
    a shard this node no longer leases), so its window slots (a slot a segment,
    `ports.slots_of`) are free again. (The Scheduler tells itself the same of messages it
    took slots for and found it must not send.)"""

    slots: int
    express: bool


SchedulerMessage = Enqueue | Backlog | ForgetShards | Paged | SendRate | SendShare | BatchDone


# --- ProviderPool inbox ------------------------------------------------------------------


class Dispatch(msgspec.Struct, frozen=True):
    """Messages to send, all express or all bulk: the Scheduler took a slot of its window for
    each of their segments, which `BatchDone` gives back."""

    batch: tuple[OutboundSms, ...]


# --- Status snapshots (the supervisor status endpoint) -----------------------------------


class ChildStatus(msgspec.Struct, frozen=True):
    name: str
    state: Literal["starting", "running", "restarting", "stopped", "failed"]
    restart: str
    restarts: int
    last_failure: str | None
    last_failure_at: float | None
    inbox_depth: int | None
    inbox_capacity: int | None
    stats: dict[str, Any] = {}


class SupervisorStatus(msgspec.Struct, frozen=True):
    name: str
    state: str
    max_restarts: int
    within_seconds: float
    children: list[ChildStatus]


# --- Figures the dispatch actors publish (read by HTTP, metrics and the engine) ----------


class DispatchFigures(msgspec.Struct, frozen=True):
    """What the Scheduler publishes on its loop, each round: what waits, and its window."""

    express_waiting: int = 0
    express_waiting_slots: int = 0  # their segments: what they take of the window
    bulk_waiting: int = 0  # in memory and counted in the store
    bulk_in_store: int = 0
    active_accounts: int = 0  # with bulk waiting
    dispatched: int = 0  # messages handed to the pool since start
    deadline_misses: int = 0  # express messages that expired waiting for a slot
    window: int = 0
    inflight: int = 0  # slots taken
    express_inflight: int = 0
    express_reserve: int = 0
    light_reserve: int = 0
    # The light reserve is kept out of a flood's reach until then (wall clock).
    light_reserve_kept_until: float = float("-inf")


class WriterFigures(msgspec.Struct, frozen=True):
    """What the StoreWriter publishes after each group: how long a commit takes, and the
    credit and delivery counts decided in committed groups since start (copies: readers
    never see a count half-updated)."""

    commit_ms_ewma: float = 0.0  # a group commit's time, moving average
    groups: int = 0  # committed
    failed_groups: int = 0
    # held/captured/released messages and amounts, top-ups and their amount
    credit: dict[str, int] = {}
    refused: dict[str, int] = {}  # messages refused a hold, by reason
    deliveries: dict[tuple[str, str], int] = {}  # DLRs by (operator, result)
    delivered: dict[str, int] = {}  # messages a DLR moved, by status


class OperatorHealth(msgspec.Struct, frozen=True):
    """What the pool last saw of an operator: whether it answers, and how fast."""

    latency_s: float  # moving average of a call's round trip
    failing: int  # calls in a row that failed as a whole (a timeout, an exception)
    observed_at: float  # trio time of the last call's end


class PoolFigures(msgspec.Struct, frozen=True):
    """What the ProviderPool publishes as its batches open and its calls end."""

    inflight: int = 0  # messages at an operator or waiting for one
    sent: int = 0
    failed: int = 0
    deadline_misses: int = 0  # express messages out of time at an operator or waiting
    operators: dict[str, OperatorHealth] = {}
    # Segments a second the operators say they take now, all of them together (an SMPP
    # operator's binds' rates); 0.0 when one of them says nothing (an HTTP operator).
    capacity: float = 0.0
