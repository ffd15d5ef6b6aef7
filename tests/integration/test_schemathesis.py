"""Schemathesis against a running node: every operation in /openapi.json, generated requests.

For each operation, Hypothesis generates requests from the document (positive: valid by the
schema; negative: broken on purpose) and four checks judge each answer: no 5xx, the status is
one the document lists, the content type is the documented one, and the body matches the
documented schema (so every 4xx is problem+json in the documented shape). Requests carry the
key the operation needs (admin or an account's), so they get past authentication and reach
the handlers. Bounded: `MAX_EXAMPLES` per operation and mode, no shrinking, derandomized (the
same requests every run, so CI is repeatable); about a minute on 2 cores.
SMSGW_SCHEMATHESIS_EXAMPLES raises the bound for a deeper run by hand.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from functools import partial
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
import trio
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from smsgw.runtime.server import Node
from tests.conftest import ADMIN_KEY, DLR_KEY, bearer
from tests.integration.helpers import create_account

pytestmark = pytest.mark.api_fuzz

MAX_EXAMPLES = int(os.environ.get("SMSGW_SCHEMATHESIS_EXAMPLES", "50"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
ROTATE = ("POST", "/v1/account/keys/rotate")
DLR = "/v1/dlr/{operator}"


class Keys:
    """The keys generated requests use. Rotating the account's key (an operation under test)
    replaces it, so the account's later requests use the new one."""

    def __init__(self, account: str) -> None:
        self.account = account

    def for_operation(self, security: list[dict[str, Any]]) -> dict[str, str]:
        schemes = {name for requirement in security for name in requirement}
        if "adminKey" in schemes:
            return {"Authorization": f"Bearer {ADMIN_KEY}"}
        if "accountKey" in schemes:
            return {"Authorization": f"Bearer {self.account}"}
        if "operatorKey" in schemes:
            # The `sim` operator's key: requests for another operator get 401, as documented.
            return {"Authorization": f"Bearer {DLR_KEY}"}
        return {}


def run_schemathesis(
    document: dict[str, Any], base_url: str, keys: Keys, answers: Counter[str]
) -> list[str]:
    """Every operation, both modes; returns one report per failing operation and mode, and
    counts the answers by operation and status in `answers`."""
    schema = schemathesis.openapi.from_dict(document)
    session = requests.Session()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failure = fuzz(operation, mode, base_url, session, keys, answers)
            if failure is not None:
                failures.append(failure)
    return failures


def fuzz(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    session: requests.Session,
    keys: Keys,
    answers: Counter[str],
) -> str | None:
    """One operation in one mode; a report of the first failure, or None."""
    security = operation.definition.raw.get("security", [])
    label = f"{operation.method.upper()} {operation.path}"

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        headers = keys.for_operation(security)
        if case.path == DLR and case.path_parameters:
            # The one operator with a key here: the generated bodies reach the handler.
            case.path_parameters = {**case.path_parameters, "operator": "sim"}
        response = case.call(base_url=base_url, session=session, headers=headers)
        answers[f"{label} {response.status_code}"] += 1
        if isinstance(case.body, dict) and "send_at" in case.body:
            answers[f"{label} with send_at {response.status_code}"] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)
        if (case.method.upper(), case.path) == ROTATE and response.status_code == 200:
            keys.account = response.json()["api_key"]

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        return None  # nothing to break: no parameters or body to make invalid
    except (Exception, FailureGroup) as exc:
        return f"{label} ({mode.value}): {exc}"
    return None


@pytest.mark.slow
async def test_the_api_conforms_to_its_openapi_document(
    node: Node, client: httpx.AsyncClient
) -> None:
    account = await create_account(client, 10**12, name="schemathesis")
    document = (await client.get("/openapi.json")).json()
    started = time.monotonic()
    answers: Counter[str] = Counter()
    # Schemathesis is synchronous (requests); the node keeps serving on this trio loop.
    failures = await trio.to_thread.run_sync(
        partial(run_schemathesis, document, node.url, Keys(account["api_key"]), answers)
    )
    elapsed = time.monotonic() - started
    print(f"schemathesis: {sum(answers.values())} requests in {elapsed:.1f}s")
    for answer, n in sorted(answers.items()):
        print(f"  {answer}: {n}")
    assert not failures, f"{len(failures)} failing operations:\n\n" + "\n\n".join(failures)
    # The node survived it all and still answers.
    assert (await client.get("/health")).status_code == 200
    # The generated requests got past authentication to the handlers: messages were accepted.
    assert answers["POST /v1/messages 202"] > 0, answers
    # `send_at` was generated, and its checks answered (a time out of range: 422).
    assert answers["POST /v1/messages with send_at 422"] > 0, answers
    # One-time codes: verified by generated requests; the document's `otp` example is sent by
    # schemathesis' explicit phase in most runs, but which account key it carries depends on
    # the order of the key rotations it also generates, so it is sent once more here.
    assert answers["POST /v1/otp/verify 200"] > 0, answers
    examples = document["paths"]["/v1/messages"]["post"]["requestBody"]["content"][
        "application/json"
    ]["examples"]
    fresh = await create_account(client, 10**6, name="otp-example")
    r = await client.post(
        "/v1/messages", json=examples["otp"]["value"], headers=bearer(fresh["api_key"])
    )
    assert r.status_code == 200 and r.json()["code"], r.text
    assert answers[f"POST {DLR} 200"] > 0, answers
    # The cancel route was reached (random ids: 404; its 200 and 409 are
    # test_validity_cancel.py's).
    assert answers["POST /v1/messages/{message_id}/cancel 404"] > 0, answers
    # And a message's history (random ids: 404; its 200 is test_message_events.py's).
    assert answers["GET /v1/messages/{message_id}/events 404"] > 0, answers
    # The statement was read, and generated cursors refused as problems.
    assert answers["GET /v1/account/statement 200"] > 0, answers
    assert answers["GET /v1/account/statement 422"] > 0, answers
