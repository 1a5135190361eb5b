"""Assets, agents, deposit addresses, deposits and chain scanning state."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from escrowd.models.base import Base, BigIntPK, DepositStatus, check_in, utcnow


class Asset(Base):
    """A token on one chain. `symbol` is the ledger currency its balances are kept in."""

    __tablename__ = "assets"
    __table_args__ = (
        UniqueConstraint("chain", "symbol"),
        CheckConstraint("decimals >= 0 AND decimals <= 36", name="decimals_range"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    chain: Mapped[str] = mapped_column(String(32))
    symbol: Mapped[str] = mapped_column(String(16))
    decimals: Mapped[int] = mapped_column(Integer)
    # ERC-20 contract or SPL mint; None for the chain's native coin.
    token_address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DepositAddress(Base):
    __tablename__ = "deposit_addresses"
    __table_args__ = (
        UniqueConstraint("chain", "address"),
        UniqueConstraint("chain", "derivation_index"),
        UniqueConstraint("agent_id", "chain"),
        CheckConstraint("derivation_index >= 0", name="derivation_index_nonnegative"),
        # The indexers' incremental refresh: new addresses of one chain by id.
        Index("ix_deposit_addresses_chain_id", "chain", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"))
    chain: Mapped[str] = mapped_column(String(32))
    address: Mapped[str] = mapped_column(String(64))
    derivation_index: Mapped[int] = mapped_column(Integer)
    # Solana: the USDC associated token account, which SPL transfers name instead of the owner.
    token_account: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Deposit(Base):
    __tablename__ = "deposits"
    __table_args__ = (
        UniqueConstraint("chain", "tx_hash", "log_index"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(check_in("status", DepositStatus), name="status_valid"),
        Index("ix_deposits_chain_status_block", "chain", "status", "block_number"),
        Index("ix_deposits_agent_id_id", "agent_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    chain: Mapped[str] = mapped_column(String(32))
    # EVM tx hash (66) or Solana signature (up to 88).
    tx_hash: Mapped[str] = mapped_column(String(100))
    # EVM log index; Solana balance-change index within the transaction.
    log_index: Mapped[int] = mapped_column(Integer)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id"))
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"))
    deposit_address_id: Mapped[int] = mapped_column(ForeignKey("deposit_addresses.id"))
    from_address: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[int]
    block_number: Mapped[int]
    block_hash: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=DepositStatus.PENDING)
    credited: Mapped[bool] = mapped_column(default=False)
    reversed: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ChainCursor(Base):
    """Scan progress. `key` is "" for a chain-wide cursor or an address for per-address ones."""

    __tablename__ = "chain_cursors"

    chain: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True, default="")
    block_number: Mapped[int | None]
    block_hash: Mapped[str | None] = mapped_column(String(100))
    # Solana per-address paging: the newest signature already processed.
    signature: Mapped[str | None] = mapped_column(String(100))
    # Solana per-address: the account's state (lamports, token amount) whose history up
    # to it is recorded; polls page its signatures only when the state differs.
    account_state: Mapped[str | None] = mapped_column(String(120))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ChainBlock(Base):
    """Hashes of recently scanned blocks, for detecting reorgs by the parent-hash chain."""

    __tablename__ = "chain_blocks"

    chain: Mapped[str] = mapped_column(String(32), primary_key=True)
    block_number: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    block_hash: Mapped[str] = mapped_column(String(100))
    parent_hash: Mapped[str] = mapped_column(String(100))
