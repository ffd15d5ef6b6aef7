"""Status callbacks to a real HTTP receiver on 127.0.0.1 that refuses the first attempts;
their signatures checked with the published `standardwebhooks` library (the README's
snippet, run as written) and against the deprecated scheme's description."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve
from standardwebhooks import Webhook, WebhookVerificationError

from smsgw.engine.callbacks import CallbackPolicy
from smsgw.runtime.server import Node, run_node
from smsgw.sim.operator import OperatorProfile
from tests.conftest import DLR_KEY, admin, bearer, node_options
from tests.integration.helpers import (
    RELIABLE,
    assert_problem,
    create_account,
    db_fetch,
    open_node,
    send,
    until,
    wait_final,
)

# Quick retries, so a test waits fractions of a second for each.
FAST = CallbackPolicy(backoff_base_s=0.05, backoff_cap_s=0.3, poll_s=0.05, attempt_timeout_s=5.0)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """An ASGI app that records every POST and answers 500 to the first `fail_first` attempts
    of each message's each status (so every callback needs retries)."""

    fail_first: int = 2
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _tries: dict[tuple[str, str], int] = field(default_factory=dict)

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        payload = json.loads(body)
        key = (payload["message_id"], payload["status"])
        tries = self._tries[key] = self._tries.get(key, 0) + 1
        status = 500 if tries <= self.fail_first else 204
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append(Received(scope["path"], headers, body, status))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def accepted(self) -> list[Received]:
        return [r for r in self.received if r.answered == 204]


@asynccontextmanager
async def receiver_and_node(
    database_url: str,
    schema: str,
    fail_first: int = 2,
    operator: OperatorProfile = RELIABLE,
    **engine: object,
) -> AsyncIterator[tuple[Receiver, Node, httpx.AsyncClient]]:
    receiver = Receiver(fail_first=fail_first)
    config = HyperConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    options = msgspec.structs.replace(
        node_options(database_url, schema, callbacks=FAST, **engine), operators=(operator,)
    )
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(serve, receiver, config)  # type: ignore[arg-type]
        )
        receiver.url = binds[0]
        node: Node = await nursery.start(partial(run_node, options))
        async with httpx.AsyncClient(base_url=node.url, timeout=30) as client:
            yield receiver, node, client
        node.stop.set()
        await node.http_done.wait()
        nursery.cancel_scope.cancel()


def verified(secret: str, r: Received) -> bool:
    """Standard Webhooks' check, by the published library (not the gateway's code)."""
    try:
        Webhook(secret).verify(r.body, r.headers)
    except WebhookVerificationError:
        return False
    return True


def readme_verifier(secret: str) -> Callable[[bytes, dict[str, str]], Any]:
    """The README's verification snippet as written, given the account's secret."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Status callbacks") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    namespace: dict[str, Any] = {"SIGNING_SECRET": secret}
    exec(code[: code.index("```")], namespace)
    return namespace["on_callback"]  # type: ignore[no-any-return]


def signed_by(secret: str, r: Received) -> bool:
    """The deprecated scheme's check, written from its description (not the gateway's code)."""
    timestamp = r.headers["x-smsgw-timestamp"]
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + r.body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(r.headers["x-smsgw-signature"], "sha256=" + expected)


async def test_each_status_change_is_posted_signed_in_order_after_failed_attempts(
    database_url: str, schema: str
) -> None:
    async with receiver_and_node(database_url, schema) as (receiver, node, client):
        account = await create_account(client, 1_000)
        key, secret = account["api_key"], account["signing_secret"]
        assert secret.startswith("whsec_")
        # One message names its own URL; the other uses the account's.
        r = await client.patch(
            "/v1/account", json={"callback_url": receiver.url + "/account"}, headers=bearer(key)
        )
        assert r.status_code == 200, r.text
        assert r.json()["callback_url"] == receiver.url + "/account"
        own = (await send(client, key, "own", callback_url=receiver.url + "/own")).json()["id"]
        shared = (await send(client, key, "shared")).json()["id"]
        finals = [await wait_final(client, key, m) for m in (own, shared)]
        assert [f["status"] for f in finals] == ["sent", "sent"]
        assert finals[0]["callback_url"] == receiver.url + "/own"

        r = await client.post(
            "/v1/dlr/sim",
            json={
                "reports": [
                    {
                        "operator_message_id": finals[0]["operator_message_id"],
                        "status": "delivered",
                    },
                    {
                        "operator_message_id": finals[1]["operator_message_id"],
                        "status": "undelivered",
                        "error": "expired",
                    },
                ]
            },
            headers={"Authorization": f"Bearer {DLR_KEY}"},
        )
        assert [x["result"] for x in r.json()["results"]] == ["applied", "applied"]

        async def all_accepted() -> bool:
            return len(receiver.accepted()) == 4

        with trio.fail_after(30):
            await until(all_accepted)

        # Every attempt, failed or not, was signed with the account's secret, both ways.
        assert receiver.received
        assert all(verified(secret, r) and signed_by(secret, r) for r in receiver.received)
        # Each callback was refused twice first, then taken: 3 attempts each, the same
        # webhook-id (the body's delivery_id) on each.
        by_delivery: dict[str, list[Received]] = {}
        for r in receiver.received:
            by_delivery.setdefault(r.headers["webhook-id"], []).append(r)
        assert sorted(len(v) for v in by_delivery.values()) == [3, 3, 3, 3]
        for webhook_id, attempts in by_delivery.items():
            assert [a.answered for a in attempts] == [500, 500, 204]
            assert len({a.body for a in attempts}) == 1
            assert json.loads(attempts[0].body)["delivery_id"] == int(webhook_id)
            assert {a.headers["x-smsgw-delivery"] for a in attempts} == {webhook_id}

        # In order per message: no status is POSTed before the one before it was taken.
        for message_id, path, second in (
            (own, "/own", "delivered"),
            (shared, "/account", "undelivered"),
        ):
            seen = [
                (json.loads(r.body)["status"], r.answered)
                for r in receiver.received
                if json.loads(r.body)["message_id"] == message_id
            ]
            assert seen == [
                ("sent", 500),
                ("sent", 500),
                ("sent", 204),
                (second, 500),
                (second, 500),
                (second, 204),
            ]
            assert {r.path for r in receiver.received if message_id in r.body.decode()} == {path}
        last = json.loads(receiver.accepted()[-1].body)
        assert set(last) == {
            "event",
            "delivery_id",
            "message_id",
            "status",
            "reason",
            "client_ref",
            "at",
        }
        assert (
            json.loads(next(r.body for r in receiver.accepted() if b"undelivered" in r.body))[
                "reason"
            ]
            == "expired"
        )

        # Delivered callbacks leave the outbox.
        async def outbox_empty() -> bool:
            return not await db_fetch(database_url, schema, "SELECT id FROM callback_outbox")

        with trio.fail_after(10):
            await until(outbox_empty)
        assert node.engine.callbacks is not None
        assert node.engine.callbacks.counts["delivered"] == 4
        assert node.engine.callbacks.counts["retried"] == 8


async def test_a_rotated_secret_signs_the_callbacks_after_it(
    database_url: str, schema: str
) -> None:
    async with receiver_and_node(database_url, schema, fail_first=0) as (receiver, _, client):
        account = await create_account(client, 1_000)
        key = account["api_key"]
        r = await client.post("/v1/account/signing-secret/rotate", headers=bearer(key))
        assert r.status_code == 200, r.text
        secret = r.json()["signing_secret"]
        assert secret != account["signing_secret"]
        message_id = (await send(client, key, callback_url=receiver.url + "/cb")).json()["id"]
        await wait_final(client, key, message_id)

        async def one() -> bool:
            return len(receiver.accepted()) == 1

        with trio.fail_after(30):
            await until(one)
        (got,) = receiver.accepted()
        assert signed_by(secret, got) and not signed_by(account["signing_secret"], got)
        assert verified(secret, got) and not verified(account["signing_secret"], got)


async def test_the_readme_verifies_a_real_callback_with_the_standard_webhooks_library(
    database_url: str, schema: str
) -> None:
    """A real node POSTs a callback (refused once, then taken) to a real receiver; the
    README's snippet, with the secret the account was given, verifies both attempts and
    refuses any change to the body, the id, the timestamp or the secret."""
    async with receiver_and_node(database_url, schema, fail_first=1) as (receiver, _, client):
        account = await create_account(client, 1_000)
        key, secret = account["api_key"], account["signing_secret"]
        message_id = (await send(client, key, callback_url=receiver.url + "/cb")).json()["id"]
        await wait_final(client, key, message_id)

        async def one() -> bool:
            return len(receiver.accepted()) == 1

        with trio.fail_after(30):
            await until(one)
    on_callback = readme_verifier(secret)
    first, second = receiver.received
    assert (first.answered, second.answered) == (500, 204)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]  # receivers dedupe
    for attempt in (first, second):
        payload = on_callback(attempt.body, attempt.headers)
        assert (payload["message_id"], payload["status"]) == (message_id, "sent")
        assert attempt.headers["webhook-signature"].startswith("v1,")
    got = second
    stamp = int(got.headers["webhook-timestamp"])
    for body, headers in (
        (got.body.replace(b'"sent"', b'"failed"'), got.headers),
        (got.body, {**got.headers, "webhook-id": got.headers["webhook-id"] + "0"}),
        (got.body, {**got.headers, "webhook-timestamp": str(stamp + 1)}),
        (got.body, {k: v for k, v in got.headers.items() if k != "webhook-signature"}),
    ):
        with pytest.raises(WebhookVerificationError):
            on_callback(body, headers)
    with pytest.raises(WebhookVerificationError):
        readme_verifier("whsec_" + "0" * 64)(got.body, got.headers)


async def test_callback_urls_are_checked(node: Node, client: httpx.AsyncClient) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    for url in (
        "ftp://127.0.0.1/x",
        "http://example.com/hook",  # not loopback, and this node is not in production mode
        "http://10.0.0.1/hook",
        "http:///nohost",
        "http://user:pw@127.0.0.1/x",
        "http://127.0.0.1:99999/x",
        "not a url",
        "http://127.0.0.1/" + "x" * 2_000,
    ):
        r = await send(client, key, callback_url=url)
        problem = assert_problem(r, 422)
        assert "callback_url" in problem["detail"], problem
        r = await client.patch("/v1/account", json={"callback_url": url}, headers=bearer(key))
        assert_problem(r, 422)
    batch = await client.post(
        "/v1/messages/batch",
        json={
            "messages": [
                {"to": "+4915123456789", "text": "a", "callback_url": "http://example.com/"},
                {"to": "+4915123456789", "text": "b", "callback_url": "http://[::1]:8/cb"},
            ]
        },
        headers=bearer(key),
    )
    results = batch.json()["results"]
    assert results[0]["error"]["field"] == "callback_url" and results[1]["status"] == "queued"
    for url in ("http://127.0.0.1:8/cb", "https://localhost/cb"):
        assert (await send(client, key, callback_url=url)).status_code == 202
    r = await client.patch("/v1/account", json={"callback_url": None}, headers=bearer(key))
    assert r.json()["callback_url"] is None
    r = await client.patch("/v1/account", json={}, headers=bearer(key))
    assert r.status_code == 200 and r.json()["callback_url"] is None
    r = await client.get("/v1/account", headers=bearer(key))
    assert r.json()["callback_url"] is None


# One URL per class a production node refuses at registration (engine/netguard.py).
FORBIDDEN_IN_PRODUCTION = (
    "http://127.0.0.1/cb",  # loopback
    "http://localhost:8080/cb",
    "http://[::1]/cb",
    "http://10.0.0.1/cb",  # RFC 1918
    "http://172.16.5.4/cb",
    "http://192.168.1.1/cb",
    "http://[fd00:ec2::254]/cb",  # unique local (AWS's IPv6 metadata)
    "http://169.254.169.254/latest/meta-data/",  # link-local: cloud metadata
    "http://[fe80::1]/cb",
    "http://224.0.0.1/cb",  # multicast
    "http://240.0.0.1/cb",  # reserved
    "http://0.0.0.0/cb",  # unspecified
    "http://100.100.100.200/cb",  # shared address space (Alibaba Cloud's metadata)
    "http://2130706433/cb",  # 127.0.0.1 as one decimal number
    "http://0x7f000001/cb",  # ... in hex
    "http://0177.0.0.1/cb",  # ... in octal
    "http://127.1/cb",
    "http://0xa9fea9fe/cb",  # 169.254.169.254 in hex
    "http://[::ffff:127.0.0.1]/cb",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/cb",
    "http://[2002:a9fe:a9fe::]/cb",  # 6to4
    "http://[64:ff9b::a9fe:a9fe]/cb",  # NAT64
    "http://metadata.google.internal/computeMetadata/v1/",  # metadata names
    "http://metadata/cb",
    "http://metadata.goog/cb",
)


async def test_production_refuses_callback_urls_to_forbidden_addresses(
    database_url: str, schema: str
) -> None:
    async with (
        open_node(database_url, schema, RELIABLE, production=True) as node,
        httpx.AsyncClient(base_url=node.url, timeout=30) as client,
    ):
        key = (await create_account(client, 1_000))["api_key"]
        for url in FORBIDDEN_IN_PRODUCTION:
            problem = assert_problem(await send(client, key, callback_url=url), 422)
            assert problem["field"] == "callback_url", (url, problem)
            assert "public" in problem["detail"], (url, problem)
            r = await client.patch("/v1/account", json={"callback_url": url}, headers=bearer(key))
            assert assert_problem(r, 422)["field"] == "callback_url", url
        # A public host is taken (and cleared again before any message could use it).
        for url in ("https://hooks.example.com/sms", "http://8.8.8.8:8080/cb"):
            r = await client.patch("/v1/account", json={"callback_url": url}, headers=bearer(key))
            assert r.status_code == 200 and r.json()["callback_url"] == url, r.text
        r = await client.patch("/v1/account", json={"callback_url": None}, headers=bearer(key))
        assert r.status_code == 200 and r.json()["callback_url"] is None
        assert await db_fetch(database_url, schema, "SELECT id FROM messages") == []


async def test_production_does_not_call_a_name_that_resolves_to_loopback(
    database_url: str, schema: str
) -> None:
    """An account URL written before the guard (or by a node not in production) naming
    `localhost`: a production node resolves it at connection time, refuses, and gives the
    callback up at once with the reason, counted; the receiver hears nothing."""
    async with receiver_and_node(database_url, schema, 0, production=True) as (
        receiver,
        node,
        client,
    ):
        account = await create_account(client, 1_000)
        url = receiver.url.replace("127.0.0.1", "localhost") + "/cb"
        await db_fetch(
            database_url,
            schema,
            "UPDATE accounts SET callback_url = $1 WHERE id = $2",
            url,
            account["id"],
        )
        message_id = (await send(client, account["api_key"])).json()["id"]
        assert (await wait_final(client, account["api_key"], message_id))["status"] == "sent"

        async def given_up() -> list[dict[str, Any]]:
            return await db_fetch(
                database_url,
                schema,
                "SELECT attempts, last_error FROM callback_outbox WHERE failed_at IS NOT NULL",
            )

        async def one_given_up() -> bool:
            return len(await given_up()) == 1

        with trio.fail_after(30):
            await until(one_given_up)
        (row,) = await given_up()
        assert row["attempts"] == 1 and row["last_error"].startswith("refused: localhost:")
        assert "loopback" in row["last_error"]
        assert receiver.received == []
        sender = node.engine.callbacks
        assert sender is not None
        assert sender.counts["refused"] == 1 and sender.counts["retried"] == 0
        metrics = (await client.get("/metrics", headers=admin())).text
        assert "smsgw_callbacks_refused_total 1.0" in metrics


async def test_a_failed_message_calls_back_too(database_url: str, schema: str) -> None:
    refusing = msgspec.structs.replace(RELIABLE, p_permanent=1.0)
    async with receiver_and_node(database_url, schema, 1, refusing) as (receiver, _, client):
        account = await create_account(client, 1_000)
        key = account["api_key"]
        message_id = (await send(client, key, callback_url=receiver.url + "/cb")).json()["id"]
        final = await wait_final(client, key, message_id)
        assert final["status"] == "failed"

        async def one() -> bool:
            return len(receiver.accepted()) == 1

        with trio.fail_after(30):
            await until(one)
        (got,) = receiver.accepted()
        body = json.loads(got.body)
        assert (body["status"], body["message_id"]) == ("failed", message_id)
        assert body["reason"] == final["reason"] and body["reason"]
        assert signed_by(account["signing_secret"], got) and verified(
            account["signing_secret"], got
        )


async def test_callbacks_survive_a_node_restart(database_url: str, schema: str) -> None:
    """The outbox is PostgreSQL's: callbacks a stopped node could not deliver are delivered
    by the next one (here after a graceful stop with the receiver down; a crash leaves rows
    leased, and the next node takes them when the lease runs out)."""
    receiver = Receiver(fail_first=10**9)
    config = HyperConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    policy = msgspec.structs.replace(FAST, lease_s=3.0, attempt_timeout_s=1.0)
    options = msgspec.structs.replace(
        node_options(database_url, schema, callbacks=policy), operators=(RELIABLE,)
    )
    async with trio.open_nursery() as nursery:
        receiver.url = (await nursery.start(partial(serve, receiver, config)))[0]  # type: ignore[arg-type]

        async with trio.open_nursery() as first:
            node: Node = await first.start(partial(run_node, options))
            async with httpx.AsyncClient(base_url=node.url, timeout=30) as client:
                account = await create_account(client, 1_000)
                key = account["api_key"]
                r = await send(client, key, callback_url=receiver.url + "/cb")
                message_id = r.json()["id"]
                await wait_final(client, key, message_id)

                async def refused_twice() -> bool:
                    return len(receiver.received) >= 2

                with trio.fail_after(30):
                    await until(refused_twice)
            node.stop.set()
        assert not receiver.accepted()
        kept = await db_fetch(database_url, schema, "SELECT status FROM callback_outbox")
        assert kept == [{"status": "sent"}]

        receiver.fail_first = 0
        async with trio.open_nursery() as second:
            node = await second.start(partial(run_node, options))

            async def delivered() -> bool:
                return len(receiver.accepted()) == 1

            async def settled() -> bool:
                return not await db_fetch(database_url, schema, "SELECT id FROM callback_outbox")

            with trio.fail_after(30):
                await until(delivered)
                await until(settled)
            node.stop.set()
        nursery.cancel_scope.cancel()
    body = json.loads(receiver.accepted()[0].body)
    assert (body["message_id"], body["status"]) == (message_id, "sent")
    assert signed_by(account["signing_secret"], receiver.accepted()[0])
    assert verified(account["signing_secret"], receiver.accepted()[0])
