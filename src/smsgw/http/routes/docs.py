"""The API's own description: the OpenAPI document and a page that shows it."""

from __future__ import annotations

from importlib import resources

import msgspec
from quart import Blueprint, Response, current_app

from smsgw.http.openapi import ROUTES, document

bp = Blueprint("docs", __name__)

# The page runs one inline script and loads nothing from elsewhere.
_DOCS_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self'"
)


@bp.get("/openapi.json")
async def openapi_json() -> Response:
    body = current_app.extensions.get("smsgw.openapi")
    if body is None:  # built once per app, on first use
        body = current_app.extensions["smsgw.openapi"] = msgspec.json.encode(document(ROUTES))
    return Response(body, content_type="application/json")


@bp.get("/docs")
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
