"""Escrows (one per job), on-chain payouts and the nonces escrowd owns."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from escrowd.models.base import (
    Base,
    BigIntPK,
    EscrowStatus,
    PayoutReason,
    PayoutStatus,
    check_in,
    utcnow,
)

OPEN_ESCROW_STATES = (EscrowStatus.FUNDED, EscrowStatus.EXPIRED)
# The partial indexes' conditions; a query meant to use one states them as this SQL (a
# bound parameter cannot prove an index condition).
DUE_ESCROW_SQL = f"status = '{EscrowStatus.FUNDED}' AND expires_at IS NOT NULL"
FUNDED_BY_DEPOSIT_SQL = "deposit_id IS NOT NULL"
OPEN_ESCROW_SQL = f"status IN ('{EscrowStatus.FUNDED}', '{EscrowStatus.EXPIRED}')"
# Payouts that hold an agent's funds: not sweeps, not in a final state (the states of
# escrow.service.PAYOUT_FINAL_STATES).
HELD_BY_PAYOUT_SQL = (
    f"reason <> '{PayoutReason.SWEEP}' AND status NOT IN "
    f"('{PayoutStatus.CONFIRMED}', '{PayoutStatus.FAILED}', '{PayoutStatus.CANCELLED}')"
)
FAILED_SWEEP_SQL = f"status = '{PayoutStatus.FAILED}' AND reason = '{PayoutReason.SWEEP}'"


class Escrow(Base):
    __tablename__ = "escrows"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("fee_bps >= 0 AND fee_bps <= 10000", name="fee_bps_range"),
        CheckConstraint(check_in("status", EscrowStatus), name="status_valid"),
        CheckConstraint("buyer_agent_id <> worker_agent_id", name="distinct_parties"),
        # Funded escrows with an expiry only (migration 0005): the expiry job by due time. A
        # buyer's open escrows are summed on its account instead (migration 0016).
        Index(
            "ix_escrows_due",
            "expires_at",
            "id",
            postgresql_where=text(DUE_ESCROW_SQL),
            sqlite_where=text(DUE_ESCROW_SQL),
        ),
        # One escrow per deposit at most (migration 0012); partial, so an escrow funded from
        # a balance writes no entry.
        Index(
            "uq_escrows_deposit_id",
            "deposit_id",
            unique=True,
            postgresql_where=text(FUNDED_BY_DEPOSIT_SQL),
            sqlite_where=text(FUNDED_BY_DEPOSIT_SQL),
        ),
        # Open escrows only, counted at every /metrics scrape (migration 0020).
        Index(
            "ix_escrows_open",
            "status",
            postgresql_where=text(OPEN_ESCROW_SQL),
            sqlite_where=text(OPEN_ESCROW_SQL),
        ),
        # An agent's escrows in either role (GET /v1/audit?agent=).
        Index("ix_escrows_buyer_agent_id_id", "buyer_agent_id", "id"),
        Index("ix_escrows_worker_agent_id_id", "worker_agent_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(128), unique=True)
    buyer_agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"))
    worker_agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"))
    asset: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int]
    fee_bps: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=EscrowStatus.FUNDED)
    # Outcome, set once when the escrow reaches a terminal state.
    worker_amount: Mapped[int | None]
    fee_amount: Mapped[int | None]
    refund_amount: Mapped[int | None]
    expires_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
    payout_tx_hash: Mapped[str | None] = mapped_column(String(100))
    refund_tx_hash: Mapped[str | None] = mapped_column(String(100))
    # Set when the escrow was funded from one named deposit: that deposit and the address
    # its on-chain transfer came from.
    deposit_id: Mapped[int | None] = mapped_column(ForeignKey("deposits.id"))
    depositor_address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Payout(Base):
    __tablename__ = "payouts"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(check_in("status", PayoutStatus), name="status_valid"),
        CheckConstraint(check_in("reason", PayoutReason), name="reason_valid"),
        Index("ix_payouts_status_chain", "status", "chain"),
        # An agent's withdrawals in id order (GET /v1/withdrawals?agent=).
        Index("ix_payouts_agent_id_id", "agent_id", "id"),
        # A wallet's payouts, its latest change first (the Solana poller's last outflow of
        # each wallet, create_sweep's earlier sweeps of an address; migration 0020).
        Index(
            "ix_payouts_chain_source_address_updated_at", "chain", "source_address", "updated_at"
        ),
        # What an agent's open payouts hold (balances), without its settled history.
        Index(
            "ix_payouts_held_by_agent",
            "agent_id",
            postgresql_where=text(HELD_BY_PAYOUT_SQL),
            sqlite_where=text(HELD_BY_PAYOUT_SQL),
        ),
        # Failed sweeps by when they failed: the Solana sweeps' backoff, without the
        # chain's history of sweeps that went through.
        Index(
            "ix_payouts_failed_sweeps",
            "chain",
            "updated_at",
            postgresql_where=text(FAILED_SWEEP_SQL),
            sqlite_where=text(FAILED_SWEEP_SQL),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(160), unique=True)
    chain: Mapped[str] = mapped_column(String(32))
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id"))
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    escrow_id: Mapped[int | None] = mapped_column(ForeignKey("escrows.id"))
    reason: Mapped[str] = mapped_column(String(16))
    # Sweeps move funds from a deposit address; every other payout leaves the hot wallet.
    source_address: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default=PayoutStatus.REQUESTED)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_until: Mapped[datetime | None]
    nonce: Mapped[int | None]
    tx_hash: Mapped[str | None] = mapped_column(String(100))
    raw_tx: Mapped[bytes | None] = mapped_column(LargeBinary)
    max_fee_per_gas: Mapped[int | None]
    last_valid_block_height: Mapped[int | None]
    block_number: Mapped[int | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(500))
    # Why it waits (waiting_funds), was parked (needs_attention) or was cancelled.
    status_reason: Mapped[str | None] = mapped_column(String(500))
    # The in-flight status a needs_attention payout was parked from; `retry` resumes there.
    attention_from: Mapped[str | None] = mapped_column(String(16))
    # Consecutive failed steps (RPC or database trouble), and when the first of them was.
    step_errors: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    failing_since: Mapped[datetime | None]
    # Backoff: workers leave the payout alone until then.
    retry_at: Mapped[datetime | None]
    # The one `payout_stalled` alert of this run of failures was logged.
    stall_reported: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    broadcast_at: Mapped[datetime | None]
    confirmed_at: Mapped[datetime | None]


class PayoutTransaction(Base):
    """Every signed transaction of a payout (replacements included), stored before sending."""

    __tablename__ = "payout_transactions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    payout_id: Mapped[int] = mapped_column(ForeignKey("payouts.id"), index=True)
    tx_hash: Mapped[str] = mapped_column(String(100), unique=True)
    raw_tx: Mapped[bytes] = mapped_column(LargeBinary)
    nonce: Mapped[int | None]
    max_fee_per_gas: Mapped[int | None]
    last_valid_block_height: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SenderNonce(Base):
    """The next nonce of each EVM sending address; escrowd owns it, not the node."""

    __tablename__ = "sender_nonces"

    chain: Mapped[str] = mapped_column(String(32), primary_key=True)
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    next_nonce: Mapped[int]
