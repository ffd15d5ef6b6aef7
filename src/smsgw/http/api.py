"""Routes declared once: each handler's quart rule and its OpenAPI operation, side by side.

A route module makes an `Api` (a quart Blueprint and the operations registered on it) and
declares each handler with `@api.route(method, rule, summary, ...)`, saying who may call it,
its request body, its query parameters, its answers. The decorator registers the handler
exactly as quart's own `@bp.get` does (the handler is the view: it adds nothing per request)
and records an `Operation`, from which http/openapi.py builds the document: a route is
served and documented by one declaration (tests/integration/test_openapi.py fails on a route
registered around it).

Path parameters are the rule's (`/v1/messages/<message_id>`), their schemas the handler's own
annotations (`message_id: MessageId`). Query parameters are a msgspec Struct (`query=`), whose
fields are both the document's parameters and what `Gateway.query` decodes `request.args`
into (http/params.py); the handler decodes them itself, after it has checked the caller's
key, as it decodes its body with `Gateway.body`. A description or deprecation declared on a
parameter's type (`msgspec.Meta(description=..., extra_json_schema={"deprecated": True})`)
is the parameter's.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec
from quart import Blueprint, Response

from smsgw.http.params import query_decoder, query_fields

Auth = Literal["none", "account", "admin", "operator"]
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
# The document's tags, in the order it lists them; every operation has one of these.
TAGS = ("accounts", "opt-outs", "messages", "otp", "reports", "delivery", "ops")
# How the document refers to a Struct's schema (in a `Content` schema, say).
REF = "#/components/schemas/{name}"
H = TypeVar("H", bound=Callable[..., Awaitable[Response]])


@dataclass(frozen=True)
class Content:
    """A body that is not a JSON Struct: `schema` is a JSON Schema dict (its `$ref`s may name
    any Struct in `refs`, which are then added to the components) or None for any body."""

    media_type: str
    schema: dict[str, Any] | None = None
    refs: tuple[type, ...] = ()


@dataclass(frozen=True)
class Param:
    """A path or query parameter; `schema` is a type msgspec can describe (with
    `Annotated[..., msgspec.Meta(...)]` constraints)."""

    name: str
    location: Literal["path", "query"]
    schema: Any = str
    required: bool = False


@dataclass(frozen=True)
class Operation:
    """One documented route. `responses` maps each success status to a Struct type, a
    `Content`, or None (no body). Problem statuses (application/problem+json) are added by
    `problem_statuses`; `problems` names any others the handler raises."""

    method: Method
    path: str  # OpenAPI style: /v1/messages/{message_id}
    summary: str
    tag: str
    auth: Auth = "account"
    body: Any = None  # a Struct type, or a Content
    responses: Mapping[int, Any] = field(default_factory=lambda: {200: None})
    problems: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()  # path parameters, then query parameters
    # Takes an Idempotency-Key header (http/idempotency.py). None: POST routes of accounts.
    idempotent: bool | None = None
    description: str = ""
    # An example request body (the document's media type `example`; schemathesis sends it in
    # its explicit phase, so a route whose valid bodies random generation rarely hits, such
    # as a send's `to`, is still reached).
    example: Any = None
    # More example bodies by name, for a route whose bodies take several shapes (with them,
    # the document has the media type's `examples`, `example` among them as "default").
    examples: Mapping[str, Any] = field(default_factory=dict)

    @property
    def takes_idempotency_key(self) -> bool:
        if self.idempotent is None:
            return self.method == "POST" and self.auth == "account"
        return self.idempotent

    def problem_statuses(self) -> list[int]:
        """Every problem status this route can answer, from its shape and `problems`."""
        statuses = {500, *self.problems}
        if self.auth != "none":
            statuses |= {401, 403}
        if self.auth == "account":
            statuses.add(429)  # the per-account request rate
        if self.body is not None:
            statuses |= {400, 413, 415, 422}
        if "{" in self.path:
            statuses.add(404)
        if any(p.location == "query" for p in self.params):
            statuses.add(422)
        if self.takes_idempotency_key:
            statuses |= {409, 422}
        return sorted(statuses)


class Api:
    """A group of routes: the quart Blueprint that serves them (`blueprint`, registered on
    the app) and their operations, in the order they were declared (`operations`)."""

    def __init__(self, name: str, import_name: str, *, tag: str) -> None:
        self.blueprint = Blueprint(name, import_name)
        self.tag = tag
        self.operations: list[Operation] = []

    def route(
        self,
        method: Method,
        rule: str,
        summary: str,
        *,
        tag: str | None = None,
        auth: Auth = "account",
        body: Any = None,
        query: type[msgspec.Struct] | None = None,
        responses: Mapping[int, Any] | None = None,
        problems: tuple[int, ...] = (),
        idempotent: bool | None = None,
        description: str = "",
        example: Any = None,
        examples: Mapping[str, Any] | None = None,
    ) -> Callable[[H], H]:
        """Serve the decorated handler at `method` `rule` (a werkzeug rule) and document it.
        Raises at import, not at a request, when the declaration is incomplete: a tag the
        document does not list, a path parameter the handler does not annotate, a query
        field `Gateway.query` cannot read."""
        tag = tag or self.tag
        if tag not in TAGS:
            raise ValueError(f"{method} {rule}: tag {tag!r} is not one of {TAGS}")
        query_params: tuple[Param, ...] = ()
        if query is not None:
            query_decoder(query)  # built now, so that a field it cannot read fails here
            query_params = tuple(
                Param(f.name, "query", f.type, f.required) for f in query_fields(query)
            )

        def register(handler: H) -> H:
            hints = typing.get_type_hints(handler, include_extras=True)
            path_params = []
            for name in _RULE_PARAM.findall(rule):
                if name not in hints:
                    raise TypeError(f"{method} {rule}: annotate {handler.__name__}'s `{name}`")
                path_params.append(Param(name, "path", hints[name], required=True))
            self.operations.append(
                Operation(
                    method,
                    rule_to_path(rule),
                    summary,
                    tag,
                    auth=auth,
                    body=body,
                    responses={200: None} if responses is None else responses,
                    problems=problems,
                    params=(*path_params, *query_params),
                    idempotent=idempotent,
                    description=description,
                    example=example,
                    examples=examples or {},
                )
            )
            self.blueprint.add_url_rule(rule, handler.__name__, handler, methods=[method])
            return handler

        return register


# A werkzeug rule's variables: `<int(max=9):account_id>` names `account_id`.
_RULE_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def rule_to_path(rule: str) -> str:
    """A werkzeug URL rule as an OpenAPI path: `/a/<int:id>` -> `/a/{id}`."""
    return _RULE_PARAM.sub(r"{\1}", rule)
