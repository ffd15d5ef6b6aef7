"""`serve --workers N` stops every worker on SIGTERM, also one that arrives while they start
(a script that gives up waiting): no worker is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.conftest import ADMIN_KEY


def workers_alive(tag: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"node-id {tag}-"], capture_output=True, text=True)
    return found.stdout.split()


def worker_commands(tag: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", f"node-id {tag}-"], capture_output=True, text=True)
    return found.stdout.splitlines()


def test_sigterm_between_two_workers_starting_stops_both(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    """SIGTERM once the first worker listens and the second is starting: a parent that died of
    it then (the default action, before it took signals) left the first one running."""
    tag = f"w{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SMSGW_SCHEMA": schema,
        "SMSGW_ADMIN_KEY": ADMIN_KEY,
    }
    command = [sys.executable, "-m", "smsgw.cli", "serve", "--workers", "2"]
    command += ["--host", "127.0.0.1", "--port", "0", "--node-id", tag]
    log = tmp_path / "serve.log"
    with log.open("w") as err:  # a file, as a shell script's redirect: no pipe to break
        parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        # The first worker listens and the parent has started the second (which it does once
        # it read the first's listening line).
        while not any(f"{tag}-1" in arguments for arguments in worker_commands(tag)):
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while workers_alive(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers_alive(tag) == []
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers_alive(tag):
            os.kill(int(pid), signal.SIGKILL)
