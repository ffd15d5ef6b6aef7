"""PgStore: the engine's stores on PostgreSQL, one part per concern.

Every public coroutine of a part is a trio coroutine that crosses into asyncio once (about
0.3 ms of bridging), so each one does a whole unit of work on the asyncio side: a group commit
is one crossing and one transaction, however many requests it carries.

| part | module | what it does |
| --- | --- | --- |
| `GroupCommit` | commit.py (statements: commit_sql.py) | the group commit and its fate in doubt |
| `Backlog` | backlog.py | recovery at start, the Scheduler's pages, bodies for dispatch |
| `MessageReads` | reads.py | one message, its history, pages, the CSV export, the summary |
| `AccountStore` | accounts.py | account reads, settings, senders, suspension, API key |
| `OptOuts` | optouts.py | opt-outs and the blocklist |
| `Statements` | statement.py | the account statement (the ledger's rows, message by message) |
| `IdempotencyKeys` | idempotency.py | `Idempotency-Key` claims and answers |
| `CallbackOutbox` | delivery.py | the callback outbox, callback settings, kept DLRs |
| `ScheduledMessages` | scheduled.py | scheduled messages coming due (promoted to `queued`) |
| `Rollups` | rollups.py | the summary's rollups: the SQL that keeps them, their rebuild |

Migrations are in migrate.py, the connection pool and the bridge in database.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from smsgw.engine.ports import CancelResult
from smsgw.storage.accounts import AccountStore
from smsgw.storage.backlog import Backlog
from smsgw.storage.cancel import cancel_message
from smsgw.storage.commit import GroupCommit
from smsgw.storage.delivery import CallbackOutbox
from smsgw.storage.idempotency import IdempotencyKeys
from smsgw.storage.optouts import OptOuts
from smsgw.storage.reads import MessageReads
from smsgw.storage.rollups import Rollups
from smsgw.storage.scheduled import ScheduledMessages
from smsgw.storage.statement import Statements


class PgStore(
    GroupCommit,
    Backlog,
    MessageReads,
    AccountStore,
    OptOuts,
    Statements,
    IdempotencyKeys,
    CallbackOutbox,
    ScheduledMessages,
    Rollups,
):
    """The engine's `MessageStore`, `CallbackStore` and `FrontDoorStore` on PostgreSQL. Built
    as `PgStore(db, handoff=..., recipient_limit=...)` (GroupCommit's arguments); the other
    parts need only the Database."""

    async def cancel(
        self, account_id: int, message_id: str, shards: Sequence[int] | None
    ) -> CancelResult | None:
        """Cancel a still scheduled or queued message of the account (storage/cancel.py)."""
        return await cancel_message(self.db, account_id, message_id, shards)
