"""The HTTP front door: quart-trio routes over the engine handle, problem+json errors."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from smsgw.engine import sms as rules
from smsgw.engine.actor import AskTimeout, InboxFull
from smsgw.engine.messages import OutboundSms
from smsgw.engine.node import Engine
from smsgw.engine.ports import Reads
from smsgw.engine.writer import StoreUnavailable
from smsgw.http.problems import ProblemError, problem_response
from smsgw.http.schemas import (
    AcceptedOut,
    AccountCreatedOut,
    AccountOut,
    BalanceOut,
    CreateAccountIn,
    SendIn,
    TopUpIn,
)

log = logging.getLogger("smsgw.http")
T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
DEFAULT_SENDER = "smsgw"
MAX_BODY_BYTES = 1 << 20


def hash_key(key: str) -> bytes:
    """API keys are 256-bit random tokens, so one SHA-256 is a safe, constant-cost digest."""
    return hashlib.sha256(key.encode()).digest()


def new_api_key() -> str:
    return "sk_" + secrets.token_urlsafe(32)


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7): new rows land at the end of the index."""
    ms = time.time_ns() // 1_000_000
    value = (ms & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant
    return str(uuid.UUID(int=value))


def json_response(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status=status, content_type="application/json")


def decode(data: bytes, kind: type[T]) -> T:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise ProblemError(422, "invalid_field", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProblemError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


class KeyCache:
    """API key digest -> account id, so the accept path does not read PostgreSQL per request.

    Unknown keys are remembered briefly too, so a client with a bad key cannot turn every
    request into a query.
    """

    def __init__(self, reads: Reads, *, ttl: float = 60.0, negative_ttl: float = 5.0) -> None:
        self._reads = reads
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._entries: dict[bytes, tuple[int | None, float]] = {}

    async def account_id(self, key_hash: bytes) -> int | None:
        now = time.monotonic()
        hit = self._entries.get(key_hash)
        if hit is not None and hit[1] > now:
            return hit[0]
        account = await self._reads.account_by_key_hash(key_hash)
        account_id = None if account is None else account.id
        ttl = self._ttl if account_id is not None else self._negative_ttl
        if len(self._entries) > 200_000:
            self._entries.clear()
        self._entries[key_hash] = (account_id, now + ttl)
        return account_id


def create_app(engine: Engine, reads: Reads, *, admin_key: str) -> QuartTrio:
    app = QuartTrio("smsgw")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    admin_hash = hash_key(admin_key)
    keys = KeyCache(reads)
    config = engine.config

    def bearer() -> bytes:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ProblemError(
                401, "unauthenticated", "send your API key as 'Authorization: Bearer <key>'"
            )
        return hash_key(token.strip())

    def require_admin() -> None:
        if not hmac.compare_digest(bearer(), admin_hash):
            raise ProblemError(403, "forbidden", "this route needs the admin key")

    async def require_account() -> int:
        digest = bearer()
        if hmac.compare_digest(digest, admin_hash):
            raise ProblemError(
                403, "forbidden", "the admin key has no account; use an account's API key"
            )
        account_id = await keys.account_id(digest)
        if account_id is None:
            raise ProblemError(401, "unauthenticated", "unknown API key")
        return account_id

    async def body(kind: type[T]) -> T:
        if request.mimetype != "application/json":
            raise ProblemError(
                415, "unsupported_media_type", "send the body as Content-Type: application/json"
            )
        data: bytes = await request.get_data(as_text=False)  # type: ignore[assignment]
        return decode(data, kind)

    async def engine_call(call: Callable[[], Awaitable[T]]) -> T:
        """Map the engine's overload and storage failures to 503 with Retry-After."""
        try:
            return await call()
        except InboxFull:
            raise ProblemError(
                503, "overloaded", "the gateway is at capacity; retry shortly"
            ) from None
        except (AskTimeout, StoreUnavailable) as exc:
            log.warning("engine unavailable: %s", exc)
            raise ProblemError(
                503, "unavailable", "storage is unavailable; retry shortly"
            ) from None

    @app.errorhandler(ProblemError)
    async def on_problem(exc: ProblemError) -> Response:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return problem_response(exc.status, exc.code, exc.detail, headers=headers, **exc.extra)

    @app.errorhandler(HTTPException)
    async def on_http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        return problem_response(status, code, exc.description or exc.name or "error")

    @app.errorhandler(Exception)
    async def on_crash(exc: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(500, "internal", "an internal error; nothing was changed")

    @app.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if not engine.ready.is_set():
            raise ProblemError(503, "recovering", "recovering pending messages")
        try:
            await reads.ping()
        except Exception as exc:
            raise ProblemError(503, "database_unreachable", f"PostgreSQL: {exc}") from None
        return json_response({"status": "ready", "recovered": engine.recovered})

    @app.post("/v1/accounts")
    async def create_account() -> Response:
        require_admin()
        data = await body(CreateAccountIn)
        api_key = new_api_key()
        account = await engine_call(
            lambda: engine.create_account(data.name, data.credit, hash_key(api_key))
        )
        out = AccountCreatedOut(account.id, account.name, api_key, account.balance)
        return json_response(out, 201)

    @app.post("/v1/accounts/<int:account_id>/topups")
    async def topup(account_id: int) -> Response:
        require_admin()
        data = await body(TopUpIn)
        balance = await engine_call(lambda: engine.topup(account_id, data.amount))
        if balance is None:
            raise ProblemError(404, "account_not_found", f"no account {account_id}")
        return json_response(BalanceOut(balance))

    @app.get("/v1/account")
    async def get_account() -> Response:
        account = await reads.account(await require_account())
        if account is None:
            raise ProblemError(401, "unauthenticated", "unknown API key")
        return json_response(AccountOut(account.id, account.name, account.balance, account.held))

    @app.post("/v1/messages")
    async def send_message() -> Response:
        account_id = await require_account()
        data = await body(SendIn)
        sms = build_sms(account_id, data)
        results = await engine_call(lambda: engine.accept([sms], atomic=True))
        if not results[0].accepted:
            raise ProblemError(
                402,
                "insufficient_credit",
                f"the balance does not cover this message's price of {sms.price}",
                price=sms.price,
                balance=results[0].balance,
            )
        return json_response(AcceptedOut(sms.id, "queued", sms.segments, sms.price), 202)

    def build_sms(account_id: int, data: SendIn) -> OutboundSms:
        """Validate one message and price it; raises a 422 problem naming the field."""
        problem = rules.recipient_problem(data.to)
        if problem:
            raise ProblemError(422, "invalid_field", f"`to` {problem}", field="to")
        if not data.text:
            raise ProblemError(422, "invalid_field", "`text` must not be empty", field="text")
        sender = DEFAULT_SENDER if data.sender is None else data.sender
        problem = rules.sender_problem(sender)
        if problem:
            raise ProblemError(422, "invalid_field", f"`sender` {problem}", field="sender")
        segments = rules.segments(data.text)
        if segments > config.max_segments:
            raise ProblemError(
                422,
                "invalid_field",
                f"`text` needs {segments} segments; the limit is {config.max_segments}",
                field="text",
            )
        price = rules.price(
            segments,
            express=data.express,
            normal_price=config.normal_price,
            express_price=config.express_price,
        )
        now = engine.clock()
        return OutboundSms(
            id=uuid7(),
            account_id=account_id,
            to=data.to,
            sender=sender,
            text=data.text,
            segments=segments,
            price=price,
            express=data.express,
            created_at=now,
            deadline=now + config.express_deadline_ms / 1000 if data.express else None,
            client_ref=data.client_ref,
        )

    @app.get("/v1/messages/<message_id>")
    async def get_message(message_id: str) -> Response:
        account_id = await require_account()
        try:
            uuid.UUID(message_id)
        except ValueError:
            raise ProblemError(404, "message_not_found", f"no message {message_id}") from None
        row = await reads.message(account_id, message_id)
        if row is None:
            raise ProblemError(404, "message_not_found", f"no message {message_id}")
        if row["status"] == "queued" and message_id in engine.pool.inflight:
            row["status"] = "sending"
        return json_response(row)

    @app.get("/v1/ops/supervisor")
    async def supervisor_status() -> Response:
        require_admin()
        if engine.supervisor is None:
            raise ProblemError(503, "starting", "the supervisor is starting")
        return json_response(engine.supervisor.status())

    return app
