"""Where indexers hand deposits over. The indexer finds and confirms deposits on chain; what
crediting means (ledger, audit, webhooks) is the escrow layer's, injected as a DepositSink."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.orm import Session

from models import Deposit


class DepositSink(Protocol):
    def recorded(self, session: Session, deposit: Deposit) -> None:
        """A new pending deposit was stored (first sighting)."""

    def recorded_many(self, session: Session, deposits: list[Deposit]) -> None:
        """Several new pending deposits of one chain were stored together."""

    def confirmed(self, session: Session, deposit: Deposit) -> None:
        """`deposit` is final: credit it exactly once, in the caller's transaction."""

    def orphaned(self, session: Session, deposit: Deposit) -> None:
        """`deposit`'s block left the canonical chain; reverse the credit if it had one."""
