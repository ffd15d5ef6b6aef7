"""The client's Structs (smsgw.client.models) against the OpenAPI document the gateway
serves: every field of each answer schema, its type and whether it is required, must be the
client's too; a request Struct may only send what the schema takes. Changing one side alone
fails here."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from smsgw import client as sms
from smsgw.http.app import OPERATIONS
from smsgw.http.openapi import document

# The client's answer Structs and the schema each mirrors.
ANSWERS: dict[type[msgspec.Struct], str] = {
    sms.Accepted: "AcceptedOut",
    sms.Message: "MessageOut",
    sms.MessageEvent: "MessageEvent",
    sms.MessageEvents: "MessageEventsOut",
    sms.MessagePage: "MessagePage",
    sms.BatchItemError: "BatchItemError",
    sms.BatchResult: "BatchResultOut",
    sms.BatchResponse: "BatchOut",
    sms.SummaryGroup: "SummaryGroup",
    sms.SummaryTotals: "SummaryTotals",
    sms.Summary: "SummaryOut",
    sms.Account: "AccountOut",
    sms.AccountCreated: "AccountCreatedOut",
    sms.Balance: "BalanceOut",
}
# Fields the client leaves out on purpose: deprecated ones, kept by the gateway for older
# clients.
LEFT_OUT = {"SummaryOut": {"from", "to"}}
# Request Structs: the client sends a subset of what the schema takes (`wait` has its own
# method, `send_and_wait`).
REQUESTS: dict[type[msgspec.Struct], str] = {sms.OutgoingMessage: "SendIn"}
# Fields the client always sends though the schema does not require them: it sends no
# one-time codes, the one kind of send without `text`.
ALWAYS_SENT = {"SendIn": {"text"}}
NAMES = {kind.__name__: name for kind, name in {**ANSWERS, **REQUESTS}.items()}


def shape(schema: dict[str, Any]) -> Any:
    """What a JSON Schema says about the values' types, without constraints, descriptions or
    defaults (the gateway validates; the client only decodes): comparable across documents."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return ("ref", NAMES.get(name, name))
    if "anyOf" in schema:
        return ("any", frozenset(shape(s) for s in schema["anyOf"]))
    if "enum" in schema:
        return ("enum", frozenset(schema["enum"]))
    kind = schema.get("type")
    if kind == "array":
        return ("array", shape(schema["items"]))
    if kind == "object" and "additionalProperties" in schema:
        extra = schema["additionalProperties"]
        return ("map", shape(extra) if isinstance(extra, dict) else extra)
    if kind == "string" and schema.get("format") == "date-time":
        return ("string", "date-time")
    return kind


def fields(schema: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    return (
        {name: shape(s) for name, s in schema.get("properties", {}).items()},
        set(schema.get("required", [])),
    )


@pytest.fixture(scope="module")
def served() -> dict[str, Any]:
    return dict(document(OPERATIONS)["components"]["schemas"])


@pytest.fixture(scope="module")
def mine() -> dict[str, Any]:
    kinds = [*ANSWERS, *REQUESTS, sms.StatusCallback]
    _, components = msgspec.json.schema_components(kinds)
    return components


@pytest.mark.parametrize("kind", list(ANSWERS), ids=lambda k: k.__name__)
def test_each_answer_struct_is_its_schema(
    kind: type[msgspec.Struct], served: dict[str, Any], mine: dict[str, Any]
) -> None:
    name = ANSWERS[kind]
    theirs, their_required = fields(served[name])
    ours, our_required = fields(mine[kind.__name__])
    left_out = LEFT_OUT.get(name, set())
    assert set(ours) == set(theirs) - left_out, f"{kind.__name__} and {name} name other fields"
    for field_name, field_shape in ours.items():
        assert field_shape == theirs[field_name], (kind.__name__, field_name)
    assert our_required == their_required - left_out, (kind.__name__, "required")


@pytest.mark.parametrize("kind", list(REQUESTS), ids=lambda k: k.__name__)
def test_each_request_struct_sends_what_its_schema_takes(
    kind: type[msgspec.Struct], served: dict[str, Any], mine: dict[str, Any]
) -> None:
    name = REQUESTS[kind]
    theirs, their_required = fields(served[name])
    ours, our_required = fields(mine[kind.__name__])
    assert set(ours) <= set(theirs), f"{kind.__name__} sends fields {name} refuses"
    assert their_required <= set(ours)
    assert our_required == their_required | ALWAYS_SENT.get(name, set())
    for field_name, field_shape in ours.items():
        assert field_shape == theirs[field_name], (kind.__name__, field_name)


def test_the_comparison_catches_a_difference(served: dict[str, Any]) -> None:
    """The check above can fail: a Struct with a field renamed, or typed otherwise, differs."""

    class Renamed(msgspec.Struct):
        id: str
        status: str
        segments: int
        cost: int

    class Retyped(msgspec.Struct):
        id: str
        status: str
        segments: str
        price: int

    _, components = msgspec.json.schema_components([Renamed, Retyped])
    accepted = fields(served["AcceptedOut"])
    assert fields(components["Renamed"]) != accepted
    assert fields(components["Retyped"]) != accepted


async def test_the_served_document_is_the_one_compared(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.json()["components"]["schemas"] == document(OPERATIONS)["components"]["schemas"]
