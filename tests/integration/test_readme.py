"""The README's "Running a gateway" commands, run as written (on a free port instead of 8080,
against the test's database): serve, wait for it, create an account, send."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running a gateway", 1)[1]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, "no sh block under 'Running a gateway'"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_quick_start_serves_and_sends(database_url: str, schema: str) -> None:
    block = quick_start()
    assert "8080" in block and "serve" in block
    script = block.replace("8080", str(free_port()))
    env = {**os.environ, "DATABASE_URL": database_url, "SMSGW_SCHEMA": schema}
    env.pop("SMSGW_ADMIN_KEY", None)  # the block sets its own
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n{script}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sent = json.loads(done.stdout.strip().splitlines()[-1])
    assert sent["status"] == "queued" and sent["id"], sent
    assert ADMIN_KEY != "adm_local"  # the block's own key was used, not the tests'
