"""A Python client for the smsgw HTTP API: `Client` (sync) and `AsyncClient` on httpx, the
answers as msgspec Structs, `ApiError` for problem answers, `verify_callback` for status
callbacks.

    from smsgw.client import Client

    with Client("http://127.0.0.1:8080", api_key) as sms:
        sent = sms.send_and_wait("+4915123456789", "Your code is 123456")
"""

from smsgw.client.callbacks import verify_callback
from smsgw.client.clients import AsyncClient, Client
from smsgw.client.errors import ApiError, CallbackVerificationError, SmsgwError
from smsgw.client.models import (
    Accepted,
    Account,
    AccountCreated,
    Balance,
    BatchItemError,
    BatchResponse,
    BatchResult,
    Cancelled,
    Message,
    MessageEvent,
    MessageEvents,
    MessagePage,
    MessageStatus,
    OutgoingMessage,
    StatusCallback,
    Summary,
    SummaryGroup,
    SummaryTotals,
)

__all__ = [
    "Accepted",
    "Account",
    "AccountCreated",
    "ApiError",
    "AsyncClient",
    "Balance",
    "BatchItemError",
    "BatchResponse",
    "BatchResult",
    "CallbackVerificationError",
    "Cancelled",
    "Client",
    "Message",
    "MessageEvent",
    "MessageEvents",
    "MessagePage",
    "MessageStatus",
    "OutgoingMessage",
    "SmsgwError",
    "StatusCallback",
    "Summary",
    "SummaryGroup",
    "SummaryTotals",
    "verify_callback",
]
