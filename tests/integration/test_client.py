"""smsgw.client against a real node (PostgreSQL, hypercorn on 127.0.0.1): every operation,
sync and async, its typed answers and its errors, and verify_callback on real callbacks."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from smsgw.client import (
    Accepted,
    ApiError,
    AsyncClient,
    CallbackVerificationError,
    Client,
    Message,
    OutgoingMessage,
    verify_callback,
)
from tests.conftest import ADMIN_KEY
from tests.integration.helpers import RELIABLE, TO, open_node, until
from tests.integration.test_callbacks import receiver_and_node

OTHER = "+4915100000002"


async def new_account(url: str, credit: int) -> tuple[int, str, str]:
    async with AsyncClient(url, ADMIN_KEY) as admin:
        created = await admin.create_account("client", credit=credit)
    return created.id, created.api_key, created.signing_secret


async def test_the_async_client_sends_pages_reports_and_exports(
    database_url: str, schema: str
) -> None:
    # An operator that takes every message: send_and_wait's answer is always `sent`.
    async with open_node(database_url, schema, RELIABLE) as node:
        await use_async(node.url)


async def use_async(url: str) -> None:
    account_id, key, _ = await new_account(url, 1_000)
    async with AsyncClient(url, key) as sms:
        accepted = await sms.send(TO, "hello", client_ref="order-1")
        assert isinstance(accepted, Accepted) and accepted.status == "queued"
        assert (accepted.segments, accepted.price) == (1, 5)
        again = await sms.send(TO, "hello again", client_ref="order-1")
        assert isinstance(again, Message) and again.id == accepted.id  # nothing new stored

        sent = await sms.send_and_wait(OTHER, "Your code is 123456")
        assert (sent.status, sent.express, sent.to) == ("sent", True, OTHER)
        assert sent.operator_message_id

        batch = await sms.batch(
            [
                OutgoingMessage(TO, "one", client_ref="b-1"),
                {"to": "12345", "text": "no plus"},
                OutgoingMessage(TO, "two", client_ref="order-1"),  # taken by the first send
            ]
        )
        assert (batch.accepted, batch.duplicates, batch.rejected) == (1, 1, 1)
        queued, refused, duplicate = batch.results
        assert (queued.index, queued.status, queued.price) == (0, "queued", 5)
        assert refused.error is not None and refused.id is None
        assert (refused.error.code, refused.error.field, refused.error.status) == (
            "invalid_field",
            "to",
            422,
        )
        assert (duplicate.status, duplicate.id) == ("duplicate", accepted.id)
        # Every item rejected is an answer too, not an error: the results say why.
        none = await sms.batch([{"to": TO, "text": ""}])
        assert (none.accepted, none.rejected) == (0, 1)
        assert none.results[0].error is not None and none.results[0].error.field == "text"

        got = await sms.get_message(accepted.id)
        assert (got.id, got.client_ref, got.text) == (accepted.id, "order-1", "hello")
        assert got.created_at.tzinfo is not None

        # The OTP's history: accepted, its one attempt, sent (as its message says).
        history = await sms.message_events(sent.id)
        assert history.message_id == sent.id
        assert [e.type for e in history.events] == ["accepted", "attempt", "sent"]
        _, attempt, sent_event = history.events
        assert (attempt.attempt, attempt.result) == (1, "sent")
        assert sent_event.operator_message_id == sent.operator_message_id
        assert sent_event.at == (await sms.get_message(sent.id)).sent_at

        ids = [accepted.id, sent.id, queued.id]
        page = await sms.list_messages(limit=2)
        assert len(page.items) == 2 and page.next_cursor is not None
        listed = [m.id async for m in sms.iter_messages(page_size=2)]
        assert sorted(listed) == sorted(ids) and listed[0] == queued.id  # newest first
        assert [m.id async for m in sms.iter_messages(to=OTHER)] == [sent.id]
        assert [m.id async for m in sms.iter_messages(express=True)] == [sent.id]

        start = datetime.now(UTC) - timedelta(hours=1)
        summary = await sms.summary(created_from=start, group_by="status")
        assert summary.totals.messages == 3 and summary.created_from == start
        assert summary.group_by == "status"
        rows = list(csv.DictReader(io.StringIO((await sms.export(created_from=start)).decode())))
        assert sorted(r["id"] for r in rows) == sorted(ids)

        me = await sms.account()
        assert me.id == account_id and me.balance == 1_000 - 5 - 7 - 5  # held or captured
    async with AsyncClient(url, ADMIN_KEY) as admin:
        balance = await admin.top_up(account_id, 100, idempotency_key="t-1")
        assert balance == await admin.top_up(account_id, 100, idempotency_key="t-1")


async def test_problems_are_typed_errors(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node:
        await problems(node.url)


async def problems(url: str) -> None:
    _, key, _ = await new_account(url, 6)
    async with AsyncClient(url, key) as sms:
        with pytest.raises(ApiError) as raised:
            await sms.send("12345", "hi")
        assert (raised.value.status, raised.value.code, raised.value.field) == (
            422,
            "invalid_field",
            "to",
        )
        assert "+" in raised.value.detail
        await sms.send(TO, "five")
        with pytest.raises(ApiError) as raised:
            await sms.send(TO, "one more")
        error = raised.value
        assert (error.status, error.code) == (402, "insufficient_credit")
        assert error.problem["price"] == 5 and error.retry_after is None
        with pytest.raises(ApiError) as raised:
            await sms.batch([{"to": TO, "text": "x"}] * 2, atomic=True)
        assert raised.value.code == "insufficient_credit"
        with pytest.raises(ApiError) as raised:
            await sms.get_message("0195a2b3-c4d5-7e6f-8a9b-0c1d2e3f4a5b")
        assert (raised.value.status, raised.value.code) == (404, "message_not_found")
        with pytest.raises(ApiError) as raised:
            await sms.export(created_from="yesterday")
        assert raised.value.field == "created_from"
        with pytest.raises(ValueError, match="offset"):
            await sms.summary(created_from=datetime(2025, 1, 1))
    async with AsyncClient(url, "sk_wrong") as stranger:
        with pytest.raises(ApiError) as raised:
            await stranger.account()
        assert raised.value.status == 401


async def test_the_sync_client_does_the_same(database_url: str, schema: str) -> None:
    async with open_node(database_url, schema, RELIABLE) as node:
        _, key, _ = await new_account(node.url, 1_000)
        # The node serves on this trio loop: the blocking client runs in a thread.
        await trio.to_thread.run_sync(use_sync, node.url, key)


def use_sync(url: str, key: str) -> None:
    with Client(url, key) as sms:
        accepted = sms.send(TO, "sync", client_ref="s-1")
        assert isinstance(accepted, Accepted)
        batch = sms.batch([OutgoingMessage(TO, f"m {i}") for i in range(3)])
        assert batch.accepted == 3 and [r.index for r in batch.results] == [0, 1, 2]
        sent = sms.send_and_wait(OTHER, "Your code is 654321")
        assert sent.status == "sent"
        listed = [m.id for m in sms.iter_messages(page_size=2)]
        assert len(listed) == 5 and listed[-1] == accepted.id
        assert sms.get_message(sent.id).express
        assert sms.summary().totals.messages == 5
        text = b"".join(sms.iter_export()).decode()
        assert len(list(csv.DictReader(io.StringIO(text)))) == 5
        with pytest.raises(ApiError) as raised:
            sms.send(TO, "")
        assert raised.value.field == "text"


async def test_verify_callback_takes_real_callbacks_and_refuses_altered_ones(
    database_url: str, schema: str
) -> None:
    async with receiver_and_node(database_url, schema, fail_first=0) as (receiver, node, _):
        _, key, secret = await new_account(node.url, 1_000)
        async with AsyncClient(node.url, key) as sms:
            accepted = await sms.send(TO, "hi", client_ref="cb-1", callback_url=receiver.url)

        async def one() -> bool:
            return len(receiver.accepted()) == 1

        with trio.fail_after(30):
            await until(one)
    [got] = receiver.received
    callback = verify_callback(secret, got.headers, got.body)
    assert (callback.message_id, callback.status, callback.client_ref) == (
        accepted.id,
        "sent",
        "cb-1",
    )
    assert callback.event == "message.status" and callback.at.tzinfo is not None
    # Header names in any case; the deprecated headers alone still verify.
    assert verify_callback(secret, {k.title(): v for k, v in got.headers.items()}, got.body)
    legacy = {k: v for k, v in got.headers.items() if not k.startswith("webhook-")}
    assert verify_callback(secret, legacy, got.body).delivery_id == callback.delivery_id
    stamp = int(got.headers["webhook-timestamp"])
    for secret_used, headers, body, now in (
        (secret, got.headers, got.body.replace(b'"sent"', b'"failed"'), None),
        (secret, {**got.headers, "webhook-id": "1" + got.headers["webhook-id"]}, got.body, None),
        (secret, {**got.headers, "webhook-timestamp": str(stamp + 1)}, got.body, None),
        (secret, got.headers, got.body, stamp + 301.0),  # too old
        ("whsec_" + "0" * 64, got.headers, got.body, None),
        ("whsec_" + "0" * 64, legacy, got.body, None),
        (secret, {"content-type": "application/json"}, got.body, None),
    ):
        with pytest.raises(CallbackVerificationError):
            verify_callback(secret_used, headers, body, now=now)


async def test_the_readme_example_runs_as_written(
    database_url: str,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## A Python client") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    async with open_node(database_url, schema, RELIABLE) as node:
        _, key, _ = await new_account(node.url, 1_000)
        monkeypatch.setenv("SMSGW_URL", node.url)
        monkeypatch.setenv("SMSGW_KEY", key)
        await trio.to_thread.run_sync(exec, code, {})
        printed = capsys.readouterr().out.splitlines()
        assert printed[0].startswith("sent ") and printed[1] == "3 0 0"
        assert printed[2].split()[1:] in (["queued", "5"], ["sending", "5"], ["sent", "5"])
        assert printed[3] == "422 invalid_field to"
        # Again: the same client_refs are the same messages.
        await trio.to_thread.run_sync(exec, code, {})
        assert capsys.readouterr().out.splitlines()[1] == "0 3 0"
