"""Idempotency-Key on POST routes, with Stripe's semantics: `@idempotent` under the route.

A client that sends `Idempotency-Key: <key>` may retry the request as often as it likes: the
first request runs; the same key with the same request (method, path, and the body as JSON,
whatever its key order or whitespace) replays the first answer, status and body, with
`Idempotent-Replayed: true`; the same key with a different request is a 422. Keys are kept 24
hours, each in a scope: an account's own requests (`@idempotent`), or the admin's requests
about one account (`@idempotent_admin`, see `admin_on_path_account`).

Exactly one request runs per key, across requests and nodes: before the handler runs, the key
is recorded in PostgreSQL with no answer (INSERT ... ON CONFLICT DO NOTHING on the primary key
(account_id, key), account_id holding the scope), and a second request that finds it
unanswered gets 409. The answer is stored once the handler is done. What is stored:

- every answer the handler decided, 2xx and 4xx (a 402 is replayed until the key expires: use a
  new key after a top-up), except 409 and 429, which are about this moment, not the request;
- nothing, and the key is forgotten, when the request provably changed nothing: a 409 or 429,
  a 503 for a full inbox or a failed commit, a refusal before the handler (413, malformed
  headers); the client may send the key again;
- nothing, and the key stays in progress until it expires, when it is unknown whether the
  request took effect (a 503 for an engine timeout, a crash, a cancelled request): answering
  409 is safe, running it twice is not.

This costs two PostgreSQL round trips per request that sends the header (claim, then store
the answer), outside the group commit; requests without it pay nothing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, cast

import msgspec
import trio
from quart import Response, current_app, request
from werkzeug.exceptions import HTTPException

from smsgw.engine.ports import FrontDoorStore
from smsgw.http.context import gateway, optional_header
from smsgw.http.problems import ProblemError, storage_unavailable

log = logging.getLogger("smsgw.http")
P = ParamSpec("P")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
TTL_S = 24 * 3600.0
MAX_KEY_LENGTH = 255
PURGE_EVERY_S = 60.0
PURGE_BATCH = 10_000
# Answers that mean the request changed nothing and may run again under the same key.
_RETRYABLE_STATUSES = frozenset({409, 429})
_NOTHING_CHANGED_CODES = frozenset({"overloaded", "unavailable"})


class IdempotencyKeys:
    """One app's view of the idempotency records: claims, answers, and a purge of expired
    records at most once a minute (riding on a request, so no extra actor is needed)."""

    def __init__(self, store: FrontDoorStore) -> None:
        self.store = store
        self._last_purge = time.monotonic()

    async def purge_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = now
        try:
            deleted = await self.store.purge_idempotency_keys(TTL_S, PURGE_BATCH)
        except Exception as exc:  # best effort: an expired record is ignored anyway
            log.warning("could not purge idempotency keys: %s", exc)
            return
        if deleted:
            log.info("purged %d expired idempotency keys", deleted)


def _keys() -> IdempotencyKeys:
    keys = current_app.extensions.get("smsgw.idempotency")
    if keys is None:
        keys = current_app.extensions["smsgw.idempotency"] = IdempotencyKeys(gateway().reads)
    return cast(IdempotencyKeys, keys)


def request_hash(method: str, path: str, body: bytes) -> bytes:
    """What "the same request" means: method, path and the body as JSON, key order and
    whitespace aside (a body that is not JSON is compared byte for byte)."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(body), order="sorted")
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser
        canonical = body
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), canonical):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def _check_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        raise ProblemError(
            422,
            "invalid_idempotency_key",
            f"`{HEADER}` must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            field=HEADER,
        )


async def _settle(write: Awaitable[None]) -> None:
    """Record the outcome even if the request is being cancelled. If PostgreSQL fails here,
    the client still gets its answer and the key stays in progress until it expires."""
    try:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await write
    except Exception as exc:
        log.warning("could not record an idempotency key's outcome: %s", exc)


async def _record(
    keys: IdempotencyKeys, namespace: int, key: str, response: Response, code: str | None
) -> None:
    """Store the answer, or forget the key when the request changed nothing."""
    status = response.status_code
    if status in _RETRYABLE_STATUSES or (status >= 500 and code in _NOTHING_CHANGED_CODES):
        await _settle(keys.store.release_idempotency_key(namespace, key))
    elif status < 500:
        answer = await response.get_data(as_text=False)
        await _settle(keys.store.finish_idempotency_key(namespace, key, status, answer))
    await keys.purge_if_due()


# A scope authenticates the request (raising its 401/403/429) and names the keys' namespace:
# the `account_id` column of their idempotency_keys rows. It gets the route's path arguments.
Scope = Callable[[Mapping[str, Any]], Awaitable[int]]
Handler = Callable[P, Awaitable[Response]]


async def calling_account(path_args: Mapping[str, Any]) -> int:
    """The caller's account: an account's keys are its own."""
    return await gateway().require_account()


async def admin_on_path_account(path_args: Mapping[str, Any]) -> int:
    """The admin, acting on the route's `account_id`: the admin's keys are per target account,
    so one key sent for account 5 and for account 6 is two requests, not a 422 (a script that
    tops up many accounts may well derive its keys from its own run, not from the account).
    They are kept under the account's id negated: account ids start at 1, so they never meet
    the account's own keys (the account cannot claim, replay or block the admin's keys, nor
    the admin the account's)."""
    gateway().require_admin()
    return -int(path_args["account_id"])


def idempotent_in(scope: Scope) -> Callable[[Handler[P]], Handler[P]]:
    """A decorator that gives a POST route Idempotency-Key semantics with keys in `scope`;
    put it under the route decorator."""

    def decorate(handler: Handler[P]) -> Handler[P]:
        return _idempotent(handler, scope)

    return decorate


def _idempotent(handler: Handler[P], scope: Scope) -> Handler[P]:
    @functools.wraps(handler)
    async def run(*args: P.args, **kwargs: P.kwargs) -> Response:
        key = optional_header(HEADER)
        if key is None:
            return await handler(*args, **kwargs)
        namespace = await scope(kwargs)
        _check_key(key)
        keys = _keys()
        body = cast(bytes, await request.get_data(as_text=False))
        fingerprint = request_hash(request.method, request.path, body)
        try:
            claim = await keys.store.claim_idempotency_key(namespace, key, fingerprint, TTL_S)
        except Exception as exc:
            log.warning("idempotency claim failed: %s", exc)
            raise storage_unavailable() from None
        match claim.state:
            case "done":
                assert claim.status is not None and claim.body is not None
                kind = "application/problem+json" if claim.status >= 400 else "application/json"
                return Response(
                    claim.body,
                    status=claim.status,
                    content_type=kind,
                    headers={REPLAYED_HEADER: "true"},
                )
            case "mismatch":
                raise ProblemError(
                    422,
                    "idempotency_key_reused",
                    f"this {HEADER} was used for a different request in the last 24 hours;"
                    " use a new key for a new request",
                )
            case "in_progress":
                raise ProblemError(
                    409,
                    "idempotency_key_in_progress",
                    f"a request with this {HEADER} is in progress; retry after it is answered",
                )
            case "claimed":
                pass

        try:
            response = await handler(*args, **kwargs)
        except ProblemError as exc:
            # Re-raised for the app's error handler to answer; what is stored is its body.
            await _record(keys, namespace, key, exc.response(), exc.code)
            raise
        except HTTPException:
            # Refused by the framework before the handler did anything.
            await _settle(keys.store.release_idempotency_key(namespace, key))
            raise
        await _record(keys, namespace, key, response, None)
        return response

    return run


# Account routes (POST /v1/messages, the batch): the handler authenticates with
# `require_account`, which answers the same as the scope did.
idempotent = idempotent_in(calling_account)
# Admin routes about one account (POST /v1/accounts/{account_id}/topups).
idempotent_admin = idempotent_in(admin_on_path_account)
