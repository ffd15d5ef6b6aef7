"""The OpenAPI document as built from the routes' operations (no server)."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
import pytest
import schemathesis
from quart import Response

from smsgw.engine import sms as rules
from smsgw.http.api import Api, rule_to_path
from smsgw.http.app import OPERATIONS
from smsgw.http.openapi import document

DOC = document(OPERATIONS)
DOC_OPERATIONS = [
    (path, method, op) for path, item in DOC["paths"].items() for method, op in item.items()
]


def test_it_is_openapi_3_1_and_schemathesis_loads_it() -> None:
    assert DOC["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(DOC)
    loaded = [result.ok() for result in schema.get_all_operations()]
    assert len(loaded) == len(OPERATIONS) == len(DOC_OPERATIONS)


@pytest.mark.parametrize(("path", "method", "op"), DOC_OPERATIONS, ids=lambda v: str(v)[:40])
def test_every_error_is_a_problem(path: str, method: str, op: dict) -> None:
    statuses = [int(s) for s in op["responses"]]
    assert 500 in statuses
    for status, response in op["responses"].items():
        if int(status) >= 400:
            assert response["content"] == {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }, (path, method, status)
        assert "X-Request-Id" in response["headers"]
    for status in ("429", "503"):
        if status in op["responses"]:
            assert "Retry-After" in op["responses"][status]["headers"]


def test_security_names_the_key_each_route_needs() -> None:
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["accountKey"] == schemes["accountKey"] | {"type": "http", "scheme": "bearer"}
    assert schemes["adminKey"]["scheme"] == "bearer"
    ops = {(m.upper(), p): op for p, m, op in DOC_OPERATIONS}
    assert ops[("POST", "/v1/messages")]["security"] == [{"accountKey": []}]
    assert ops[("POST", "/v1/accounts")]["security"] == [{"adminKey": []}]
    assert ops[("GET", "/health")]["security"] == []
    # Authenticated routes can refuse the key; only account routes are rate limited.
    assert {"401", "403", "429"} <= set(ops[("GET", "/v1/account")]["responses"])
    assert "429" not in ops[("GET", "/v1/ops/supervisor")]["responses"]


def test_account_posts_take_an_idempotency_key() -> None:
    ref = {"$ref": "#/components/parameters/IdempotencyKey"}
    ops = {(m.upper(), p): op for p, m, op in DOC_OPERATIONS}
    assert ref in ops[("POST", "/v1/messages")]["parameters"]
    assert "409" in ops[("POST", "/v1/messages")]["responses"]
    assert ref not in ops[("POST", "/v1/accounts")]["parameters"]  # admin: not idempotent
    assert ref not in ops[("GET", "/v1/account")]["parameters"]


def test_bodies_are_the_handlers_structs() -> None:
    ops = {(m.upper(), p): op for p, m, op in DOC_OPERATIONS}
    send = ops[("POST", "/v1/messages")]
    assert send["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SendIn"
    }
    assert send["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AcceptedOut"
    }
    components = DOC["components"]["schemas"]
    assert components["SendIn"]["additionalProperties"] is False
    # `text` is required unless `otp` (the handler says so): the schema cannot say "unless".
    assert set(components["SendIn"]["required"]) == {"to"}


def test_path_parameters_are_declared() -> None:
    ops = {(m.upper(), p): op for p, m, op in DOC_OPERATIONS}
    (param, *_) = ops[("POST", "/v1/accounts/{account_id}/topups")]["parameters"]
    assert param == {
        "name": "account_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    }
    # A description on the handler's annotation is the parameter's.
    (name, *_) = ops[("POST", "/v1/ops/operators/{name}/drain")]["parameters"]
    assert name == {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "the operator's name",
    }


def test_a_path_parameter_the_handler_does_not_annotate_fails_when_declared() -> None:
    api = Api("t", __name__, tag="ops")
    with pytest.raises(TypeError, match="annotate"):

        @api.route("GET", "/x/<thing>", "x")
        async def x(thing) -> Response:  # type: ignore[no-untyped-def]
            raise AssertionError

    assert api.operations == []
    with pytest.raises(ValueError, match="tag"):
        api.route("GET", "/y", "y", tag="nowhere")


class Query(msgspec.Struct):
    limit: Annotated[int, msgspec.Meta(description="how many")] | None = None
    old: (
        Annotated[str, msgspec.Meta(description="was", extra_json_schema={"deprecated": True})]
        | None
    ) = None


def test_query_params_are_the_fields_of_the_query_struct() -> None:
    api = Api("t", __name__, tag="ops")

    @api.route("GET", "/x", "x", query=Query)
    async def x() -> Response:
        raise AssertionError

    op = document(api.operations)["paths"]["/x"]["get"]
    assert op["parameters"][:2] == [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer"},
            "description": "how many",
        },
        {
            "name": "old",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "was",
            "deprecated": True,
        },
    ]
    assert "422" in op["responses"]


class Unreadable(msgspec.Struct):
    ratio: float = 1.0


def test_a_query_field_the_decoder_cannot_read_fails_when_declared() -> None:
    api = Api("t", __name__, tag="ops")
    with pytest.raises(TypeError, match="ratio"):
        api.route("GET", "/x", "x", query=Unreadable)
    assert api.operations == []


@pytest.mark.parametrize(
    "to",
    [
        "+4915123456789",
        "+1234567",
        "4915123456789",
        "+0123456789",
        "+49 151",
        "+1234567890123456",
        "+12345a7",
    ],
)
def test_the_recipient_pattern_says_what_the_rule_checks(to: str) -> None:
    # GET /v1/messages?to= takes the stored (E.164) form; a send's `to` takes national forms
    # too, which no pattern says (tests/unit/test_numbers.py).
    params = DOC["paths"]["/v1/messages"]["get"]["parameters"]
    pattern = next(p for p in params if p["name"] == "to")["schema"]["pattern"]
    assert bool(re.fullmatch(pattern, to)) == (rules.recipient_problem(to) is None)


@pytest.mark.parametrize(
    "sender",
    [
        "smsgw",
        "ACME Ltd",
        "a.b_c-d",
        "TwelveChars1",
        "+4915123456789",
        "1234567890123456",
        "ab!",
        "",
    ],
)
def test_the_sender_pattern_says_what_the_rule_checks(sender: str) -> None:
    prop = DOC["components"]["schemas"]["SendIn"]["properties"]["sender"]["anyOf"][0]
    assert bool(re.fullmatch(prop["pattern"], sender)) == (rules.sender_problem(sender) is None)


def test_rule_to_path() -> None:
    assert rule_to_path("/v1/accounts/<int(max=9):account_id>/topups") == (
        "/v1/accounts/{account_id}/topups"
    )
    assert rule_to_path("/v1/messages/<message_id>") == "/v1/messages/{message_id}"
    assert rule_to_path("/health") == "/health"
