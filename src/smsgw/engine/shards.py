"""ShardLeases: which accounts' queues this node dispatches, leased from the shared database.

Accounts hash into `SHARDS` shards. Each shard is dispatched by the one node that holds its
lease (owner, expiry, fencing token); the lease is renewed on every tick and expires when its
node stops renewing it (killed, paused, cut off), after which live nodes take the shard over
and recover its queued messages. Every message this node dispatches is stamped with the token
of its shard's lease (`OutboundSms.fence`); the pool sends only messages whose stamp is still
the current token, and the store writes a status only under the token the message carries,
so a node that lost a shard can neither dispatch its messages nor write their status.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec
import trio

from smsgw.engine.actor import ActorRef, InboxFull
from smsgw.engine.messages import Backlog, Enqueue, ForgetShards, OutboundSms, SchedulerMessage
from smsgw.engine.ports import (
    SHARDS,
    ClusterStore,
    Notices,
    dispatch_shard,
    shard_of,
    stream_parts,
)

log = logging.getLogger("smsgw.shards")

# A hand-off's notification and its claim (the poll) come within this of each other.
_RECENT_S = 10.0
_handoff_decoder = msgspec.json.Decoder(list[OutboundSms])


async def recover_into(
    scheduler: ActorRef[SchedulerMessage],
    express: Sequence[OutboundSms],
    counts: Sequence[tuple[int, int]],
    still: Callable[[int], bool] | None = None,
) -> int:
    """Hand recovered work to the Scheduler: messages whole (express: its deadline cannot wait
    for a page) and bulk as (stream, messages) counts to page in from the start of each
    stream's queue, in messages of bounded size. Returns how many messages that is. How a
    node recovers, whether it leases its shards (`ShardLeases`) or runs alone. `still`: whether
    a shard is still this node's, asked of each message's just before it is told (a shard
    lost meanwhile was told to the Scheduler as `ForgetShards` already, and counts told after
    that would page a stream that is not this node's)."""
    told = 0
    for start in range(0, len(express), 1_000):
        items = express[start : start + 1_000]
        if still is not None:
            items = [sms for sms in items if still(dispatch_shard(sms))]
        if items:
            await scheduler.tell(Enqueue(tuple(items)))
            told += len(items)
    for start in range(0, len(counts), 1_000):
        chunk = counts[start : start + 1_000]
        if still is not None:
            chunk = [(key, n) for key, n in chunk if still(stream_parts(key)[1])]
        if chunk:
            await scheduler.tell(Backlog(tuple(chunk)))
            told += sum(n for _, n in chunk)
    return told


def fair_share(live_nodes: int) -> int:
    """How many shards each of `live_nodes` nodes should lease: all of them, split evenly."""
    return math.ceil(SHARDS / max(1, live_nodes))


class LeaseConfig(msgspec.Struct, frozen=True):
    # A lease lives `ttl` seconds past its last renewal; a killed node's shards are taken over
    # within about ttl + tick of its last renewal.
    ttl: float = 3.0
    tick: float = 0.5  # heartbeat, renewal and rebalancing
    # How often the node looks for hand-offs without being notified (a lost connection, a
    # notification that raced a lease change).
    poll: float = 0.5
    # A bulk hand-off's notification waits at most this long for others to go with it: the
    # first after a quiet spell goes at once (storage/announce.py; 0: each group's at once).
    handoff_linger: float = 0.05
    # A shard being given away is released once none of its messages is in flight here (and
    # one more tick has passed, for their outcomes to commit), or after this long.
    drain: float = 2.0
    # The node trusts its leases for this share of the ttl after the renewal started: its own
    # clock runs from before PostgreSQL's, so it stops before anyone may take over.
    trust: float = 0.8
    # Another node that has not heartbeated for this long (two ticks missed) is taken to be
    # stalled for express purposes: its shards' express messages are failed fast at their
    # deadline by the node waiting for them, and new ones refused, until a node takes over.
    stalled_after: float = 1.2
    # The stranded-message sweep (`ShardLeases.sweep`): every `sweep` seconds (0: never), a
    # page of at most `sweep_limit` of the leased shards' pending messages older than
    # `sweep_age` seconds is checked against what this node holds.
    sweep: float = 10.0
    sweep_age: float = 30.0
    sweep_limit: int = 1_000
    # How often each node publishes its requests per rate-limited account, whose api_rate
    # the nodes share by demand (engine/shares.py).
    share_tick: float = 0.25


@runtime_checkable
class SweepStore(Protocol):
    """What the sweep reads (storage/cluster.py's PgCluster has it; a store without it, as in
    the virtual-time runs, is not swept)."""

    async def pending_page(
        self,
        shards: Sequence[int],
        older_than_s: float,
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[OutboundSms]: ...

    async def still_pending(self, ids: Sequence[str]) -> list[OutboundSms]: ...


class ShardLeases:
    """Holds this node's leases and routes work to the Scheduler by them.

    `route` (accepted here), `load` (recovery of newly leased shards) and `claim` (hand-offs
    from other nodes) are the three ways a message reaches this node's Scheduler; `admit` is
    the ProviderPool's last check before a send. State survives a restart of the run loop.
    """

    def __init__(
        self,
        store: ClusterStore,
        scheduler: ActorRef[SchedulerMessage],
        inflight: Callable[[], Iterable[OutboundSms]],
        config: LeaseConfig = LeaseConfig(),
        *,
        clock: Callable[[], float] = time.monotonic,
        settled: Callable[[str], None] = lambda _: None,
        account_changed: Callable[[str], None] = lambda _: None,
        publish: Callable[[], str | None] = lambda: None,
        unheld: Callable[[Sequence[OutboundSms]], list[OutboundSms]] | None = None,
    ) -> None:
        self.store = store
        # Of some pending messages, those this node does not hold anywhere (Scheduler, pool,
        # retries): for the sweep; None: no sweep.
        self._unheld = unheld
        self._sweep_after: tuple[float, str] | None = None  # where the next page starts
        self._suspects: dict[str, None] = {}  # unheld at the last sweep: stranded if still
        # What the other nodes tell this one besides hand-offs (ports.Notices), passed on.
        self._settled = settled
        self._account_changed = account_changed
        self.config = config
        self._scheduler = scheduler
        self._inflight = inflight
        self._clock = clock
        self.owned: dict[int, int] = {}  # shard -> fencing token
        self.valid_until = 0.0  # on `clock`: dispatch stops after this without a renewal
        # shard -> (token, draining since, no message in flight since)
        self.draining: dict[int, tuple[int, float, float | None]] = {}
        # Shards being recovered (`_recover`): messages routed to them meanwhile wait here
        # until the Scheduler has their accounts' backlogs, so none can move an account's
        # paging cursor past its older messages.
        self._holding: dict[int, list[OutboundSms]] = {}
        self._db = trio.Lock()  # claims and recoveries one at a time
        # Hand-offs dispatched lately, by id: a message arrives by notification and by claim.
        self._recent: dict[str, float] = {}
        self._recent_order: deque[tuple[float, str]] = deque()
        self._wake = trio.Event()
        self.ready = trio.Event()
        self.live_nodes = 0
        # Other nodes' shards whose owner stopped heartbeating or whose lease expired: an
        # express message of theirs will not be dispatched in time (`Engine.dispatch_stalled`).
        self.stalled: frozenset[int] = frozenset()
        # Other nodes' shards whose owner refuses some bulk (shard -> its `Pressure` as JSON),
        # and what this node publishes of its own with each heartbeat.
        self.pressure: dict[int, str] = {}
        self._publish = publish
        self.recovered = 0  # messages loaded by the first tick (start-up recovery)
        self.counts: dict[str, int] = {
            "acquired": 0,
            "released": 0,
            "lost": 0,
            "lapses": 0,
            "loaded": 0,
            "claimed": 0,
            "delivered": 0,
            "routed": 0,
            "not_owned": 0,
            "fenced_at_send": 0,
            "notifications": 0,
            "ticks": 0,
            "failed_ticks": 0,
            "sweeps": 0,
            "swept": 0,  # stranded messages the sweep put back into the Scheduler
            "promoted": 0,  # scheduled messages that came due here (engine/scheduled.py)
        }
        self.last_tick_ms = 0.0
        self.last_error: str | None = None

    # --- the hot path: called by the writer's dispatch and by the pool ---------------------

    def route(self, items: Sequence[OutboundSms]) -> list[OutboundSms]:
        """The messages of `items` whose shard this node leases, stamped with its token; the
        others are left to their owner (it learns of them from the hand-off, or from recovery
        when it takes the shard). A group's messages are mostly of a few accounts, so each
        account's shard is looked up once."""
        owned = self.owned
        recovering = bool(self._holding)
        replace = msgspec.structs.replace
        routed: list[OutboundSms] = []
        shards: dict[int, tuple[int | None, int]] = {}  # account -> token, shard
        taken = 0
        for sms in items:
            if sms.shard is None:
                found = shards.get(sms.account_id)
                if found is None:
                    shard = shard_of(sms.account_id)
                    found = shards[sms.account_id] = (owned.get(shard), shard)
                token, shard = found
            else:
                shard = sms.shard
                token = owned.get(shard)
            if token is None:
                continue
            taken += 1
            stamped = replace(sms, fence=token)
            if recovering and self._held(shard, stamped):
                continue
            routed.append(stamped)
        self.counts["routed"] += taken
        self.counts["not_owned"] += len(items) - taken
        return routed

    def _held(self, shard: int, sms: OutboundSms) -> bool:
        """Keep `sms`, routed to this node while its shard is being recovered, for the
        recovery to pass on (True); False when its shard is not being recovered."""
        held = self._holding.get(shard)
        if held is None:
            return False
        held.append(sms)
        return True

    def take_promoted(
        self, items: Sequence[OutboundSms], tokens: Mapping[int, int]
    ) -> list[OutboundSms]:
        """Of scheduled messages just promoted under `tokens` (shard -> the token the store
        checked), those of shards still leased here under that token, stamped (held, as routed
        ones are, while their shard is recovered); the others' next owner recovers them."""
        taken: list[OutboundSms] = []
        for sms in items:
            shard = dispatch_shard(sms)
            token = tokens.get(shard)
            if token is not None and self.owned.get(shard) == token:
                stamped = msgspec.structs.replace(sms, fence=token)
                if not self._held(shard, stamped):
                    taken.append(stamped)
        self.counts["promoted"] += len(taken)
        return taken

    def home_shard(self) -> int | None:
        """A shard this node leases and keeps (not draining), under whose lease it dispatches
        the messages it accepts whatever their accounts' shards: every express message (its
        deadline then depends on no other node) and the bulk of accounts whose shard another
        node leases (no hand-off: `Engine.bulk_shard`). A node that dies takes only its own
        requests' messages with it (the taker of its shards recovers them, the bulk as streams
        of their own: ports.stream_key). None when it leases none, or its leases are not
        trusted now: the account's shard it is."""
        if self._clock() >= self.valid_until:
            return None
        for shard in self.owned:
            if shard not in self.draining:
                return shard
        return None

    def stamp(self, sms: OutboundSms) -> OutboundSms | None:
        """`sms` (read back from the store) with its shard's current token, or None when this
        node does not lease the shard now. No counting, no recovery bookkeeping: the message
        entered this node's Scheduler before, as a count or an entry."""
        token = self.owned.get(dispatch_shard(sms))
        return None if token is None else msgspec.structs.replace(sms, fence=token)

    def admit(self, sms: OutboundSms) -> bool:
        """May this node send `sms` now: it still leases the shard under the token the message
        was stamped with, and the lease was renewed recently enough to be trusted."""
        if sms.fence is None:
            return True
        if self.owned.get(dispatch_shard(sms)) == sms.fence and (self._clock() < self.valid_until):
            return True
        self.counts["fenced_at_send"] += 1
        return False

    def still_held(self, sms: OutboundSms) -> bool:
        """This node still leases the shard under the token `sms` was stamped with (whether
        or not the lease was renewed lately enough for `admit`)."""
        return sms.fence is not None and self.owned.get(dispatch_shard(sms)) == sms.fence

    def wake(self) -> None:
        """Claim hand-offs now rather than at the next poll."""
        self._wake.set()

    def deliver(self, body: str) -> None:
        """A notification of hand-offs to this node: dispatch the messages it carries at once
        (no query); an empty list means "claim now". Synchronous: called from the LISTEN
        connection's callback. What cannot be dispatched here is left to the claim."""
        self.counts["notifications"] += 1
        try:
            items = _handoff_decoder.decode(body)
        except msgspec.DecodeError:
            items = []
        if not items:
            self.wake()
            return
        now = self._clock()
        batch = []
        for sms in items:
            shard = dispatch_shard(sms)
            token = self.owned.get(shard)
            # Not leased here (any more, or yet): recovery of the shard covers it. Scheduled
            # (never handed off: a notification carries none): it waits in the store.
            if token is None or sms.send_at is not None or self._seen(sms.id, now):
                continue
            stamped = msgspec.structs.replace(sms, fence=token)
            if not self._held(shard, stamped):
                batch.append(stamped)
        if not batch:
            return
        try:
            self._scheduler.tell_nowait(Enqueue(tuple(batch)))
        except InboxFull:
            for sms in batch:
                self._recent.pop(sms.id, None)  # the claim will take them
            self.wake()
            return
        self.counts["delivered"] += len(batch)

    def _seen(self, message_id: str, now: float) -> bool:
        """Whether a hand-off of `message_id` was dispatched here lately (from its
        notification or its claim, whichever came first); marks it as dispatched if not."""
        horizon = now - _RECENT_S
        recent = self._recent
        order = self._recent_order
        while order and order[0][0] < horizon:
            _, old = order.popleft()
            if recent.get(old, now) < horizon:
                del recent[old]
        if message_id in recent:
            return True
        recent[message_id] = now
        order.append((now, message_id))
        return False

    # --- the actor -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "node_id": self.store.node_id,
            "live_nodes": self.live_nodes,
            "fair_share": fair_share(self.live_nodes),
            "owned": len(self.owned),
            "draining": sorted(self.draining),
            "lease_valid_for_s": round(max(0.0, self.valid_until - self._clock()), 3),
            "leases": [{"shard": s, "token": t} for s, t in sorted(self.owned.items())],
            "last_tick_ms": round(self.last_tick_ms, 3),
            "last_error": self.last_error,
            **self.counts,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join, take a fair share of the shards and recover their queued messages, then
        report started (HTTP opens after this); then tick, listen and claim until cancelled.
        When it ends the leases are released, so a clean stop hands shards over at once."""
        try:
            if not self.ready.is_set():
                await self.store.join(self.config.ttl)
                loaded = await self._tick()
                self.recovered = loaded
                self.ready.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen)
                nursery.start_soon(self._claim_loop)
                if self.config.sweep > 0 and self._unheld is not None:
                    nursery.start_soon(self._sweep_loop)
                task_status.started()
                while True:
                    await trio.sleep(self.config.tick)
                    try:
                        await self._tick(nursery)
                    except Exception as exc:
                        # The database is away: leases run out by themselves and dispatch
                        # stops at `valid_until`; keep trying.
                        self.counts["failed_ticks"] += 1
                        self.last_error = f"{type(exc).__name__}: {exc}"
                        log.warning("lease tick failed: %s", self.last_error)
        finally:
            # Stopped (or crashed: a restart takes shards afresh and recovers them).
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await self._leave()

    async def _leave(self) -> None:
        held = [*self.owned, *self.draining]
        self.owned.clear()
        self.draining.clear()
        self._holding.clear()  # their messages are in the store, for whoever takes the shards
        self.valid_until = 0.0
        try:
            await self.store.leave(held)
        except Exception as exc:
            log.warning("could not release leases on stop (they expire by themselves): %s", exc)

    async def _tick(self, recoveries: trio.Nursery | None = None) -> int:
        """Heartbeat, renew, give away or take shards by the fair share. Newly leased shards
        are recovered in `recoveries` (None: here, and the count of messages recovered is
        returned: start-up, before HTTP opens). Not in the tick: a recovery of a large
        backlog takes seconds, and a heartbeat that waits for it lets the leases lapse, which
        other nodes then take (two nodes draining 430,000 messages lost shards to each other
        every few seconds that way)."""
        started = self._clock()
        self.counts["ticks"] += 1
        held = {**self.owned, **{s: token for s, (token, _, _) in self.draining.items()}}
        late = bool(held) and started >= self.valid_until
        trusted_s = self.config.ttl * self.config.trust
        since_renewal = started - (self.valid_until - trusted_s)
        live, renewed, self.stalled, self.pressure = await self.store.heartbeat(
            held, self.config.ttl, self.config.stalled_after, self._publish()
        )
        self.live_nodes = live
        self.valid_until = started + trusted_s
        self.last_error = None
        lost = [s for s in held if s not in renewed]
        if lost:
            self.counts["lost"] += len(lost)
            log.warning("lost the leases of %d shard(s) to other nodes", len(lost))
        for shard in lost:
            self.owned.pop(shard, None)
            self.draining.pop(shard, None)
        if lost:
            await self._scheduler.tell(ForgetShards(tuple(lost)))
        loaded = 0
        if late:
            # Renewed later than this node trusts its leases for (a loop busy for seconds, a
            # pause): sends waited meanwhile (`admit`). A lease renewed under its own token
            # was not taken by anyone, so nobody else dispatched the shard and what this node
            # holds of it is still exact: nothing is fenced off or read again. (New tokens and
            # a reload here once turned a busy loop into a spiral: every outcome in flight
            # fenced off, every queued message loaded a second time.) A lease another node
            # took is among `lost` above.
            self.counts["lapses"] += 1
            log.warning(
                "leases renewed %.1f s after the last renewal (trusted for %.1f s);"
                " %d of %d under the same tokens",
                since_renewal,
                trusted_s,
                len(renewed),
                len(held),
            )
        self._mark_drained(started)
        ready = [
            shard
            for shard, (_, since, empty) in self.draining.items()
            if (empty is not None and started - empty >= self.config.tick * 0.9)
            or started - since >= self.config.drain
        ]
        if ready:
            await self.store.release(ready)
            self.counts["released"] += len(ready)
            for shard in ready:
                del self.draining[shard]
        target = fair_share(live)
        if len(self.owned) > target:
            # Give away the highest shards: stop dispatching them now, release when drained.
            leaving = sorted(self.owned)[target:]
            for shard in leaving:
                self.draining[shard] = (self.owned.pop(shard), started, None)
            await self._scheduler.tell(ForgetShards(tuple(leaving)))
        elif len(self.owned) + len(self.draining) < target:
            want = target - len(self.owned) - len(self.draining)
            gained = await self.store.acquire(want, self.config.ttl)
            if gained:
                self.counts["acquired"] += len(gained)
                if recoveries is None:
                    loaded += await self._recover(gained)
                else:
                    recoveries.start_soon(self._recover_later, gained)
        self.last_tick_ms = (self._clock() - started) * 1000
        return loaded

    def _mark_drained(self, now: float) -> None:
        """Mark draining shards with nothing in flight here (the drain's first condition)."""
        if not self.draining:
            return
        busy = {dispatch_shard(sms) for sms in self._inflight()}
        for shard, (token, since, empty) in list(self.draining.items()):
            if shard in busy:
                self.draining[shard] = (token, since, None)
            elif empty is None:
                self.draining[shard] = (token, since, now)

    async def _recover(self, gained: dict[int, int]) -> int:
        """Own `gained` (shard -> token), load its express messages whole and tell the
        Scheduler how much bulk each stream has waiting, to page in from the start of its
        queue: memory does not follow a dead node's backlog. Messages routed to these shards
        while the recovery reads (none at start, before HTTP opens) are held and passed on
        after the backlog counts, so none enters the Scheduler ahead of its stream's older
        backlog (paging follows a cursor). A held bulk message the counts include too is
        counted twice; paging reads it once and a short page corrects the count. A shard lost
        while it is read is left out (its counts would page a stream that is not this node's).
        When the read fails, the next try (`_recover_later`) holds afresh: what was held is
        committed, so its snapshot counts it."""
        for shard in gained:
            self._holding[shard] = []
        self.owned.update(gained)
        # From a clean slate, however the shards left this node before (a restart of this
        # actor releases its leases without telling the Scheduler).
        await self._scheduler.tell(ForgetShards(tuple(gained)))
        async with self._db:
            express, counts = await self.store.load_backlog(sorted(gained))
        held_ids = {s.id for shard in gained for s in self._holding.get(shard, ())}

        def still(shard: int) -> bool:
            token = gained.get(shard)
            return token is not None and self.owned.get(shard) == token

        batch = []
        loaded_ids: set[str] = set()
        for sms in express:
            shard = dispatch_shard(sms)
            if still(shard) and sms.id not in held_ids:
                batch.append(msgspec.structs.replace(sms, fence=gained[shard]))
                loaded_ids.add(sms.id)
        loaded = await recover_into(self._scheduler, batch, counts, still)
        self.counts["loaded"] += loaded
        held = [s for shard in gained for s in self._holding.pop(shard, ())]
        await self._enqueue(
            [
                s
                for s in held
                if s.id not in loaded_ids and self.owned.get(dispatch_shard(s)) == s.fence
            ]
        )
        return loaded

    async def _recover_later(self, gained: dict[int, int]) -> None:
        """`_recover` in the background, tried again while the read fails, for the shards
        still this node's under the same tokens (a shard lost meanwhile is its new owner's to
        recover: what was held for it is dropped, it is in the store)."""
        while True:
            try:
                await self._recover(gained)
                return
            except Exception as exc:
                self.last_error = f"recovery: {type(exc).__name__}: {exc}"
                log.warning("recovery of %d shard(s) failed, trying again: %s", len(gained), exc)
            await trio.sleep(self.config.tick)
            still = {s: t for s, t in gained.items() if self.owned.get(s) == t}
            for shard in gained.keys() - still.keys():
                self._holding.pop(shard, None)
            if not still:
                return
            gained = still

    async def _enqueue(self, items: Sequence[OutboundSms]) -> None:
        await recover_into(self._scheduler, items, ())

    # --- the stranded-message sweep ---------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await trio.sleep(self.config.sweep)
            try:
                await self.sweep()
            except Exception as exc:
                # The database is away: the next sweep tries again.
                self.last_error = f"sweep: {type(exc).__name__}: {exc}"

    async def sweep(self) -> int:
        """Put back into the Scheduler the messages of this node's shards that nothing here
        holds any more; returns how many.

        A committed message must never stay `queued` because an in-memory path dropped it (a
        bug, a crash of an actor between two holders): nothing would dispatch it before the
        shard changed hands or the node restarted, its credit held all the while. Each sweep
        reads one page of the leased shards' pending messages older than `sweep_age` (bounded
        by `sweep_limit`, continuing after the last page's position, from the oldest again
        once a page comes back short) and keeps those this node does not hold (`unheld`: not
        in the Scheduler, not counted for paging, not in flight, not waiting for a retry) as
        suspects. A suspect still pending and still unheld at the next sweep is stranded:
        a message moving between two holders (an Enqueue in an inbox, a batch whose bodies
        are being read) is unheld for a moment, never for two sweeps. It goes back as at
        recovery (stamped with its shard's token): bulk into its account's queue, express
        to the lane, where its deadline, long past, fails it and refunds it."""
        store = self.store
        if self._unheld is None or not isinstance(store, SweepStore) or not self.owned:
            return 0
        if self._holding:
            return 0  # a recovery is placing this node's messages: look at the next sweep
        config = self.config
        self.counts["sweeps"] += 1
        async with self._db:
            page = await store.pending_page(
                sorted(self.owned), config.sweep_age, self._sweep_after, config.sweep_limit
            )
            again = await store.still_pending(list(self._suspects)) if self._suspects else []
        full = len(page) >= config.sweep_limit
        self._sweep_after = (page[-1].created_at, page[-1].id) if full else None
        stranded = self._unheld(self._stamped(again))
        found = {sms.id for sms in stranded}
        self._suspects = {
            sms.id: None for sms in self._unheld(self._stamped(page)) if sms.id not in found
        }
        if not stranded:
            return 0
        log.warning(
            "sweep: %d committed message(s) of this node's shards were held nowhere here;"
            " dispatching them (first: %s)",
            len(stranded),
            stranded[0].id,
        )
        self.counts["swept"] += len(stranded)
        await self._enqueue(stranded)
        return len(stranded)

    def _stamped(self, items: Sequence[OutboundSms]) -> list[OutboundSms]:
        """`items` of shards this node leases, with their shards' tokens."""
        stamped = []
        for sms in items:
            token = self.owned.get(dispatch_shard(sms))
            if token is not None:
                stamped.append(msgspec.structs.replace(sms, fence=token))
        return stamped

    async def _claim_loop(self) -> None:
        while True:
            with trio.move_on_after(self.config.poll):
                await self._wake.wait()
            self._wake = trio.Event()
            if not self.owned:
                continue
            try:
                async with self._db:
                    claimed = await self.store.claim(self._recent.__contains__)
            except Exception as exc:
                self.last_error = f"claim: {type(exc).__name__}: {exc}"
                continue
            batch = []
            now = self._clock()
            for sms, token in claimed:
                shard = dispatch_shard(sms)
                # Claimed under a lease this node no longer (or not yet) trusts: recovery of
                # the shard covers it, wherever it goes.
                if self.owned.get(shard) != token or self._seen(sms.id, now):
                    continue
                stamped = msgspec.structs.replace(sms, fence=token)
                if not self._held(shard, stamped):
                    batch.append(stamped)
            self.counts["claimed"] += len(batch)
            await self._enqueue(batch)

    async def _listen(self) -> None:
        token = trio.lowlevel.current_trio_token()

        def soon(handler: Callable[[str], None]) -> Callable[[str], None]:
            return lambda body: token.run_sync_soon(handler, body)

        notices = Notices(soon(self.deliver), soon(self._settled), soon(self._account_changed))
        while True:
            try:
                await self.store.listen(notices)
            except Exception as exc:
                self.last_error = f"listen: {type(exc).__name__}: {exc}"
            # The connection ended: the poll covers the gap; reconnect shortly.
            self._wake.set()
            await trio.sleep(1.0)
