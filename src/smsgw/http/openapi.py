"""The OpenAPI 3.1 document: built from the routes' operations and the msgspec Structs they use.

Why msgspec's own `msgspec.json.schema_components` and not quart-schema: the handlers already
decode and encode with msgspec Structs (`http/schemas.py`), and msgspec writes JSON Schema
2020-12, which OpenAPI 3.1 uses as is. quart-schema would describe the same bodies a second
time with pydantic models or dataclasses, and two schema systems drift apart. Here a Struct
is declared once and is both what the handler validates and what the document says.

Each route declares its operation where its handler is (`Api.route`, http/api.py); the app
lists the route modules (http/app.py, `OPERATIONS`), and `test_schemathesis.py` checks the
running app against the document.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from smsgw.http.api import REF, TAGS, Auth, Content, Operation, Param
from smsgw.http.problems import TITLES
from smsgw.http.schemas import Problem

API_VERSION = "2.4.0"
# What changed in each version of the HTTP contract, newest first (info.description).
CHANGES = (
    (
        "2.4.0",
        "GET /v1/reports/summary groups by `operator`, `sender` or `country` (the recipient's"
        " calling code, `98`) as well, and takes `tz` (an IANA zone, default UTC) for the days"
        " of group_by=day; the answer says its `tz`. It reads rollups kept with every write:"
        " as fast for a month as for a day, and exact for any range.",
    ),
    (
        "2.3.0",
        "Scheduled sends: `send_at` (RFC 3339 with an offset, up to 30 days ahead) on"
        " POST /v1/messages, on a batch item, or on the batch for its items without one:"
        " status `scheduled` (a 202's and a batch result's), the price held at once, sent"
        " within a second of that time. Messages show `send_at` and the status `scheduled`"
        " (GET, lists, the CSV export's last column); summaries count `scheduled` (part of"
        " `pending`). POST /v1/messages/{message_id}/cancel cancels a scheduled message too,"
        " on any node. A validation problem names its body member in `field`.",
    ),
    (
        "2.2.0",
        'One-time codes: POST /v1/messages with `"otp": true` (and `template`, `code_length`'
        " instead of `text`, which is now required only without `otp`) sends a code the"
        " gateway makes, express, and answers as `wait` does with the `code`;"
        " POST /v1/otp/verify checks one.",
    ),
    (
        "2.1.0",
        "`to` takes national forms of the account's `default_country` (a new setting; IR"
        " unless set) with separators and Persian or Arabic-Indic digits, stored and answered"
        " as E.164; an E.164 `to` must have a length its country's plan allows. `from` is an"
        " alias of `sender`. PUT /v1/accounts/{account_id}/senders limits an account to the"
        " senders the admin allows (422 `sender_not_allowed`) and sets its default sender."
        " Opt-outs (/v1/account/opt-outs) and the gateway's blocklist (/v1/blocklist): a send"
        " to such a number is a 422 `opted_out` (a batch item `rejected` with that code).",
    ),
    (
        "2.0.0",
        "POST /v1/messages/batch answers one result shape, `{index, status: queued | duplicate"
        " | rejected, id?, segments?, price?, error?: {code, field, detail, status,"
        " retry_after?, price?}}`, with the counts `accepted`, `duplicates` and `rejected`"
        " (before: an accepted item without `index`, a refused one as a problem with an"
        " integer `status`). 202 when any item was stored, 200 when none was but some"
        " `client_ref`s were already used (those items are `duplicate`, with the existing"
        " message's `id`, as a single send answers 200 with it; before: a 409 problem item),"
        " 422 problem `nothing_accepted` carrying the same members when every item was refused"
        " (before: 202). An atomic batch whose every `client_ref` is taken answers 200 with"
        " each item `duplicate` (before: 409); its 422 `invalid_batch` carries `results` too."
        " GET /v1/reports/summary and GET /v1/messages/export take `created_from` and"
        " `created_to`, as GET /v1/messages does; their old names `from` and `to` are"
        " deprecated aliases (one name per end), and the summary answers `created_from` and"
        " `created_to` beside the deprecated `from` and `to`. Status callbacks are signed as"
        " Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`); the"
        " `X-Smsgw-*` signature headers are deprecated.",
    ),
    ("1.0.0", "The first published contract."),
)


# --- the builder ---------------------------------------------------------------------------


_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "none": [],
    "account": [{"accountKey": []}],
    "admin": [{"adminKey": []}],
    "operator": [{"operatorKey": []}],
}
_STATUS_TEXT = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content"}
_REQUEST_ID = "X-Request-Id"


def document(operations: Sequence[Operation], *, title: str = "smsgw") -> dict[str, Any]:
    """The OpenAPI 3.1 document of `operations`, as a JSON-ready dict."""
    types = _types(operations)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schema_of)
    used = {op.tag for op in operations}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": API_VERSION,
            "description": (
                "An SMS gateway: prepaid credit, fair dispatch, an express lane. Errors are"
                " application/problem+json (RFC 9457) with a stable `code`.\n\nChanges:\n"
                + "\n".join(f"- {version}: {change}" for version, change in CHANGES)
            ),
        },
        "tags": [{"name": t} for t in TAGS if t in used],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "accountKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An account's API key: `Authorization: Bearer sk_...`",
                },
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The node's admin key (SMSGW_ADMIN_KEY)",
                },
                "operatorKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "An operator's delivery report key, set when the node starts"
                        " (`smsgw serve --dlr-key NAME=KEY` or SMSGW_DLR_KEYS)"
                    ),
                },
            },
            "parameters": {
                "IdempotencyKey": {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": (
                        "Retry safely: the same key with the same request within 24 hours"
                        " replays the first answer; with another request it is a 422."
                    ),
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 255,
                        "pattern": "^[ -~]+$",
                    },
                },
                "RequestId": {
                    "name": _REQUEST_ID,
                    "in": "header",
                    "required": False,
                    "description": (
                        "Your id for this request (1 to 128 of A-Z a-z 0-9 . _ : -), echoed"
                        " in the answer and the gateway's logs; another value is replaced by"
                        " one the gateway makes."
                    ),
                    "schema": {"type": "string"},
                },
            },
            "headers": {
                "RequestId": {
                    "description": "The request's id, as in the gateway's logs",
                    "schema": {"type": "string"},
                },
                "RetryAfter": {
                    "description": "Seconds to wait before trying again",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
            },
        },
    }


def _types(operations: Iterable[Operation]) -> list[Any]:
    """Every type the document describes, each once: Problem first, then in operation
    order."""
    seen: dict[Any, None] = {Problem: None}

    def add(kind: Any) -> None:
        if isinstance(kind, Content):
            for ref in kind.refs:
                seen.setdefault(ref, None)
        elif kind is not None:
            seen.setdefault(kind, None)

    for op in operations:
        add(op.body)
        for body in op.responses.values():
            add(body)
        for param in op.params:
            add(param.schema)
    return list(seen)


def _operation(op: Operation, schema_of: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": _operation_id(op),
        "summary": op.summary,
        "tags": [op.tag],
        "security": _SECURITY[op.auth],
    }
    if op.description:
        operation["description"] = op.description
    parameters = [_parameter(p, schema_of) for p in op.params]
    if op.takes_idempotency_key:
        parameters.append({"$ref": "#/components/parameters/IdempotencyKey"})
    parameters.append({"$ref": "#/components/parameters/RequestId"})
    operation["parameters"] = parameters
    if op.body is not None:
        operation["requestBody"] = {"required": True, "content": _content(op.body, schema_of)}
        named = dict(op.examples)
        if named and op.example is not None:
            named = {"default": op.example, **named}
        for media in operation["requestBody"]["content"].values():
            if named:
                media["examples"] = {name: {"value": value} for name, value in named.items()}
            elif op.example is not None:
                media["example"] = op.example
    responses: dict[str, Any] = {}
    for status, body in sorted(op.responses.items()):
        response: dict[str, Any] = {
            "description": _STATUS_TEXT.get(status, str(status)),
            "headers": {_REQUEST_ID: {"$ref": "#/components/headers/RequestId"}},
        }
        if body is not None:
            response["content"] = _content(body, schema_of)
        responses[str(status)] = response
    for status in op.problem_statuses():
        headers = {_REQUEST_ID: {"$ref": "#/components/headers/RequestId"}}
        if status in (429, 503):
            headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
        responses[str(status)] = {
            "description": TITLES.get(status, "Error"),
            "headers": headers,
            "content": {"application/problem+json": {"schema": schema_of[Problem]}},
        }
    operation["responses"] = responses
    return operation


def _parameter(param: Param, schema_of: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    """The parameter object; a description or deprecation its type declares is the
    parameter's, where OpenAPI puts them, not its schema's."""
    schema = dict(schema_of[param.schema])
    description = schema.pop("description", None)
    deprecated = schema.pop("deprecated", False)
    out: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "required": param.required,
        "schema": schema,
    }
    if description:
        out["description"] = description
    if deprecated:
        out["deprecated"] = True
    return out


def _content(body: Any, schema_of: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(body, Content):
        return {body.media_type: {} if body.schema is None else {"schema": body.schema}}
    return {"application/json": {"schema": schema_of[body]}}


def _operation_id(op: Operation) -> str:
    words = re.sub(r"[{}]", "", op.path).strip("/").replace(".", "_")
    return op.method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", words).strip("_")
