"""Errors of the ledger and escrow service.

All of them here, away from the database layer, so that escrowd.client raises the very
classes the in-process interface raises without importing SQLAlchemy."""

from __future__ import annotations

from escrowd.config.errors import (
    Conflict,
    IdempotencyConflict,
    InsufficientFunds,
    NotFound,
    Unavailable,
    ValidationFailed,
)

__all__ = [
    "AgentNotFound",
    "AssetMismatch",
    "CheckpointBusy",
    "DepositAgentMismatch",
    "DepositAmbiguous",
    "DepositNotFound",
    "DepositPending",
    "DepositUnusable",
    "DepositUsed",
    "EscrowConflict",
    "EscrowNotFound",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
    "SubscriptionConflict",
    "SubscriptionNotFound",
    "UnknownAccount",
    "UnknownAsset",
    "UnknownNetwork",
    "WithdrawalNotFound",
]


class InvalidAmount(ValidationFailed):
    type = "invalid_amount"


class AssetMismatch(ValidationFailed):
    type = "asset_mismatch"


class UnknownAccount(NotFound):
    type = "unknown_account"


class EscrowNotFound(NotFound):
    type = "escrow_not_found"


class EscrowConflict(Conflict):
    type = "escrow_conflict"


class AgentNotFound(NotFound):
    type = "agent_not_found"


class WithdrawalNotFound(NotFound):
    type = "withdrawal_not_found"


class UnknownNetwork(ValidationFailed):
    """A network name that is not configured, or a chain family where a network belongs."""

    type = "unknown_network"


class UnknownAsset(ValidationFailed):
    type = "unknown_asset"


# Escrows funded from a named deposit (escrow.deposit_funding).


class DepositNotFound(NotFound):
    type = "deposit_not_found"


class DepositPending(Conflict):
    """Not an error that is final: the same request succeeds once the deposit is credited."""

    type = "deposit_pending"


class DepositUnusable(Conflict):
    type = "deposit_unusable"


class DepositUsed(Conflict):
    type = "deposit_used"


class DepositAmbiguous(ValidationFailed):
    type = "deposit_ambiguous"


class DepositAgentMismatch(ValidationFailed):
    type = "deposit_agent_mismatch"


# Recurring charges (escrow.subscriptions).


class SubscriptionNotFound(NotFound):
    type = "subscription_not_found"


class SubscriptionConflict(Conflict):
    type = "subscription_conflict"


class CheckpointBusy(Unavailable):
    """Writers did not finish within an audit checkpoint's lock timeout."""
