"""One-time codes over HTTP and PostgreSQL: an OTP send answers 200 with its code once the
operator took it; the code verifies once, on any node, until it expires, and five wrong codes
in a row invalidate it; a failed send leaves no valid code; the stored text loses the code
once final (by the request, or the sweep after a crash); the code is in no log line."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
import trio

from smsgw.engine.ports import OtpVerdict
from smsgw.http.context import uuid7
from smsgw.sim.operator import OperatorProfile
from smsgw.storage.otp import PgOtpStore
from tests.conftest import admin, bearer
from tests.integration.helpers import (
    RELIABLE,
    TO,
    assert_problem,
    create_account,
    db_fetch,
    get_account,
    http_client,
    open_database,
    open_node,
)
from tests.integration.nodes import balanced_nodes

REFUSING = OperatorProfile(
    name="sim", latency_ms_median=2.0, latency_ms_p99=10.0, p_temporary=0.0, p_permanent=1.0
)


async def send_otp(client: httpx.AsyncClient, key: str, **fields: object) -> httpx.Response:
    body = {"to": TO, "otp": True, **fields}
    return await client.post("/v1/messages", json=body, headers=bearer(key))


async def verify(client: httpx.AsyncClient, key: str, code: str, to: str = TO) -> dict[str, object]:
    r = await client.post("/v1/otp/verify", json={"to": to, "code": code}, headers=bearer(key))
    assert r.status_code == 200, r.text
    return dict(r.json())


def wrong(code: str) -> str:
    """Another code of the same length."""
    return f"{(int(code) + 1) % 10 ** len(code):0{len(code)}d}"


async def stored_body(database_url: str, schema: str, message_id: str) -> str:
    [row] = await db_fetch(
        database_url, schema, "SELECT body FROM messages WHERE id = $1::uuid", message_id
    )
    return str(row["body"])


async def test_an_otp_is_sent_with_its_code_and_verifies_once(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    account = await create_account(client, 1_000)
    key = account["api_key"]
    r = await send_otp(client, key)
    assert r.status_code == 200, r.text
    sent = r.json()
    code = sent["code"]
    assert re.fullmatch(r"[0-9]{6}", code), sent
    # Express (7 a segment), sent, and its text as stored from now on: no code in it.
    assert (sent["status"], sent["express"], sent["price"], sent["to"]) == ("sent", True, 7, TO)
    assert sent["text"] == "Your code is ******"
    assert (await get_account(client, key))["balance"] == 1_000 - 7
    # Every read shows the redacted text: the message, a page, the export, the row itself.
    got = await client.get(f"/v1/messages/{sent['id']}", headers=bearer(key))
    assert got.json()["text"] == "Your code is ******" and got.json()["status"] == "sent"
    page = await client.get("/v1/messages", headers=bearer(key))
    assert [m["text"] for m in page.json()["items"]] == ["Your code is ******"]
    export = await client.get("/v1/messages/export", headers=bearer(key))
    assert export.status_code == 200 and code not in export.text
    assert await stored_body(database_url, schema, sent["id"]) == "Your code is ******"

    assert await verify(client, key, code) == {"valid": True}
    # Used once: the same code again is refused, and so is any other.
    assert await verify(client, key, code) == {"valid": False, "reason": "no_code"}
    assert await verify(client, key, wrong(code)) == {"valid": False, "reason": "no_code"}

    # A template and a length of the account's choosing; `to` in a national form, verified
    # in another one of the same number (the account's country: IR by default).
    r = await send_otp(
        client, key, to="09121234567", template="Kod: {code}. Do not share it.", code_length=8
    )
    assert r.status_code == 200, r.text
    code = r.json()["code"]
    assert re.fullmatch(r"[0-9]{8}", code)
    assert r.json()["text"] == "Kod: ********. Do not share it."
    assert r.json()["to"] == "+989121234567"
    persian = code.translate(str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹"))
    assert await verify(client, key, persian, to="+98 912 123 4567") == {"valid": True}


async def test_five_wrong_codes_in_a_row_invalidate_the_code(client: httpx.AsyncClient) -> None:
    key = (await create_account(client, 1_000))["api_key"]
    code = (await send_otp(client, key)).json()["code"]
    for _ in range(4):
        assert await verify(client, key, wrong(code)) == {"valid": False, "reason": "mismatch"}
    # Four wrong ones leave it live: the right one is still taken.
    assert await verify(client, key, code) == {"valid": True}

    code = (await send_otp(client, key)).json()["code"]
    for _ in range(4):
        assert await verify(client, key, wrong(code)) == {"valid": False, "reason": "mismatch"}
    last = await verify(client, key, wrong(code))
    assert last == {"valid": False, "reason": "too_many_attempts"}
    # Invalidated: the right code is refused now.
    assert await verify(client, key, code) == {"valid": False, "reason": "no_code"}


async def test_a_new_code_replaces_the_previous_one(client: httpx.AsyncClient) -> None:
    key = (await create_account(client, 1_000))["api_key"]
    other_key = (await create_account(client, 1_000, name="other"))["api_key"]
    first = (await send_otp(client, key)).json()["code"]
    second = (await send_otp(client, key)).json()["code"]
    if first != second:  # one in a million they are equal
        assert await verify(client, key, first) == {"valid": False, "reason": "mismatch"}
    # Another account, another number: no code of theirs.
    assert await verify(client, other_key, second) == {"valid": False, "reason": "no_code"}
    assert await verify(client, key, second, to="+4915123456780") == {
        "valid": False,
        "reason": "no_code",
    }
    assert await verify(client, key, second) == {"valid": True}


async def test_a_code_expires(database_url: str, schema: str) -> None:
    async with (
        open_node(database_url, schema, RELIABLE, otp_ttl_s=0.5) as node,
        http_client(node.url) as client,
    ):
        key = (await create_account(client, 1_000))["api_key"]
        code = (await send_otp(client, key)).json()["code"]
        await trio.sleep(0.7)
        assert await verify(client, key, code) == {"valid": False, "reason": "expired"}


async def test_a_failed_send_leaves_no_valid_code(database_url: str, schema: str) -> None:
    async with (
        open_node(database_url, schema, REFUSING) as node,
        http_client(node.url) as client,
    ):
        key = (await create_account(client, 1_000))["api_key"]
        problem = assert_problem(await send_otp(client, key), 502)
        assert problem["code"] == "operator_refused" and problem["refunded"] is True
        assert not re.search(r"\b[0-9]{6}\b", str(problem)), problem  # no code given out
        [row] = await db_fetch(
            database_url,
            schema,
            "SELECT c.used, c.redacted, m.body, m.status FROM otp_codes c"
            " JOIN messages m ON m.id = c.message_id",
        )
        assert row == {
            "used": True,
            "redacted": True,
            "body": "Your code is ******",
            "status": "failed",
        }
        assert await verify(client, key, "123456") == {"valid": False, "reason": "no_code"}
        assert (await get_account(client, key))["balance"] == 1_000


async def test_opt_outs_let_otps_through_the_blocklist_does_not(
    client: httpx.AsyncClient,
) -> None:
    """The product decision of the opt-out lists: an account's opt-outs stop its bulk
    messages, not its express ones, so a person who opted out still gets login codes."""
    key = (await create_account(client, 1_000))["api_key"]
    r = await client.post("/v1/account/opt-outs", json={"numbers": [TO]}, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert (await send_otp(client, key)).status_code == 200
    r = await client.post("/v1/blocklist", json={"numbers": [TO]}, headers=admin())
    assert r.status_code == 200, r.text
    problem = assert_problem(await send_otp(client, key), 422)
    assert (problem["code"], problem["field"]) == ("opted_out", "to")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"text": "Your code is 1234"}, "text"),
        ({"template": "no placeholder"}, "template"),
        ({"template": "{code} and {code}"}, "template"),
        ({"template": ""}, None),
        ({"template": "x" * 501 + "{code}"}, None),
        ({"code_length": 3}, None),
        ({"code_length": 9}, None),
        ({"code_length": "6"}, None),
        ({"otp": False, "text": "hi", "template": "{code}"}, "template"),
        ({"otp": False, "text": "hi", "code_length": 6}, "code_length"),
        ({"otp": False}, "text"),
    ],
)
async def test_bad_otp_sends_are_422_and_hold_nothing(
    client: httpx.AsyncClient, fields: dict[str, object], field: str | None
) -> None:
    key = (await create_account(client, 1_000))["api_key"]
    problem = assert_problem(await send_otp(client, key, **fields), 422)
    assert problem["code"] == "invalid_field", problem
    if field is not None:
        assert problem["field"] == field, problem
    assert (await get_account(client, key))["balance"] == 1_000


async def test_otp_sends_refuse_what_would_answer_a_code_twice(
    client: httpx.AsyncClient, database_url: str, schema: str
) -> None:
    key = (await create_account(client, 1_000))["api_key"]
    # An Idempotency-Key: a replay would need the code kept for 24 hours.
    r = await client.post(
        "/v1/messages",
        json={"to": TO, "otp": True},
        headers={**bearer(key), "Idempotency-Key": "otp-1"},
    )
    assert assert_problem(r, 422)["field"] == "Idempotency-Key"
    # A client_ref used before: 409, not the earlier message without its code.
    assert (await send_otp(client, key, client_ref="login-1")).status_code == 200
    problem = assert_problem(await send_otp(client, key, client_ref="login-1"), 409)
    assert (problem["code"], problem["field"]) == ("client_ref_used", "client_ref")
    # OTPs are single sends: a batch item is refused alone.
    r = await client.post(
        "/v1/messages/batch",
        json={"messages": [{"to": TO, "otp": True}, {"to": TO, "text": "hi"}]},
        headers=bearer(key),
    )
    assert r.status_code == 202, r.text
    refused = r.json()["results"][0]
    assert (refused["status"], refused["error"]["field"]) == ("rejected", "otp")
    # Charged: the two OTPs sent and the batch's one message; nothing for the refused ones.
    assert (await get_account(client, key))["balance"] == 1_000 - 7 - 5


@pytest.mark.parametrize(
    "body",
    [
        {"to": TO, "code": "12ab56"},
        {"to": TO, "code": "123"},
        {"to": TO, "code": "123456789"},
        {"to": TO, "code": "²³⁴⁵"},
        {"to": "0912", "code": "123456"},
        {"to": TO},
        {"to": TO, "code": 123456},
        {"to": TO, "code": "123456", "extra": 1},
    ],
)
async def test_bad_verifications_are_422(client: httpx.AsyncClient, body: dict) -> None:
    key = (await create_account(client, 1_000))["api_key"]
    problem = assert_problem(
        await client.post("/v1/otp/verify", json=body, headers=bearer(key)), 422
    )
    assert problem["code"] == "invalid_field"


async def test_verifying_needs_an_account_key(client: httpx.AsyncClient) -> None:
    body = {"to": TO, "code": "123456"}
    assert_problem(await client.post("/v1/otp/verify", json=body), 401)
    assert_problem(await client.post("/v1/otp/verify", json=body, headers=admin()), 403)


async def test_the_code_is_in_no_log_line(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = (await create_account(client, 1_000))["api_key"]
    r = await send_otp(client, key, code_length=8, template="Secret {code}")
    assert r.status_code == 200, r.text
    code = r.json()["code"]
    assert await verify(client, key, wrong(code)) == {"valid": False, "reason": "mismatch"}
    assert await verify(client, key, code) == {"valid": True}
    lines = [f"{record.getMessage()} {record.__dict__}" for record in caplog.records]
    assert any("/v1/otp/verify" in line for line in lines), "the access log was not captured"
    assert not [line for line in lines if code in line or "Secret 1" in line]


async def test_a_code_sent_through_one_node_verifies_on_another(
    database_url: str, schema: str
) -> None:
    async with balanced_nodes(database_url, schema, "a", "b") as (a, b):
        key = (await create_account(a.client, 1_000))["api_key"]
        r = await send_otp(a.client, key)
        assert r.status_code == 200, r.text
        code = r.json()["code"]
        assert await verify(b.client, key, wrong(code)) == {"valid": False, "reason": "mismatch"}
        assert await verify(b.client, key, code) == {"valid": True}
        assert await verify(a.client, key, code) == {"valid": False, "reason": "no_code"}
        # And the other way round, the redacted text seen from the node that did not send it.
        r = await send_otp(b.client, key)
        assert r.status_code == 200, r.text
        got = await a.client.get(f"/v1/messages/{r.json()['id']}", headers=bearer(key))
        assert got.json()["text"] == "Your code is ******"
        assert await verify(a.client, key, r.json()["code"]) == {"valid": True}


_MESSAGE = """
INSERT INTO messages (id, account_id, recipient, sender, body, segments, price, express,
                      status, created_at, updated_at)
VALUES ($1::uuid, 1, $2, 'smsgw', 'Your code is 123456', 1, 7, true, $3, now(), now())
"""


async def test_the_sweep_redacts_what_a_crash_left_and_purges_old_codes(
    database_url: str, schema: str
) -> None:
    """The store alone, as a node that died between an outcome and its redaction left it."""
    async with open_database(database_url, schema) as db:
        store = PgOtpStore(db)
        sent, queued, refused = uuid7(), uuid7(), uuid7()
        for message_id in (sent, queued, refused):  # each newer than the one before
            await store.issue(1, TO, message_id, "123456", "Your code is ******", 120.0)
        for message_id, status in ((sent, "sent"), (queued, "queued")):
            await db.run(lambda c, m=message_id, s=status: c.execute(_MESSAGE, m, TO, s))
        # The newest row whose message was stored is the live code: `refused` has none.
        assert await store.verify(1, TO, "654321", 5) == OtpVerdict(False, "mismatch")
        assert await store.verify(1, TO, "123456", 5) == OtpVerdict(True)

        # The final message is redacted; the queued one keeps its text until it is final.
        assert await store.sweep(100) == (1, 0)
        assert await stored_body(database_url, schema, sent) == "Your code is ******"
        assert await stored_body(database_url, schema, queued) == "Your code is 123456"
        assert await store.sweep(100) == (0, 0)
        await db.run(
            lambda c: c.execute("UPDATE messages SET status = 'failed' WHERE id = $1", queued)
        )
        assert await store.sweep(100) == (1, 0)
        assert await stored_body(database_url, schema, queued) == "Your code is ******"

        # Rows expired long ago go: one whose message never was stored, and a redacted one.
        stale, stale_sent = uuid7(), uuid7()
        for message_id in (stale, stale_sent):
            await store.issue(2, TO, message_id, "123456", "Your code is ******", -2 * 3600.0)
        await db.run(lambda c: c.execute(_MESSAGE, stale_sent, TO, "sent"))
        assert await store.sweep(100) == (1, 2)
        rows = await db_fetch(database_url, schema, "SELECT message_id::text FROM otp_codes")
        assert {r["message_id"] for r in rows} == {sent, queued, refused}
