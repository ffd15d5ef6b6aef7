"""GET /openapi.json and GET /docs on a running node; every route is documented, and decodes
the query parameters its operation documents."""

from __future__ import annotations

import re

import httpx

from smsgw.http.api import rule_to_path
from smsgw.http.app import OPERATIONS, create_app
from smsgw.http.openapi import document
from smsgw.runtime.server import Node
from tests.conftest import ADMIN_KEY, admin, bearer
from tests.integration.helpers import assert_problem, create_account

# Framework routes that are not the API's.
NOT_API = {"static"}


async def test_the_document_is_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == document(OPERATIONS)
    assert r.headers["x-request-id"]


async def test_every_route_is_documented_and_every_operation_served(node: Node) -> None:
    """A route registered around `Api.route` (a blueprint's own decorator, say), or an `Api`
    the app does not list in APIS, fails here: the document and schemathesis would miss it."""
    app = create_app(node.engine, node.store, admin_key=ADMIN_KEY)
    served: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in NOT_API:
            continue
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((method, rule_to_path(rule.rule)))
    documented = {(op.method, op.path) for op in OPERATIONS}
    assert served - documented == set(), "declare these routes with Api.route"
    assert documented - served == set(), "these operations have no route"


async def test_each_route_decodes_the_query_parameters_it_documents(
    client: httpx.AsyncClient,
) -> None:
    """The handler decodes its query with the Struct its operation declares: an unknown
    parameter's 422 lists what the route takes, which is what the document says."""
    key = (await create_account(client, 100))["api_key"]
    checked = 0
    for path, item in document(OPERATIONS)["paths"].items():
        for method, op in item.items():
            names = sorted(p["name"] for p in op["parameters"] if p.get("in") == "query")
            if not names:
                continue
            assert "{" not in path and method == "get", (method, path)
            headers = admin() if op["security"] == [{"adminKey": []}] else bearer(key)
            r = await client.get(path, params={"unknown": "1"}, headers=headers)
            problem = assert_problem(r, 422)
            assert problem["field"] == "unknown", problem
            listed = problem["detail"].split("this route takes ")[1]
            assert listed == ", ".join(f"`{name}`" for name in names), (path, problem)
            checked += 1
    assert checked == 8


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
