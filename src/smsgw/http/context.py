"""What every route needs: the engine handle, reads, authentication, body decoding."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec
import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
)
from quart import Request, Response, current_app, request
from quart_trio.wrappers import TrioRequest

from smsgw.engine.actor import AskTimeout, InboxFull
from smsgw.engine.admission import RequestBodies
from smsgw.engine.messages import AccountSettings
from smsgw.engine.node import Engine
from smsgw.engine.ports import FrontDoorStore, Reads
from smsgw.engine.ratelimit import RateLimiter, RecipientLimiter
from smsgw.engine.writer import StoreUnavailable
from smsgw.http.params import query_decoder
from smsgw.http.problems import TITLES, ProblemError, storage_unavailable

if TYPE_CHECKING:
    from werkzeug.local import LocalProxy

log = logging.getLogger("smsgw.http")
T = TypeVar("T")
Q = TypeVar("Q", bound=msgspec.Struct)

_encoder = msgspec.json.Encoder()
MAX_BODY_BYTES = 1 << 20  # every route but the batch
MAX_BATCH_BODY_BYTES = 4 << 20  # 1,000 messages of 10 segments fit
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def hash_key(key: str) -> bytes:
    """API keys are 256-bit random tokens, so one SHA-256 is a safe, constant-cost digest."""
    return hashlib.sha256(key.encode()).digest()


def new_api_key() -> str:
    return "sk_" + secrets.token_urlsafe(32)


# Message ids need to be unique, not secret (every read is scoped to the account), so a PRNG
# seeded from the OS is enough; SystemRandom and uuid.UUID cost a third of a batch's
# validation time.
_id_random = random.Random(secrets.randbits(128))
_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62
_RAND_A = ((1 << 12) - 1) << 64
_RAND_B = (1 << 62) - 1


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7): new rows land at the end of the index.

    48 bits of Unix milliseconds, then the version, 74 random bits and the variant, made into
    text by `bytes.hex`."""
    ms = time.time_ns() // 1_000_000
    bits = _id_random.getrandbits(74)
    value = (ms & 0xFFFFFFFFFFFF) << 80 | _VERSION_7 | (bits << 2) & _RAND_A
    t = (value | _VARIANT | bits & _RAND_B).to_bytes(16).hex()
    return f"{t[:8]}-{t[8:12]}-{t[12:16]}-{t[16:20]}-{t[20:]}"


_header_names: dict[str, bytes] = {}


class GatewayRequest(TrioRequest):
    """quart's request, with the caller's account once known, and headers read from the ASGI
    scope's raw list, made a dict once (werkzeug's `Headers.get` lower-cases each name per
    lookup and builds an HTTP exception for every miss, about 6 µs)."""

    _raw_headers: dict[bytes, bytes] | None = None
    account_id: int | None = None  # the caller's account, once `require_account` knows it

    def raw_header(self, name: bytes) -> str | None:
        """The first value of the header `name` (lower case), or None."""
        headers = self._raw_headers
        if headers is None:
            # Reversed, so that the first of repeated headers is the one kept (hypercorn's
            # scope holds them as a list).
            raw = cast(list[tuple[bytes, bytes]], self.scope["headers"])
            headers = self._raw_headers = dict(reversed(raw))
        value = headers.get(name)
        return None if value is None else value.decode("latin-1")


def optional_header(name: str) -> str | None:
    """A request header's first value, or None when it is absent."""
    key = _header_names.get(name)
    if key is None:
        key = _header_names[name] = name.lower().encode("latin-1")
    return current_request().raw_header(key)


def current_request() -> GatewayRequest:
    """The request being handled: the object behind quart's `request` proxy, so that callers
    reading it several times pass the proxy once (werkzeug's documented way to do so)."""
    return cast(GatewayRequest, cast("LocalProxy[Request]", request)._get_current_object())


def json_response(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status=status, content_type="application/json")


# The end of a msgspec validation error that names a member of the body: " - at `$.send_at`".
_TOP_LEVEL_PATH = re.compile(r" - at `\$\.([A-Za-z_][A-Za-z0-9_]*)`$")


def decode(data: bytes, kind: type[T]) -> T:
    """`data` as `kind`, or a ProblemError: 400 `malformed_json` for bytes that are not JSON
    (malformed, not UTF-8, or nested past what the parser takes), 422 naming the field for
    JSON of the wrong shape or a string holding U+0000. Never another exception."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        value = cast(T, decoder.decode(data))
    except msgspec.ValidationError as exc:
        # msgspec stops at the first error it meets: a body that is not JSON at all is a 400
        # even when a field before its bad bytes was already wrong. Its message ends with the
        # path of the value at fault; a member of the body itself is the problem's `field`.
        detail = str(exc)
        at = _TOP_LEVEL_PATH.search(detail)
        raise not_json(data) or ProblemError(
            422, "invalid_field", detail, field=None if at is None else at.group(1)
        ) from None
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    except (UnicodeDecodeError, RecursionError):  # not UTF-8; nested about 1,000 deep
        raise not_json(data) or ProblemError(
            400, "malformed_json", "the body is not valid JSON"
        ) from None
    # PostgreSQL text cannot hold U+0000: one such string would fail the whole group commit it
    # rides in. In JSON it can only come as the escape, so most bodies skip the walk.
    if b"\\u0000" in (data if isinstance(data, bytes) else bytes(data)):
        path = _nul_path(value, "")
        if path is not None:
            field = path or "body"
            raise ProblemError(
                422,
                "invalid_field",
                f"`{field}` must not contain the NUL character (U+0000)",
                field=field,
            )
    return value


def not_json(data: bytes) -> ProblemError | None:
    """The 400 for `data` when it is not JSON as a whole, else None. For error paths: it reads
    the whole body once more. msgspec checks the UTF-8 of every string it decodes, but not of
    what it keeps as `msgspec.Raw` (a batch's items, before each is decoded on its own)."""
    raw = data if isinstance(data, bytes) else bytes(data)
    try:
        raw.decode()
    except UnicodeDecodeError as exc:
        return ProblemError(
            400,
            "malformed_json",
            f"the body is not valid JSON: it must be UTF-8, and byte {exc.start} is not"
            f" ({exc.reason})",
        )
    try:
        msgspec.json.decode(raw, type=msgspec.Raw)  # syntax only: nothing is built
    except msgspec.DecodeError as exc:
        return ProblemError(400, "malformed_json", f"the body is not valid JSON: {exc}")
    except RecursionError:
        return ProblemError(
            400,
            "malformed_json",
            "the body nests arrays and objects too deeply to be read; no request of this API"
            " needs more than a few levels",
        )
    return None


def _nul_path(value: Any, path: str) -> str | None:
    """Where in a decoded body a string holds U+0000, as `a.b[2].c`; None if nowhere."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, msgspec.Struct):
        items: Any = ((name, getattr(value, name)) for name in value.__struct_fields__)
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None  # numbers, booleans, None, msgspec.Raw (decoded, and checked, later)
    for key, item in items:
        if isinstance(key, int):
            sub = f"{path}[{key}]"
        elif "\x00" in str(key):
            return path or "body"
        else:
            sub = f"{path}.{key}" if path else str(key)
        found = _nul_path(item, sub)
        if found is not None:
            return found
    return None


class KeyCache:
    """API key digest -> account id, so the accept path does not read PostgreSQL per request.

    Unknown keys are remembered briefly too, so a client with a bad key cannot turn every
    request into a query.
    """

    def __init__(
        self,
        reads: Reads,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        on_account: Callable[[int, AccountSettings], None] | None = None,
    ) -> None:
        self._reads = reads
        # Told each account's settings when its key is read, so they reach the engine with the
        # lookup the accept path makes anyway, not with a query of their own.
        self._on_account = on_account
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._entries: dict[bytes, tuple[int | None, float]] = {}
        self._forgotten = 0  # bumped by forget(): a lookup that raced it is not cached

    async def account_id(self, key_hash: bytes) -> int | None:
        now = time.monotonic()
        hit = self._entries.get(key_hash)
        if hit is not None and hit[1] > now:
            return hit[0]
        forgotten = self._forgotten
        account = await self._reads.account_by_key_hash(key_hash)
        account_id = None if account is None else account.id
        if account is not None and self._on_account is not None:
            self._on_account(account.id, account.settings)
        if forgotten != self._forgotten:
            return account_id  # may predate a key rotation: answer it, but do not keep it
        ttl = self._ttl if account_id is not None else self._negative_ttl
        if len(self._entries) > 200_000:
            self._entries.clear()
        self._entries[key_hash] = (account_id, now + ttl)
        return account_id

    def forget(self, key_hash: bytes) -> None:
        """Stop answering for `key_hash` on this node now (every node also forgets the
        account's keys when the change's notification arrives: `forget_account`)."""
        self._forgotten += 1
        self._entries.pop(key_hash, None)

    def forget_account(self, account_id: int) -> None:
        """An account's key or settings changed (on any node): look its keys up again. A
        scan, but of a rare event: a reverse index would cost every cached lookup."""
        self._forgotten += 1
        stale = [k for k, (owner, _) in self._entries.items() if owner == account_id]
        for key_hash in stale:
            del self._entries[key_hash]


class Gateway:
    """The app's handle on the running node; routes reach it with `gateway()`."""

    def __init__(self, engine: Engine, reads: FrontDoorStore, *, admin_key: str) -> None:
        self.engine = engine
        self.reads = reads
        self.keys = KeyCache(reads, on_account=engine.learn_settings)
        engine.account_listeners.append(self.keys.forget_account)
        self._admin_hash = hash_key(admin_key)
        # Requests per account (token bucket): a runaway client gets 429s, not the node.
        self.limiter: RateLimiter[int] = RateLimiter(
            engine.config.api_rate_per_second, engine.config.api_burst
        )
        # Messages per recipient number per account and hour: in memory on this node.
        self.recipients = RecipientLimiter(
            engine.config.recipient_limit_per_hour, max_keys=engine.config.recipient_limit_keys
        )

    def bearer(self) -> bytes:
        header = optional_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ProblemError(
                401, "unauthenticated", "send your API key as 'Authorization: Bearer <key>'"
            )
        return hash_key(token.strip())

    def require_admin(self) -> None:
        if not hmac.compare_digest(self.bearer(), self._admin_hash):
            raise ProblemError(403, "forbidden", "this route needs the admin key")

    async def require_account(self) -> int:
        """The calling account's id: 401 for no or an unknown key, 403 for the admin key, 429
        past the account's request rate. Once per request: a second call answers the same."""
        req = current_request()
        if req.account_id is not None:
            return req.account_id
        digest = self.bearer()
        if hmac.compare_digest(digest, self._admin_hash):
            raise ProblemError(
                403, "forbidden", "the admin key has no account; use an account's API key"
            )
        account_id = await self.keys.account_id(digest)
        if account_id is None:
            raise ProblemError(401, "unauthenticated", "unknown API key")
        rate = self.engine.account_settings(account_id).api_rate
        here, burst = rate, None
        if rate is not None:
            # The account's own rate holds across the cluster: this node's share of it.
            shares = self.engine.api_shares
            here = rate if shares is None else rate * shares.share(account_id)
            burst = max(1.0, 2 * here)
        wait = self.limiter.take(account_id, time.monotonic(), rate=here, burst=burst)
        if wait:
            retry_after = max(1, math.ceil(wait))
            raise ProblemError(
                429,
                "rate_limited",
                f"this account may make {rate or self.limiter.rate:g} requests a second"
                f" (bursts of {burst or self.limiter.burst:g}); retry in {retry_after} s",
                retry_after=retry_after,
            )
        req.account_id = account_id
        return account_id

    async def body(self, kind: type[T], *, limit: int = MAX_BODY_BYTES) -> T:
        """Decode the JSON body as `kind`: 415 for another content type, 413 past `limit`
        bytes, 400 for malformed JSON, 422 naming the field for a wrong shape."""
        return decode(await self.raw_body(limit=limit), kind)

    def query(self, kind: type[Q]) -> Q:
        """The query parameters as `kind` (the Struct the route declares as its `query`):
        422 naming the parameter for an unknown, repeated or invalid one (http/params.py)."""
        return query_decoder(kind)(current_request().args)

    async def raw_body(self, *, limit: int = MAX_BODY_BYTES) -> bytes:
        """The JSON body's bytes: 415 for another content type, 413 past `limit` bytes."""
        req = current_request()
        # The exact header first: werkzeug's `mimetype` parses it with its options (~4 µs).
        content_type = req.raw_header(b"content-type")
        if content_type != "application/json" and req.mimetype != "application/json":
            raise ProblemError(
                415, "unsupported_media_type", "send the body as Content-Type: application/json"
            )
        if (req.content_length or 0) > limit:
            raise _too_large(limit)
        # Not cached: the request lets go of its buffer, and the handler's copy is the only
        # one left while it works (the Idempotency-Key wrapper, when used, read its own).
        data = cast(bytes, await req.get_data(cache=False, as_text=False))
        if len(data) > limit:
            raise _too_large(limit)
        return data

    async def call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run an engine call; overload and storage failures become 503 with Retry-After."""
        try:
            return await call()
        except InboxFull:
            raise ProblemError(
                503, "overloaded", "the gateway is at capacity; retry shortly"
            ) from None
        except StoreUnavailable as exc:
            log.warning("engine unavailable: %s", exc)
            raise storage_unavailable() from None
        except AskTimeout as exc:
            # Unlike the two above, the work may still be done after this answer.
            log.warning("engine timed out: %s", exc)
            raise ProblemError(
                503, "timeout", "the gateway did not answer in time; retry shortly"
            ) from None


def _too_large(limit: int) -> ProblemError:
    return ProblemError(413, "body_too_large", f"the body must be at most {limit} bytes")


def gateway() -> Gateway:
    return cast(Gateway, current_app.extensions["smsgw"])


# --- request bodies within the node's budget -------------------------------------------------

ASGIApp = Callable[[HTTPScope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
# How long a refused request's body is read (and dropped) after the answer, at most.
REFUSED_BODY_DRAIN_S = 5.0
_BODIES_FULL = _encoder.encode(
    {
        "type": "https://smsgw.dev/problems/overloaded",
        "title": TITLES[503],
        "status": 503,
        "detail": "the gateway holds as many request bodies as it may at once; retry shortly",
        "code": "overloaded",
        "retry_after": 1,
    }
)
_BODIES_FULL_HEADERS = [
    (b"content-type", b"application/problem+json"),
    (b"content-length", b"%d" % len(_BODIES_FULL)),
    (b"retry-after", b"1"),
    (b"connection", b"close"),
]
_DISCONNECT: ASGIReceiveEvent = {"type": "http.disconnect"}


async def read_within(
    bodies: RequestBodies,
    app: ASGIApp,
    scope: HTTPScope,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
) -> None:
    """Run `app` on one HTTP request with its body's bytes held in `bodies`: its declared
    length reserved before any of it is read (a body of unknown length reserves each part
    as it arrives, up to the largest body a route takes), given back once it is answered or
    its client is gone. When they do not fit: 503 `overloaded` with Retry-After 1, and the
    app never sees the request, so nothing is stored."""
    length = _declared_length(scope)
    if length is None:
        await _read_counted(bodies, app, scope, receive, send)
        return
    # Past the largest body a route takes, quart keeps none of it and the route answers 413.
    size = length if length <= MAX_BATCH_BODY_BYTES else 0
    if not bodies.reserve(size):
        await _refuse(receive, send)
        return
    try:
        await app(scope, receive, send)
    finally:
        bodies.release(size)


def _declared_length(scope: HTTPScope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value)  # h11 took only digits
    return None


async def _read_counted(
    bodies: RequestBodies,
    app: ASGIApp,
    scope: HTTPScope,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
) -> None:
    """`read_within` for a body of unknown length (chunked): each part is reserved as it
    arrives; one that does not fit ends the request for the app (it sees the client leave,
    before it has the whole body) and the client gets the 503."""
    held = 0
    refused = answered = False

    async def counted() -> ASGIReceiveEvent:
        nonlocal held, refused
        message = await receive()
        # Past the largest body a route takes, quart keeps no more of it; once answered, the
        # rest of the body is of no use to anyone.
        if message["type"] == "http.request" and held <= MAX_BATCH_BODY_BYTES and not answered:
            size = len(message.get("body", b""))
            if not bodies.reserve(size):
                refused = True
                return _DISCONNECT
            held += size
        return message

    async def watched(message: ASGISendEvent) -> None:
        nonlocal answered
        answered = answered or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, counted, watched)
    finally:
        bodies.release(held)
    if refused and not answered:
        await _refuse(receive, send)


async def _refuse(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """The 503 for a body that does not fit; then what the client still sends of it is read
    and dropped (a bounded amount, for a bounded time), since a connection closed with a
    request unread is reset, and its client might lose the answer with it."""
    await send({"type": "http.response.start", "status": 503, "headers": _BODIES_FULL_HEADERS})
    await send({"type": "http.response.body", "body": _BODIES_FULL, "more_body": False})
    left = MAX_BATCH_BODY_BYTES
    with trio.move_on_after(REFUSED_BODY_DRAIN_S):
        while left > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return
