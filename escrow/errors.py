"""Errors of the ledger and escrow service."""

from __future__ import annotations

from escrowd.config.errors import (
    Conflict,
    IdempotencyConflict,
    InsufficientFunds,
    NotFound,
    ValidationFailed,
)

__all__ = [
    "AgentNotFound",
    "AssetMismatch",
    "EscrowConflict",
    "EscrowNotFound",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
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
