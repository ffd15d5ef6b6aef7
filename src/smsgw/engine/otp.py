"""One-time codes: how a code is made and put into its text, and the sweep that keeps codes
out of stored message bodies after a crash.

A code is digits from `secrets` (a CSPRNG), sent as an express message; the store keeps only
a salted hash of it (storage/otp.py), in PostgreSQL, so a code sent through one node verifies
on any. The message's stored text is redacted (the code's digits as '*') once the message is
final: by the request that sent it, as soon as it has its outcome, and otherwise by
`OtpSweeper` (the node died between the outcome and the redaction).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import trio

from smsgw.engine.ports import OtpStore

log = logging.getLogger("smsgw.otp")

PLACEHOLDER = "{code}"
DEFAULT_TEMPLATE = "Your code is {code}"
DEFAULT_CODE_LENGTH = 6
MIN_CODE_LENGTH, MAX_CODE_LENGTH = 4, 8
MAX_TEMPLATE_LENGTH = 500
# Wrong codes in a row after which a code is invalidated: with 6 digits, a guesser's chance
# is 5 in a million per code sent.
MAX_ATTEMPTS = 5


def template_problem(template: str) -> str | None:
    """None when `template` can carry a code, else what is wrong, in words a person can act
    on."""
    count = template.count(PLACEHOLDER)
    if count != 1:
        return f"must contain {PLACEHOLDER} exactly once (it has it {count} times)"
    return None


def new_code(length: int) -> str:
    """`length` decimal digits from the OS's CSPRNG; leading zeros are kept."""
    return f"{secrets.randbelow(10**length):0{length}d}"


def render(template: str, code: str) -> str:
    return template.replace(PLACEHOLDER, code)


def redacted(template: str, length: int) -> str:
    """The text as stored once the message is final: the code's digits as '*'."""
    return template.replace(PLACEHOLDER, "*" * length)


def ascii_code(code: str) -> str | None:
    """`code` in ASCII digits (a person may type Persian or Arabic-Indic ones), or None when
    it is not MIN_CODE_LENGTH to MAX_CODE_LENGTH decimal digits."""
    if not MIN_CODE_LENGTH <= len(code) <= MAX_CODE_LENGTH or not code.isdecimal():
        return None
    return "".join(str(int(c)) for c in code)


class OtpSweeper:
    """Now and then, redacts the stored text of final OTP messages that their request did
    not redact (its node died first), and deletes code rows long expired. Every node runs
    one; the store lets them share the work (rows locked by another node are skipped)."""

    def __init__(self, store: OtpStore, *, every_s: float = 5.0, batch: int = 1_000) -> None:
        self._store = store
        self._every = every_s
        self._batch = batch
        self.redacted = 0
        self.purged = 0
        self.runs = 0
        self.last_error: str | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "redacted": self.redacted,
            "purged": self.purged,
            "runs": self.runs,
            "last_error": self.last_error,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep every `every_s` seconds until cancelled; a failed sweep (PostgreSQL away) is
        logged and tried again at the next tick."""
        task_status.started()
        while True:
            await trio.sleep(self._every)
            await self.sweep_once()

    async def sweep_once(self) -> None:
        try:
            redacted, purged = await self._store.sweep(self._batch)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("sweeping one-time codes failed: %s", self.last_error)
        else:
            self.redacted += redacted
            self.purged += purged
        self.runs += 1
