"""A typed client for escrowd's HTTP API, sync (`EscrowdClient`) and asyncio
(`AsyncEscrowdClient`), on httpx.

    with EscrowdClient("http://127.0.0.1:8725", api_key) as escrowd:
        escrow = escrowd.fund_escrow(job_id="job-1", buyer="b", worker="w",
                                     asset="USDC", amount="12.5")
        escrowd.release_escrow("job-1")

Calls return the plain values `EscrowService` returns in process (escrowd.escrow.values)
and raise the same typed errors (`InsufficientFunds`, `EscrowConflict`, ...). Each
changing call carries one Idempotency-Key for all of its retries (no answer, 5xx, 429
after its Retry-After), so a retry never does the work twice. Lists come a page at a
time (`list_*`) or as iterators over every page (`iter_*`). `verify_webhook` checks a
delivery's signature and returns its typed event.
"""

from escrowd.client.aio import AsyncEscrowdClient
from escrowd.client.calls import Call, RetryPolicy
from escrowd.client.errors import (
    AgentNotFound,
    AssetMismatch,
    Conflict,
    ConnectionFailed,
    EscrowConflict,
    EscrowdError,
    EscrowNotFound,
    Forbidden,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    UnknownAccount,
    UnknownAsset,
    ValidationFailed,
)
from escrowd.client.sync import EscrowdClient
from escrowd.client.values import (
    AuditReport,
    AuditRow,
    Deposit,
    DepositAddress,
    Page,
    WebhookDelivery,
    WebhookEndpoint,
)
from escrowd.client.webhooks import (
    DepositEvent,
    DepositEventData,
    EscrowEvent,
    EscrowEventData,
    Event,
    OtherEvent,
    PayoutEvent,
    PayoutEventData,
    WebhookPayloadInvalid,
    parse_event,
    verify_webhook,
)
from escrowd.escrow.values import Agent, Balance, Escrow, Withdrawal

__all__ = [
    "Agent",
    "AgentNotFound",
    "AssetMismatch",
    "AsyncEscrowdClient",
    "AuditReport",
    "AuditRow",
    "Balance",
    "Call",
    "Conflict",
    "ConnectionFailed",
    "Deposit",
    "DepositAddress",
    "DepositEvent",
    "DepositEventData",
    "Escrow",
    "EscrowConflict",
    "EscrowEvent",
    "EscrowEventData",
    "EscrowNotFound",
    "EscrowdClient",
    "EscrowdError",
    "Event",
    "Forbidden",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
    "NotFound",
    "OtherEvent",
    "Page",
    "PayoutEvent",
    "PayoutEventData",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "UnknownAccount",
    "UnknownAsset",
    "ValidationFailed",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookPayloadInvalid",
    "Withdrawal",
    "parse_event",
    "verify_webhook",
]
