"""One-time codes: an OTP send's preparation and settling (POST /v1/messages with `otp`), and
POST /v1/otp/verify.

An OTP send is an express message that waits for its outcome (as `"wait": true`); its code is
recorded (hashed: engine/ports.py, `OtpStore`) before the accept, and becomes the number's
live code exactly when the message is stored. Once the request has the outcome it settles the
code: the stored text loses the code if the message is final, and a send that failed or whose
outcome is unknown leaves no valid code. The code and the text that holds it are never logged.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import trio
from quart import Response, current_app

from smsgw.engine import numbers
from smsgw.engine import otp as rules
from smsgw.engine.messages import OutboundSms
from smsgw.engine.ports import OtpStore
from smsgw.http.api import Api
from smsgw.http.context import Gateway, gateway, json_response, optional_header
from smsgw.http.idempotency import HEADER as IDEMPOTENCY_HEADER
from smsgw.http.problems import ProblemError, from_store
from smsgw.http.schemas import OtpVerifyIn, OtpVerifyOut, SendIn

api = Api("otp", __name__, tag="otp")
log = logging.getLogger("smsgw.http")
EXTENSION = "smsgw.otp"
# How long settling an unanswered OTP send may hold its request's end.
SETTLE_TIMEOUT_S = 5.0
# POST /v1/messages with `otp`, in the document (routes/messages.py).
OTP_SEND = (
    'One-time codes: `"otp": true` instead of `text` sends a code of `code_length` digits'
    " (4 to 8, default 6) made by a CSPRNG, in `template` (with {code} exactly once; default"
    ' "Your code is {code}"), express and waiting as with `wait`: 200 with the sent message'
    " and its `code` (OtpSentOut; `text` with the code's digits as '*', as it is stored from"
    " then on), or the 504 and 502 above, after which the code is not valid. `text` with"
    " `otp` is a 422, and so is an `Idempotency-Key` (no answer holding a code is kept); a"
    " `client_ref` used before is a 409 `client_ref_used`. Like every express message an OTP"
    " reaches numbers on the account's opt-outs, not those on the blocklist. Verify with"
    " POST /v1/otp/verify; a code expires after 120 s (`EngineConfig.otp_ttl_s`), and a new"
    " one to the number replaces it."
)


def otp_store() -> OtpStore:
    """The node's OTP store; 503 on an app built without one (some tests build bare apps)."""
    store: OtpStore | None = current_app.extensions.get(EXTENSION)
    if store is None:
        raise ProblemError(503, "unavailable", "this node keeps no one-time codes")
    return store


class OtpSend:
    """One OTP send: its code, the request as the gateway writes it (text, express, wait),
    and the text to store once the message is final."""

    __slots__ = ("answered", "code", "redacted_text", "request", "store")

    def __init__(self, data: SendIn) -> None:
        """Validate the OTP fields of `data` (422 naming the field) and make the code."""
        if data.text:
            raise ProblemError(
                422,
                "invalid_field",
                "`text` is not taken with `otp`: the gateway writes the text from `template`"
                f" (default {rules.DEFAULT_TEMPLATE!r})",
                field="text",
            )
        if data.send_at is not None:
            raise ProblemError(
                422,
                "invalid_field",
                "`send_at` is not taken with `otp`: a code is sent at once, and its answer"
                " waits for it",
                field="send_at",
            )
        if optional_header(IDEMPOTENCY_HEADER) is not None:
            # A replay would have to keep the answer, and so the code, for 24 hours.
            raise ProblemError(
                422,
                "invalid_field",
                f"`{IDEMPOTENCY_HEADER}` is not taken with `otp`: a code is never stored to be"
                " answered again; a retry sends a new code, which replaces this one",
                field=IDEMPOTENCY_HEADER,
            )
        template = rules.DEFAULT_TEMPLATE if data.template is None else data.template
        problem = rules.template_problem(template)
        if problem:
            raise ProblemError(422, "invalid_field", f"`template` {problem}", field="template")
        length = rules.DEFAULT_CODE_LENGTH if data.code_length is None else data.code_length
        self.store = otp_store()
        self.answered = False  # with the code, in a 200
        self.code = rules.new_code(length)
        self.redacted_text = rules.redacted(template, length)
        self.request = msgspec.structs.replace(
            data,
            text=rules.render(template, self.code),
            express=True,
            wait=True,
            otp=False,
            template=None,
            code_length=None,
        )

    async def issue(self, gw: Gateway, sms: OutboundSms) -> None:
        """Record the code before `sms` is accepted (503 when the store cannot)."""
        await from_store(
            lambda: self.store.issue(
                sms.account_id,
                sms.to,
                sms.id,
                self.code,
                self.redacted_text,
                gw.engine.config.otp_ttl_s,
            ),
            "record the one-time code",
        )

    async def sent(self, sms: OutboundSms, view: dict[str, Any]) -> Response:
        """The 200 of a sent OTP (`view`: the wait answer): its stored text redacted first,
        then the answer with the text as stored now, and the code."""
        await self._settle(sms, void=False)
        self.answered = True
        return json_response({**view, "text": self.redacted_text, "code": self.code}, 200)

    async def unsent(self, sms: OutboundSms) -> None:
        """Any answer but the 200 (a refusal, a failure, a deadline, a cancelled request):
        the code is invalidated, even if the message is sent later, and the stored text is
        redacted if the message is final. Shielded: it runs when the request is cancelled."""
        if not self.answered:
            with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_TIMEOUT_S):
                await self._settle(sms, void=True)

    async def _settle(self, sms: OutboundSms, *, void: bool) -> None:
        """A failure here leaves the redaction to the sweep (engine/otp.py). A code it failed
        to invalidate stays live only if its message is stored and not failed (a 504 before
        the outcome was recorded, then sent): its recipient has it, as after a crash."""
        try:
            await self.store.settle(sms.id, void=void)
        except Exception as exc:
            log.warning("could not settle the one-time code of message %s: %s", sms.id, exc)


def otp_client_ref_used(sms: OutboundSms) -> ProblemError:
    """An OTP send whose `client_ref` the account used before: its code cannot be answered
    again (it is not kept), so no 200 with the existing message."""
    return ProblemError(
        409,
        "client_ref_used",
        f"this account already used client_ref {sms.client_ref!r}; a one-time code is never"
        " answered twice: send a new one with a new client_ref",
        field="client_ref",
    )


@api.route(
    "POST",
    "/v1/otp/verify",
    "Check a one-time code sent to a number",
    body=OtpVerifyIn,
    responses={200: OtpVerifyOut},
    problems=(503,),
    idempotent=False,
    example={"to": "+4915123456789", "code": "123456"},
    description=(
        "`valid: true` once, for the number's live code (the last one sent to it through"
        " any node, while it has not expired); then false. A wrong code counts an attempt:"
        " the fifth wrong one in a row invalidates the code. `reason` when false:"
        " `mismatch`, `too_many_attempts` (this wrong code invalidated it), `expired`, or"
        " `no_code` (none is live: none was sent, it was used or invalidated, or the last"
        " send failed). `to` is taken as a send takes it; `code` is its digits (Persian and"
        " Arabic-Indic digits too). Counts against the account's request rate."
    ),
)
async def verify() -> Response:
    """200 `{valid}`: true once for the number's live code; false with a `reason`."""
    gw = gateway()
    account_id = await gw.require_account()
    data = await gw.body(OtpVerifyIn)
    country = gw.engine.account_settings(account_id).default_country or numbers.node_country()
    to = numbers.normalize(data.to, country)
    if to is None:
        raise ProblemError(
            422, "invalid_field", f"`to` {numbers.number_problem(country)}", field="to"
        )
    code = rules.ascii_code(data.code)
    if code is None:
        raise ProblemError(
            422,
            "invalid_field",
            f"`code` must be {rules.MIN_CODE_LENGTH} to {rules.MAX_CODE_LENGTH} digits",
            field="code",
        )
    store = otp_store()
    verdict = await from_store(
        lambda: store.verify(account_id, to, code, rules.MAX_ATTEMPTS), "verify the code"
    )
    return json_response(OtpVerifyOut(verdict.valid, verdict.reason))
