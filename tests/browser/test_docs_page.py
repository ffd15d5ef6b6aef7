"""GET /docs (the API reference page) in a real Chromium: it draws the whole document with
nothing fetched but its own node's /openapi.json."""

from __future__ import annotations

from typing import Any

import httpx

from tests.browser.conftest import Browser, ServedNode
from tests.browser.test_console import only_local


async def test_the_docs_page_renders_with_no_network(
    browser: Browser, served: ServedNode, client: httpx.AsyncClient
) -> None:
    operations = sum(
        1
        for methods in (await client.get("/openapi.json")).json()["paths"].values()
        for method in methods
        if method in ("get", "post", "put", "patch", "delete")
    )
    requests: list[str] = []
    errors: list[str] = []

    def check(context: Any) -> dict[str, Any]:
        page = context.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(served.url + "/docs")
        page.wait_for_selector("details.op", timeout=10_000)
        shown = {
            "ops": page.locator("details.op > summary > .method").count(),
            "paths": page.eval_on_selector_all(".path", "els => els.map(e => e.textContent)"),
            "error": page.inner_text("#error"),
        }
        page.close()
        return shown

    shown = await browser.run(check)
    assert only_local(requests) == [], requests
    assert errors == [] and shown["error"] == ""
    assert shown["ops"] == operations
    assert {"/ops", "/v1/ops/console", "/v1/messages"} <= set(shown["paths"])
