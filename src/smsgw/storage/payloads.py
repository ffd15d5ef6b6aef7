"""The NOTIFY payloads a group commit sends once committed, each within PostgreSQL's limit.

The handed-off messages go to their owners, the express outcomes (`Settled`) to every node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from smsgw.engine.messages import OutboundSms, Outcome, Settled

# NOTIFY payloads must stay under 8,000 bytes.
_PAYLOAD_LIMIT = 7_900
_sms_encoder = msgspec.json.Encoder()


def _packed(head: bytes, parts: Sequence[bytes]) -> list[str]:
    """`head` + a JSON list of `parts`, as many payloads as it takes to keep each within a
    NOTIFY's limit (each part fits one on its own)."""
    payloads: list[str] = []
    chunk: list[bytes] = []
    size = len(head) + 2
    for part in parts:
        if size + len(part) + 1 > _PAYLOAD_LIMIT and chunk:
            payloads.append((head + b"[" + b",".join(chunk) + b"]").decode())
            chunk, size = [], len(head) + 2
        chunk.append(part)
        size += len(part) + 1
    if chunk:
        payloads.append((head + b"[" + b",".join(chunk) + b"]").decode())
    return payloads


def settled_payloads(outcomes: Sequence[Outcome]) -> list[str]:
    """JSON lists of `Settled`, each within a NOTIFY's payload limit."""
    return _packed(b"", [_sms_encoder.encode(Settled.of(o)) for o in outcomes])


def owner_channel(channel: str, owner: str) -> str:
    """The channel of the hand-offs to one node (`channel`: its schema's, from
    cluster.channel_and_lock_class): only the owner listens there, so a hand-off wakes one
    node whatever the cluster's size, not every node to read its name and drop it."""
    return f"{channel}_{hashlib.sha256(owner.encode()).digest()[:8].hex()}"


def handoff_payloads(handed: dict[str, list[OutboundSms]]) -> list[tuple[str, str]]:
    """(owner, payload): `owner` + newline + a JSON list of the messages handed to it, cut
    to fit a NOTIFY (in bytes), for its channel (`owner_channel`). The owner dispatches them
    from the payload without a query; a message too large for a payload goes as an empty list
    ("claim now"), and the owner reads it with its claim. No owner ('') means a shard in
    transit: whoever takes it recovers the message."""
    payloads: list[tuple[str, str]] = []
    for owner, items in handed.items():
        if not owner:
            continue
        head = owner.encode() + b"\n"
        encoded = [_sms_encoder.encode(sms) for sms in items]
        fitting = [part for part in encoded if len(head) + len(part) + 2 <= _PAYLOAD_LIMIT]
        payloads += [(owner, p) for p in _packed(head, fitting)]
        if len(fitting) < len(encoded):
            payloads.append((owner, (head + b"[]").decode()))
    return payloads


def handoff_notices(
    channel: str, handed: dict[str, list[OutboundSms]]
) -> tuple[list[str], list[str]]:
    """The channels and payloads of NOTIFYs that tell `handed` (owner -> messages) to their
    owners (`channel`: the schema's hand-off channel)."""
    told = handoff_payloads(handed)
    return [owner_channel(channel, owner) for owner, _ in told], [p for _, p in told]
