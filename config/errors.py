"""The root of escrowd's typed errors: each kind maps to exactly one HTTP status.

Every layer (wallets, indexer, escrow, daemon) subclasses these, so the API turns any of
them into ``{"error": {"type", "message"}}`` without knowing where it came from.
"""

from __future__ import annotations

from typing import ClassVar


class EscrowdError(Exception):
    """An error a caller can act on. `message` says what was wrong and what to do."""

    type: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationFailed(EscrowdError):
    type = "validation_error"
    http_status = 400


class Unauthorized(EscrowdError):
    type = "unauthorized"
    http_status = 401


class Forbidden(EscrowdError):
    type = "forbidden"
    http_status = 403


class NotFound(EscrowdError):
    type = "not_found"
    http_status = 404


class Conflict(EscrowdError):
    type = "conflict"
    http_status = 409


class IdempotencyConflict(Conflict):
    type = "idempotency_conflict"


class InsufficientFunds(EscrowdError):
    type = "insufficient_funds"
    http_status = 422


class Unavailable(EscrowdError):
    type = "unavailable"
    http_status = 503
