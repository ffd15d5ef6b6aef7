"""GET /openapi.json and GET /docs on a running node; the route table covers every route."""

from __future__ import annotations

import re

import httpx

from smsgw.http.app import create_app
from smsgw.http.openapi import ROUTES, document, rule_to_path
from smsgw.server import Node
from tests.conftest import ADMIN_KEY

# Framework routes that are not the API's.
NOT_API = {"static"}


async def test_the_document_is_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == document()
    assert r.headers["x-request-id"]


async def test_every_route_is_in_the_table_and_every_row_is_a_route(node: Node) -> None:
    """A route added without a row in http/openapi.py's ROUTES (or a row left behind by a
    removed route) fails here: the document and schemathesis would miss it."""
    app = create_app(node.engine, node.store, admin_key=ADMIN_KEY)
    served: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in NOT_API:
            continue
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((method, rule_to_path(rule.rule)))
    documented = {(route.method, route.path) for route in ROUTES}
    assert served - documented == set(), "add these routes to ROUTES in http/openapi.py"
    assert documented - served == set(), "these ROUTES rows have no route"


async def test_the_docs_page_is_self_contained(client: httpx.AsyncClient) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'fetch("/openapi.json")' in page
    # Nothing from elsewhere: no external script, style, font or image (the network may be
    # closed where the gateway runs), and the CSP says so to the browser too.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"@import|url\(", page)
    assert "default-src 'none'" in r.headers["content-security-policy"]
