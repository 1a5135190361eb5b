"""SQLAlchemy 2.0 typed models: the only place escrowd's tables are defined."""

from escrowd.models.api import (
    ApiKey,
    ApiRateWindow,
    IdempotencyKey,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from escrowd.models.audit import AuditHead, AuditLog
from escrowd.models.base import (
    AccountKind,
    ApiScope,
    Base,
    Chain,
    DeliveryStatus,
    DepositCreditState,
    DepositStatus,
    EscrowStatus,
    PayoutReason,
    PayoutStatus,
    TransferCode,
    utcnow,
)
from escrowd.models.chain import Agent, Asset, ChainBlock, ChainCursor, Deposit, DepositAddress
from escrowd.models.escrow import Escrow, Payout, PayoutTransaction, SenderNonce
from escrowd.models.ledger import LedgerAccount, LedgerTransfer
from escrowd.models.subscription import (
    ChargeStatus,
    Subscription,
    SubscriptionCharge,
    SubscriptionInterval,
    SubscriptionStatus,
)
from escrowd.models.tokens import RecoveryStatus, TokenRecovery, UnsupportedDeposit

__all__ = [
    "AccountKind",
    "Agent",
    "ApiKey",
    "ApiRateWindow",
    "ApiScope",
    "Asset",
    "AuditHead",
    "AuditLog",
    "Base",
    "Chain",
    "ChainBlock",
    "ChainCursor",
    "ChargeStatus",
    "DeliveryStatus",
    "Deposit",
    "DepositAddress",
    "DepositCreditState",
    "DepositStatus",
    "Escrow",
    "EscrowStatus",
    "IdempotencyKey",
    "LedgerAccount",
    "LedgerTransfer",
    "Payout",
    "PayoutReason",
    "PayoutStatus",
    "PayoutTransaction",
    "RecoveryStatus",
    "SenderNonce",
    "Subscription",
    "SubscriptionCharge",
    "SubscriptionInterval",
    "SubscriptionStatus",
    "TokenRecovery",
    "TransferCode",
    "UnsupportedDeposit",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
    "utcnow",
]
