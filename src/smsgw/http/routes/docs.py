"""The API's own description: the OpenAPI document and a page that shows it."""

from __future__ import annotations

from importlib import resources

import msgspec
from quart import Response, current_app

from smsgw.http.api import Api, Content
from smsgw.http.openapi import document

api = Api("docs", __name__, tag="ops")
# The operations the document describes: every route the app serves (http/app.py).
OPERATIONS = "smsgw.operations"

# The page runs one inline script and loads nothing from elsewhere.
_DOCS_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self'"
)


@api.route(
    "GET",
    "/openapi.json",
    "This document",
    auth="none",
    responses={200: Content("application/json", {"type": "object"})},
)
async def openapi_json() -> Response:
    body = current_app.extensions.get("smsgw.openapi")
    if body is None:  # built once per app, on first use
        operations = current_app.extensions[OPERATIONS]
        body = current_app.extensions["smsgw.openapi"] = msgspec.json.encode(document(operations))
    return Response(body, content_type="application/json")


@api.route(
    "GET",
    "/docs",
    "A page that shows this document",
    auth="none",
    responses={200: Content("text/html", {"type": "string"})},
)
async def docs() -> Response:
    page = current_app.extensions.get("smsgw.docs")
    if page is None:
        page = resources.files("smsgw.http").joinpath("docs.html").read_bytes()
        current_app.extensions["smsgw.docs"] = page
    return Response(
        page,
        content_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": _DOCS_CSP},
    )
