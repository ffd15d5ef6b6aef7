"""A node sending over SMPP is SIGKILLed mid-dispatch and started again (issue 22, "after a
crash"). SMPP has no idempotency key, so what the SMSC had taken and the node had not yet
recorded goes again: the test measures those duplicates, and checks that they are bounded by
what can be in doubt (the binds' windows of unanswered submit_sm, and the answers on their way
to the group commit), that every message ends final, and that none is charged twice."""

from __future__ import annotations

import signal
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from smsgw.sim.smsc import SimulatedSmsc, SmscProfile
from tests.conftest import bearer
from tests.integration.helpers import (
    assert_ledger_consistent,
    create_account,
    db_fetch,
    http_client,
    ledger,
    until,
)
from tests.integration.nodes import pending_count, serve_node

pytestmark = pytest.mark.slow

MESSAGES = 3_000
BINDS, WINDOW = 2, 20


def _taken(smsc: SimulatedSmsc, n: int) -> Callable[[], Awaitable[bool]]:
    async def taken() -> bool:
        return smsc.counts["accepted"] >= n

    return taken


async def test_a_killed_node_sends_again_only_what_was_in_doubt(
    database_url: str, schema: str
) -> None:
    smsc = SimulatedSmsc(
        SmscProfile(latency_ms=30.0, p_temporary=0.0, p_permanent=0.0, receipts=False),
        record=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        async with trio.open_nursery() as nursery:
            port = await nursery.start(smsc.serve)
            url = f"smsc=smpp://gw:pw@127.0.0.1:{port}?binds={BINDS}&window={WINDOW}&tps=2000"
            args = ("--operator-url", url, "--recipient-limit-per-hour", "1000000")
            async with serve_node(database_url, schema, "a", log, *args) as first:
                async with http_client(first.url) as client:
                    account = await create_account(client, 10**6)
                    key = bearer(account["api_key"])
                    for start in range(0, MESSAGES, 500):
                        body = {
                            "messages": [
                                {"to": f"+4915{i:09d}", "text": f"message {i}"}
                                for i in range(start, start + 500)
                            ]
                        }
                        r = await client.post("/v1/messages/batch", json=body, headers=key)
                        assert r.status_code == 202 and r.json()["accepted"] == 500, r.text
                with trio.fail_after(30):
                    await until(_taken(smsc, MESSAGES // 4), interval=0.01)
                first.process.send_signal(signal.SIGKILL)
                await first.process.wait()
            taken_before = smsc.counts["accepted"]
            assert taken_before < MESSAGES, "the node sent everything before it was killed"

            async with serve_node(database_url, schema, "a", log, *args):

                async def all_final() -> bool:
                    return await pending_count(database_url, schema) == 0

                with trio.fail_after(120):
                    await until(all_final, interval=0.2)
            nursery.cancel_scope.cancel()

    rows = await db_fetch(
        database_url, schema, "SELECT status, count(*) AS n FROM messages GROUP BY 1"
    )
    assert {r["status"]: r["n"] for r in rows} == {"sent": MESSAGES}
    # Charged once each, whatever went twice.
    accounts = await ledger(database_url, schema)
    assert_ledger_consistent(accounts)
    [figures] = accounts.values()
    assert figures["captured"] == 5 * MESSAGES and figures["held"] == 0

    taken = Counter(r.pdu.destination_addr for r in smsc.records if r.status == 0)
    assert len(taken) == MESSAGES  # every message reached the SMSC
    duplicates = sum(n - 1 for n in taken.values())
    print(f"SMSC took {taken_before} before the kill; {duplicates} sent twice")
    # In doubt at the kill: the submit_sm unanswered in the binds' windows, and the answered
    # ones whose outcomes had not been committed yet (a dispatch batch's, and a group's).
    assert duplicates <= 4 * BINDS * WINDOW, duplicates
