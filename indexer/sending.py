"""What a chain sender reports about a payout's transactions, shared by the EVM and
Solana senders so the payout worker (and `escrowd payouts cancel`) drive both alike."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TxState(enum.StrEnum):
    # Not (yet) on chain, or not deep enough: keep waiting, never cancel.
    PENDING = "pending"
    # Mined and deep enough (EVM) / finalized (Solana), and it succeeded.
    CONFIRMED = "confirmed"
    # Mined and deep enough, and the chain says it failed (EVM status 0, Solana err).
    FAILED = "failed"
    # Solana only: the blockhash expired and no stored signature is known to the
    # cluster, so none of them can land any more; a new signature is safe.
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class TxOutcome:
    state: TxState
    # The stored transaction the chain answered about (which replacement got mined).
    tx_hash: str | None = None
    block_number: int | None = None
    error: str | None = None
    # Lamports the fee payer (hot wallet) spent on fees and rent, Solana only.
    network_cost_base_units: int = 0


@dataclass(frozen=True, slots=True)
class SignedTx:
    """Signed bytes and what identifies them on chain; stored before they are sent."""

    tx_hash: str
    raw_tx: bytes
    nonce: int | None = None
    max_fee_per_gas: int | None = None
    max_priority_fee_per_gas: int | None = None
    last_valid_block_height: int | None = None


@dataclass(frozen=True, slots=True)
class LandingVerdict:
    """Whether any transaction signed for a payout can still be mined, as the chain shows
    it: a payout may be cancelled only when `may_land` is False."""

    may_land: bool
    # What the chain showed, for the operator and the audit row.
    explanation: str
