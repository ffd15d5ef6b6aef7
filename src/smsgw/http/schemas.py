"""Wire schemas: what clients send and get back, validated at the edge by msgspec."""

from __future__ import annotations

from typing import Annotated

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Credit = Annotated[int, msgspec.Meta(ge=0, le=10**15)]
Amount = Annotated[int, msgspec.Meta(gt=0, le=10**15)]
ClientRef = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
# `to` and `sender` are checked by the handler against engine/sms.py's rules, with messages a
# person can act on; these patterns only say the same in the OpenAPI document
# (extra_json_schema is not validated by msgspec). tests/unit/test_openapi.py keeps them equal.
Recipient = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": r"^\+[1-9][0-9]{6,14}$"})]
Sender = Annotated[
    str, msgspec.Meta(extra_json_schema={"pattern": r"^([A-Za-z0-9 ._-]{1,11}|\+?[0-9]{1,15})$"})
]


class CreateAccountIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    credit: Credit = 0


class AccountCreatedOut(msgspec.Struct):
    id: int
    name: str
    api_key: str
    balance: int


class KeyRotatedOut(msgspec.Struct):
    account_id: int
    api_key: str


class TopUpIn(msgspec.Struct, forbid_unknown_fields=True):
    amount: Amount


class BalanceOut(msgspec.Struct):
    balance: int


class AccountOut(msgspec.Struct):
    id: int
    name: str
    balance: int
    held: int


class SendIn(msgspec.Struct, forbid_unknown_fields=True):
    to: Recipient
    text: Annotated[str, msgspec.Meta(extra_json_schema={"minLength": 1})]
    sender: Sender | None = None
    express: bool = False
    client_ref: ClientRef | None = None
    # Express only: answer once the operator took it (200, status sent) or the deadline passed
    # (504, failed and refunded), instead of 202 at accept.
    wait: bool = False


class AcceptedOut(msgspec.Struct):
    id: str
    status: str
    segments: int
    price: int


class AccountSettingsIn(msgspec.Struct, forbid_unknown_fields=True):
    """An account's scheduling and rate settings; a missing or null field is the default."""

    send_rate: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None
    express_deadline_ms: Annotated[int, msgspec.Meta(ge=100, le=600_000)] | None = None
    recipient_limit_per_hour: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    api_rate: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None


class AccountSettingsOut(msgspec.Struct):
    account_id: int
    send_rate: float | None
    express_deadline_ms: int | None
    recipient_limit_per_hour: int | None
    api_rate: float | None


MAX_BATCH = 1_000


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    # Items stay raw here: each is decoded on its own, so one bad item gets its own problem
    # result instead of failing the batch.
    messages: list[msgspec.Raw]
    atomic: bool = False


class BatchOut(msgspec.Struct):
    results: list[AcceptedOut | dict[str, object]]
