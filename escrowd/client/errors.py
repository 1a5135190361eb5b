"""What the client raises: the classes escrowd itself raises, by the error type answered.

An error answer ``{"error": {"type", "message"}}`` becomes the class of that type, so
``except InsufficientFunds`` is the same clause for `EscrowService` in process and for
`EscrowdClient` over HTTP. A type this client does not know (a newer server) becomes a
class of that name under the class of its HTTP status (``NotFound`` for 404, ...), so
catching by status family keeps working.
"""

from __future__ import annotations

from typing import cast

from escrowd.config.errors import (
    Conflict,
    EscrowdError,
    Forbidden,
    IdempotencyConflict,
    InsufficientFunds,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from escrowd.escrow.errors import (
    AgentNotFound,
    AssetMismatch,
    DepositAgentMismatch,
    DepositAmbiguous,
    DepositNotFound,
    DepositPending,
    DepositUnusable,
    DepositUsed,
    EscrowConflict,
    EscrowNotFound,
    InvalidAmount,
    SubscriptionConflict,
    SubscriptionNotFound,
    UnknownAccount,
    UnknownAsset,
    UnknownNetwork,
    WithdrawalNotFound,
)

__all__ = [
    "AgentNotFound",
    "AssetMismatch",
    "Conflict",
    "ConnectionFailed",
    "DepositAgentMismatch",
    "DepositAmbiguous",
    "DepositNotFound",
    "DepositPending",
    "DepositUnusable",
    "DepositUsed",
    "EscrowConflict",
    "EscrowNotFound",
    "EscrowdError",
    "Forbidden",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidAmount",
    "NotFound",
    "RateLimited",
    "ServerError",
    "SubscriptionConflict",
    "SubscriptionNotFound",
    "Unauthorized",
    "Unavailable",
    "UnknownAccount",
    "UnknownAsset",
    "UnknownNetwork",
    "ValidationFailed",
    "WithdrawalNotFound",
    "error_for",
]


class ServerError(EscrowdError):
    """escrowd answered 5xx on every attempt (or an answer that is not escrowd's JSON)."""

    type = "internal_error"
    http_status = 500


class RateLimited(EscrowdError):
    """escrowd answered 429 on every attempt."""

    type = "rate_limited"
    http_status = 429


class ConnectionFailed(Unavailable):
    """No answer on any attempt: refused, reset, dropped or timed out."""

    type = "connection_failed"


# Classes whose constructor takes only the message (others need fields an answer lacks).
_KNOWN: dict[str, type[EscrowdError]] = {
    cls.type: cls
    for cls in (
        ValidationFailed,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        IdempotencyConflict,
        InsufficientFunds,
        Unavailable,
        InvalidAmount,
        AssetMismatch,
        UnknownAccount,
        EscrowNotFound,
        EscrowConflict,
        AgentNotFound,
        UnknownAsset,
        UnknownNetwork,
        WithdrawalNotFound,
        DepositNotFound,
        DepositPending,
        DepositUnusable,
        DepositUsed,
        DepositAmbiguous,
        DepositAgentMismatch,
        SubscriptionNotFound,
        SubscriptionConflict,
        ServerError,
        RateLimited,
    )
}
_BY_STATUS: dict[int, type[EscrowdError]] = {
    400: ValidationFailed,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: ValidationFailed,
    429: RateLimited,
    503: Unavailable,
}
_made: dict[tuple[str, int], type[EscrowdError]] = {}


def _class_for(error_type: str, status: int) -> type[EscrowdError]:
    known = _KNOWN.get(error_type)
    if known is not None and known.http_status == status:
        return known
    made = _made.get((error_type, status))
    if made is None:
        base = _BY_STATUS.get(status, ServerError if status >= 500 else EscrowdError)
        name = "".join(part.title() for part in error_type.split("_") if part) or "ApiError"
        made = cast(
            type[EscrowdError],
            type(
                name, (base,), {"type": error_type, "http_status": status, "__module__": __name__}
            ),
        )
        _made[error_type, status] = made
    return made


def error_for(status: int, error_type: str | None, message: str) -> EscrowdError:
    """The exception for an error answer (`error_type` None: not escrowd's error body)."""
    if error_type is None:
        base = _BY_STATUS.get(status, ServerError if status >= 500 else EscrowdError)
        return _class_for(base.type, status)(message)
    return _class_for(error_type, status)(message)
