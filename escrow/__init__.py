"""Ledger, escrow state machine, payouts and the webhook outbox.

For a backend in the same process: `EscrowService` (sync) and `AsyncEscrowService`
(asyncio), returning the values of `escrowd.escrow.values` and raising the errors of
`escrowd.escrow.errors` and `escrowd.config.errors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from escrowd.escrow.interface import AsyncEscrowService, EscrowService

__all__ = ["AsyncEscrowService", "EscrowService"]


def __getattr__(name: str) -> Any:
    # Lazy: importing escrow.ledger (the daemon, the indexers' sink) must not pull in the
    # whole service layer and its wallet dependencies.
    if name in __all__:
        from escrowd.escrow import interface

        return getattr(interface, name)
    raise AttributeError(f"module 'escrowd.escrow' has no attribute {name!r}")
