"""A typed client for escrowd's HTTP API, sync (`EscrowdClient`) and asyncio
(`AsyncEscrowdClient`), on httpx.

    with EscrowdClient("http://127.0.0.1:8725", api_key) as escrowd:
        escrow = escrowd.fund_escrow(job_id="job-1", buyer="b", worker="w",
                                     asset="USDC", amount="12.5")
        escrowd.release_escrow("job-1")

Every operation of the API has a method (`operations.OPERATIONS` lists them by method
and path). Calls return the plain values `EscrowService` returns in process
(escrowd.escrow.values; `Escrow` and `Withdrawal` with what the API tells besides) and
raise the same typed errors (`InsufficientFunds`, `EscrowConflict`, `DepositUsed`, ...).
Each changing call carries one Idempotency-Key for all of its retries (no answer, 5xx,
429 after its Retry-After), so a retry never does the work twice. Lists come a page at a
time (`list_*`) or as iterators over every page (`iter_*`). `verify_webhook` checks a
delivery's signatures (Standard Webhooks and Escrowd-Signature) and returns its typed
event.
"""

from escrowd.client.aio import AsyncEscrowdClient
from escrowd.client.calls import Call, RetryPolicy
from escrowd.client.errors import (
    AgentNotFound,
    AssetMismatch,
    Conflict,
    ConnectionFailed,
    DepositAgentMismatch,
    DepositAmbiguous,
    DepositNotFound,
    DepositPending,
    DepositUnusable,
    DepositUsed,
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
    SubscriptionConflict,
    SubscriptionNotFound,
    Unauthorized,
    Unavailable,
    UnknownAccount,
    UnknownAsset,
    UnknownNetwork,
    ValidationFailed,
    WithdrawalNotFound,
)
from escrowd.client.sync import EscrowdClient
from escrowd.client.values import (
    AuditReport,
    AuditRow,
    Deposit,
    DepositAddress,
    Escrow,
    FundingDeposit,
    Network,
    NetworkAsset,
    Page,
    WebhookDelivery,
    WebhookEndpoint,
    Withdrawal,
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
    SubscriptionChargeData,
    SubscriptionEvent,
    SubscriptionEventData,
    UnsupportedDepositEvent,
    UnsupportedDepositEventData,
    WebhookPayloadInvalid,
    parse_event,
    verify_webhook,
)
from escrowd.escrow.values import Agent, Balance, Subscription, SubscriptionCharge

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
    "DepositAgentMismatch",
    "DepositAmbiguous",
    "DepositEvent",
    "DepositEventData",
    "DepositNotFound",
    "DepositPending",
    "DepositUnusable",
    "DepositUsed",
    "Escrow",
    "EscrowConflict",
    "EscrowEvent",
    "EscrowEventData",
    "EscrowNotFound",
    "EscrowdClient",
    "EscrowdError",
    "Event",
    "Forbidden",
    "FundingDeposit",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
    "Network",
    "NetworkAsset",
    "NotFound",
    "OtherEvent",
    "Page",
    "PayoutEvent",
    "PayoutEventData",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "Subscription",
    "SubscriptionCharge",
    "SubscriptionChargeData",
    "SubscriptionConflict",
    "SubscriptionEvent",
    "SubscriptionEventData",
    "SubscriptionNotFound",
    "Unauthorized",
    "Unavailable",
    "UnknownAccount",
    "UnknownAsset",
    "UnknownNetwork",
    "UnsupportedDepositEvent",
    "UnsupportedDepositEventData",
    "ValidationFailed",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookPayloadInvalid",
    "Withdrawal",
    "WithdrawalNotFound",
    "parse_event",
    "verify_webhook",
]
