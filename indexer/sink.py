"""Where indexers hand deposits over. The indexer finds and confirms deposits on chain; what
crediting means (ledger, audit, webhooks) is the escrow layer's, injected as a DepositSink."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from sqlalchemy.orm import Session

from escrowd.models import Deposit


class StoredDeposit(NamedTuple):
    """A deposit row as just stored, without an ORM object: a backfill window stores
    thousands, and tracking each in the session would cost more than storing it (a named
    tuple: a quarter of a frozen dataclass's construction cost)."""

    id: int
    chain: str
    tx_hash: str
    log_index: int
    asset_id: int
    agent_id: int
    amount: int
    block_number: int
    block_hash: str
    status: str

    @classmethod
    def of(cls, deposit: Deposit) -> StoredDeposit:
        return cls(
            deposit.id,
            deposit.chain,
            deposit.tx_hash,
            deposit.log_index,
            deposit.asset_id,
            deposit.agent_id,
            deposit.amount,
            deposit.block_number,
            deposit.block_hash,
            deposit.status,
        )


@dataclass(frozen=True, slots=True)
class Finalized:
    """A pending deposit the chain has made final at `block_hash` (the confirmation depth
    on EVM, finalized on Solana), as the confirmation step checked it."""

    id: int
    block_hash: str


class DepositSink(Protocol):
    def recorded(self, session: Session, deposit: Deposit) -> None:
        """A new pending deposit was stored (first sighting)."""

    def recorded_many(self, session: Session, deposits: Sequence[StoredDeposit]) -> None:
        """Several new pending deposits were stored together."""

    def confirmed(self, session: Session, deposit: Deposit) -> None:
        """`deposit` (pending, its row locked by the caller) is final: credit it exactly
        once, in the caller's transaction."""

    def confirmed_many(self, session: Session, deposits: Sequence[Finalized]) -> int:
        """These deposits are final: credit each that is still pending at the given block
        hash exactly once, together, in the caller's transaction (the sink locks them);
        leave the others alone. Returns how many were credited."""

    def final_columns(
        self, session: Session, deposits: Sequence[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """The columns (status, credit state and amounts) new deposits, given as (asset id,
        amount), are stored with when they are final already."""

    def credited_new(self, session: Session, deposits: Sequence[StoredDeposit]) -> int:
        """Deposits this transaction has just stored with `final_columns`: credit them as
        `confirmed_many` would have (nothing to claim: nobody else sees them yet). Returns
        how many."""

    def orphaned(self, session: Session, deposit: Deposit) -> None:
        """`deposit`'s block left the canonical chain; reverse the credit if it had one."""
