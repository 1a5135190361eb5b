"""Tokens escrowd does not support that arrived at deposit addresses, and the operator's
recoveries of them.

Amounts are decimal strings of base units: such a token may have any decimals and any
uint256 amount, which neither BIGINT nor SQLite's NUMERIC (a float) holds exactly. Nothing
here touches the ledger: these tokens were never credited to anyone.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from escrowd.models.base import Base, BigIntPK, check_in, utcnow

# uint256 needs up to 78 decimal digits.
AMOUNT_DIGITS = 78


class RecoveryStatus(enum.StrEnum):
    # Recorded; nothing signed yet.
    REQUESTED = "requested"
    # The transfer is signed and stored (sent, or to be sent once the address has gas).
    SIGNED = "signed"
    CONFIRMED = "confirmed"
    # Mined and reverted: the tokens did not move.
    FAILED = "failed"


OPEN_RECOVERY_SQL = "status IN ('requested', 'signed')"


class UnsupportedDeposit(Base):
    """A Transfer of an ERC-20 other than the chain's USDC into a deposit address."""

    __tablename__ = "unsupported_deposits"
    __table_args__ = (
        UniqueConstraint("chain", "tx_hash", "log_index"),
        Index("ix_unsupported_deposits_agent_id_id", "agent_id", "id"),
        Index("ix_unsupported_deposits_chain_to_address", "chain", "to_address", "token_address"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    chain: Mapped[str] = mapped_column(String(32))
    tx_hash: Mapped[str] = mapped_column(String(100))
    log_index: Mapped[int] = mapped_column(Integer)
    token_address: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"))
    deposit_address_id: Mapped[int] = mapped_column(ForeignKey("deposit_addresses.id"))
    to_address: Mapped[str] = mapped_column(String(64))
    from_address: Mapped[str] = mapped_column(String(64))
    amount_base_units: Mapped[str] = mapped_column(String(AMOUNT_DIGITS))
    block_number: Mapped[int]
    block_hash: Mapped[str] = mapped_column(String(100))
    # The confirmed recovery that moved this token out of the address, once one did.
    recovery_id: Mapped[int | None] = mapped_column(ForeignKey("token_recoveries.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TokenRecovery(Base):
    """An operator's sweep of a token from a deposit address to a named destination. At
    most one open per (chain, token, address); its signed transactions are stored before
    they are sent, so running the command again resumes it and never signs a second one."""

    __tablename__ = "token_recoveries"
    __table_args__ = (
        CheckConstraint(check_in("status", RecoveryStatus), name="status_valid"),
        Index(
            "ix_token_recoveries_open",
            "chain",
            "token_address",
            "source_address",
            unique=True,
            postgresql_where=text(OPEN_RECOVERY_SQL),
            sqlite_where=text(OPEN_RECOVERY_SQL),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    chain: Mapped[str] = mapped_column(String(32))
    token_address: Mapped[str] = mapped_column(String(64))
    source_address: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    amount_base_units: Mapped[str] = mapped_column(String(AMOUNT_DIGITS))
    status: Mapped[str] = mapped_column(String(16), default=RecoveryStatus.REQUESTED)
    requested_by: Mapped[str] = mapped_column(String(128))
    gas_limit: Mapped[int]
    nonce: Mapped[int | None]
    tx_hash: Mapped[str | None] = mapped_column(String(100))
    raw_tx: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The latest gas funding sent to the source address for this recovery.
    gas_tx_hash: Mapped[str | None] = mapped_column(String(100))
    gas_raw_tx: Mapped[bytes | None] = mapped_column(LargeBinary)
    block_number: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
