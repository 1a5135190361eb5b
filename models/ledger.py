"""Double-entry ledger: accounts and immutable transfers.

Balance of an account = credits - debits. Accounts flagged ``no_overdraft`` keep running
``debits_posted``/``credits_posted`` totals updated in the same statement that checks them;
the database itself refuses a negative balance for them. Accounts without that flag
(platform fees, custody, payouts in flight) are hot: their row is never updated and their
balance is the sum of their transfers, so unrelated transactions never queue on them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Index, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from escrowd.models.base import AccountKind, Base, BigIntPK, TransferCode, check_in, utcnow


class LedgerAccount(Base):
    __tablename__ = "ledger_accounts"
    __table_args__ = (
        UniqueConstraint("kind", "owner", "asset"),
        CheckConstraint(check_in("kind", AccountKind), name="kind_valid"),
        CheckConstraint("debits_posted >= 0 AND credits_posted >= 0", name="totals_nonnegative"),
        CheckConstraint(
            "NOT no_overdraft OR credits_posted >= debits_posted", name="no_overdraft_holds"
        ),
        CheckConstraint("escrowed >= 0", name="escrowed_nonnegative"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    # Agent id, escrow job id, chain name, ... depending on kind.
    owner: Mapped[str] = mapped_column(String(128))
    # Ledger currency code (asset symbol), e.g. USDC or SOL.
    asset: Mapped[str] = mapped_column(String(16))
    no_overdraft: Mapped[bool]
    debits_posted: Mapped[int] = mapped_column(default=0)
    credits_posted: Mapped[int] = mapped_column(default=0)
    # An agent's available account only: what its open escrows as buyer (funded, expired)
    # hold of this asset, kept by every fund and settlement so that a balance read takes it
    # from this row instead of summing the escrows (migration 0016; `ledger check`).
    escrowed: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerTransfer(Base):
    __tablename__ = "ledger_transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("debit_account_id <> credit_account_id", name="distinct_accounts"),
        CheckConstraint(check_in("code", TransferCode), name="code_valid"),
        Index("ix_ledger_transfers_debit", "debit_account_id"),
        Index("ix_ledger_transfers_credit", "credit_account_id"),
        Index("ix_ledger_transfers_ref", "ref_type", "ref_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(160), unique=True)
    # Account ids without foreign keys: a key would lock the hot fee and custody rows on
    # every transfer. Accounts are append-only instead (migration 0002) and `check` reports
    # a transfer whose account is missing.
    debit_account_id: Mapped[int] = mapped_column(BigIntPK)
    credit_account_id: Mapped[int] = mapped_column(BigIntPK)
    asset: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int]
    code: Mapped[str] = mapped_column(String(32))
    ref_type: Mapped[str] = mapped_column(String(32))
    ref_id: Mapped[str] = mapped_column(String(128))
    # Transfers posted together share a batch id: all legs or none.
    batch_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
