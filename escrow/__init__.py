"""Ledger, escrow state machine, payouts and the webhook outbox."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from escrowd.escrow.interface import EscrowService

__all__ = ["EscrowService"]


def __getattr__(name: str) -> Any:
    # Lazy: importing escrow.ledger (the daemon, the indexers' sink) must not pull in the
    # whole service layer and its wallet dependencies.
    if name == "EscrowService":
        from escrowd.escrow.interface import EscrowService

        return EscrowService
    raise AttributeError(f"module 'escrow' has no attribute {name!r}")
