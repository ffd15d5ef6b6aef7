"""Express deadlines through topology changes: a node joining (shards rebalancing), the
dispatching node SIGKILLed, and the dispatching node paused (SIGSTOP) past its lease. Every
`"wait": true` send is answered within its deadline (plus the time to commit an answer): sent,
or failed fast with its price refunded, or refused before anything was held; never late."""

from __future__ import annotations

import signal
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from smsgw.engine.ports import shard_of
from tests.conftest import bearer
from tests.integration.helpers import (
    assert_ledger_consistent,
    db_fetch,
    http_client,
    ledger,
    until,
)
from tests.integration.nodes import (
    balanced,
    balanced_nodes,
    create_accounts,
    pending_count,
    serve_node,
    shard_owners,
)

pytestmark = pytest.mark.slow

DEADLINE = 2.0  # the default express deadline
# An answer may follow the deadline by the time to commit the outcome and send it back.
ANSWER_SLACK = 0.5
RATE, SECONDS, EVENT_AT = 10, 8.0, 2.0


async def express_load(
    client: httpx.AsyncClient, key: dict[str, str]
) -> list[tuple[int, float, dict]]:
    """RATE express `wait` sends a second for SECONDS: (status, seconds to answer, body)."""
    answers: list[tuple[int, float, dict]] = []
    start = trio.current_time()

    async def one(n: int) -> None:
        body = {"to": f"+4915{n:09d}", "text": f"code {n:06d}", "express": True, "wait": True}
        sent = trio.current_time()
        try:
            r = await client.post("/v1/messages", json=body, headers=key)
        except httpx.TransportError as exc:
            answers.append((0, trio.current_time() - sent, {"error": repr(exc)}))
            return
        answers.append((r.status_code, trio.current_time() - sent, r.json()))

    async with trio.open_nursery() as nursery:
        for n in range(int(RATE * SECONDS)):
            await trio.sleep_until(start + n / RATE)
            nursery.start_soon(one, n)
    return answers


async def express_load_around(
    client: httpx.AsyncClient, key: dict[str, str], event: Callable[[], Awaitable[None]]
) -> list[tuple[int, float, dict]]:
    """`express_load` on `client`, with `event` run EVENT_AT seconds into it."""
    answers: list[tuple[int, float, dict]] = []

    async def load() -> None:
        answers.extend(await express_load(client, key))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load)
        await trio.sleep(EVENT_AT)
        await event()
    return answers


def check(answers: list[tuple[int, float, dict]]) -> None:
    late = [(s, round(t, 3), b) for s, t, b in answers if t > DEADLINE + ANSWER_SLACK]
    statuses = Counter(s for s, _, _ in answers)
    assert not late, (statuses, late[:5])
    for status, _, body in answers:
        if status == 200:
            assert body["status"] == "sent"
        elif status in (502, 504):
            assert body["message_status"] == "failed" and body["refunded"], body
        elif status == 503:
            assert body["code"] == "express_unavailable", body
        else:
            raise AssertionError((status, body, statuses))
    assert statuses[200] >= len(answers) // 2, statuses


async def settled(database_url: str, schema: str) -> None:
    async def none_pending() -> bool:
        return await pending_count(database_url, schema) == 0

    with trio.fail_after(60):
        await until(none_pending, interval=0.2)
    assert_ledger_consistent(await ledger(database_url, schema))


async def test_express_keeps_its_deadline_while_a_node_joins(
    database_url: str, schema: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        async with serve_node(database_url, schema, "a", log) as a, http_client(a.url) as ca:
            [account] = await create_accounts(ca, 1, 10**9)
            key = bearer(account["api_key"])

            async def join() -> None:
                async with serve_node(database_url, schema, "b", log):
                    with trio.fail_after(30):
                        await until(lambda: balanced(ca, ["a", "b"]), interval=0.2)
                    await trio.sleep(SECONDS)

            check(await express_load_around(ca, key, join))
            await settled(database_url, schema)


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
async def test_express_keeps_its_deadline_when_its_dispatcher_dies_or_pauses(
    database_url: str, schema: str, how: str
) -> None:
    async with balanced_nodes(database_url, schema, "a", "b") as members:
        ca, b = members[0].client, members[1].node
        owner = await shard_owners(members)
        accounts = await create_accounts(ca, 8, 10**9)
        [account] = [x for x in accounts if owner[shard_of(x["id"])] == "b"][:1]
        key = bearer(account["api_key"])

        async def stop_b() -> None:
            b.process.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)

        answers = await express_load_around(ca, key, stop_b)
        if how == "sigstop":
            b.process.send_signal(signal.SIGCONT)
        check(answers)
        # a dispatches the express messages it accepts under a shard of its own: b's death
        # or pause costs them nothing (502: the simulated operator's permanent refusals).
        statuses = Counter(s for s, _, _ in answers)
        assert set(statuses) <= {200, 502}, statuses
        rows = await db_fetch(
            database_url,
            schema,
            "SELECT DISTINCT dispatch_shard FROM messages WHERE account_id = $1",
            account["id"],
        )
        assert {r["dispatch_shard"] for r in rows} <= {s for s, o in owner.items() if o == "a"}
        await settled(database_url, schema)
