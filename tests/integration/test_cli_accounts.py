"""`smsgw accounts create|list|show|topup|rotate-key|suspend|resume` as a user runs them: a
process of its own on DATABASE_URL, in a fresh schema; exit statuses, one-line errors, no
secret shown twice."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys

import asyncpg


def smsgw(database_url: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "SMSGW_SCHEMA": schema}
    return subprocess.run(
        [sys.executable, "-m", "smsgw.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_accounts_commands(database_url: str, schema: str) -> None:
    made = smsgw(database_url, schema, "accounts", "create", "acme", "--credit", "100")
    assert made.returncode == 0, made.stderr
    account = json.loads(made.stdout)
    secret, key = account["signing_secret"], account["api_key"]
    assert account["balance"] == 100 and key
    # The form Standard Webhooks libraries take: `whsec_` and base64 (of 48 bytes).
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 48
    account_id = str(account["id"])

    listed = smsgw(database_url, schema, "accounts", "list")
    assert listed.returncode == 0, listed.stderr
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["id"], row["name"], row["balance"]) == (account["id"], "acme", 100)

    topped = smsgw(database_url, schema, "accounts", "topup", account_id, "50")
    assert topped.returncode == 0, topped.stderr
    assert json.loads(topped.stdout) == {"id": account["id"], "balance": 150}

    rotated = smsgw(database_url, schema, "accounts", "rotate-key", account_id, "-v")
    assert rotated.returncode == 0, rotated.stderr
    new_key = json.loads(rotated.stdout)["api_key"]
    assert new_key.startswith("sk_") and new_key != key

    shown = smsgw(database_url, schema, "accounts", "show", account_id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["balance"] == 150
    assert json.loads(shown.stdout)["suspended"] is False

    for action, suspended in (("suspend", True), ("resume", False)):
        changed = smsgw(database_url, schema, "accounts", action, account_id)
        assert changed.returncode == 0, changed.stderr
        assert json.loads(changed.stdout)["suspended"] is suspended
    # A key or a secret is shown once, when made: never by list or show.
    for run in (listed, shown, topped):
        for value in (secret, key, new_key):
            assert value not in run.stdout + run.stderr


def test_bad_input_is_one_line_without_a_traceback(database_url: str, schema: str) -> None:
    made = smsgw(database_url, schema, "accounts", "create", "acme", "--credit", "1")
    assert made.returncode == 0, made.stderr
    account = json.loads(made.stdout)
    runs = [
        smsgw(database_url, schema, "accounts", "create", "x", "--credit", "-5"),
        smsgw(database_url, schema, "accounts", "show", "999999"),
        smsgw(database_url, schema, "accounts", "topup", "999999", "5"),
        smsgw(database_url, schema, "accounts", "rotate-key", "999999"),
        smsgw(database_url, schema, "accounts", "suspend", "999999"),
        smsgw(database_url, schema, "accounts", "topup", str(account["id"]), str(2**63 - 1)),
    ]
    for run in runs:
        assert run.returncode == 2, (run.args, run.stderr)
        assert run.stdout == ""
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "Traceback" not in run.stderr and account["signing_secret"] not in run.stderr
    balance = json.loads(smsgw(database_url, schema, "accounts", "show", str(account["id"])).stdout)
    assert balance["balance"] == 1  # the refused top-up changed nothing


def test_rebuild_rollups(database_url: str, schema: str) -> None:
    """Rows loaded around the group commit (as a bulk load or a repair would meet them) are
    counted once rebuilt: three messages in two groups."""
    made = smsgw(database_url, schema, "accounts", "create", "acme", "--credit", "100")
    assert made.returncode == 0, made.stderr
    account_id = json.loads(made.stdout)["id"]

    async def load() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"SET search_path TO {schema}")
            await conn.execute(
                "INSERT INTO messages (id, account_id, recipient, sender, body, segments, price,"
                " express, status, created_at, updated_at)"
                " SELECT uuid7_at(now()), $1, '+989121234567', 'Shop', 'hi', 1, 5, false,"
                " s, now(), now() FROM unnest(ARRAY['sent', 'sent', 'failed']) AS s",
                account_id,
            )
        finally:
            await conn.close()

    asyncio.run(load())
    rebuilt = smsgw(database_url, schema, "rebuild-rollups", "--account", str(account_id))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout) == {"account": account_id, "rollup_rows": 2}
    everyone = smsgw(database_url, schema, "rebuild-rollups")
    assert everyone.returncode == 0, everyone.stderr
    assert json.loads(everyone.stdout) == {"account": None, "rollup_rows": 2}
    bad = smsgw(database_url, schema, "rebuild-rollups", "--account", "zero")
    assert bad.returncode == 2 and "account id" in bad.stderr, bad.stderr
