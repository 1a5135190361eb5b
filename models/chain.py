"""Assets, agents, deposit addresses, deposits and chain scanning state."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from escrowd.models.base import (
    Base,
    BigIntPK,
    DepositCreditState,
    DepositStatus,
    Uint256,
    check_in,
    utcnow,
)

# The partial index's condition; a query meant to use it states it as this SQL (a bound
# parameter cannot prove an index condition).
PENDING_DEPOSIT_SQL = f"status = '{DepositStatus.PENDING}'"


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
        # What a deposit's (address, agent) foreign key refers to (migration 0022).
        Index("uq_deposit_addresses_id_agent_id", "id", "agent_id", unique=True),
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
    """A transfer into a deposit address, and what became of its credit.

    `amount` is in the chain token's base units (its own decimals, up to a uint256); the
    ledger keeps the asset at one scale (models.registry), so a credit is the amount
    converted exactly, and a remainder below one ledger unit is never credited.
    `credit_state`:
      none            not credited (pending, or orphaned before it was final)
      credited        `credited_base_units` (ledger units) stand for it; any remainder is in
                      `dust_base_units` (chain units) with the reason in `credit_note`
      dust            all of it is below one ledger unit: held on chain, not credited
      refused         too large for a ledger amount: not credited, `credit_note` says so
      reversed        a reorg took it back and its credit was reversed in full
      reversal_short  a reorg took it back but the agent's balance no longer covered the
                      reversal: `credited_base_units` of its credit still stand (the shortfall)
    A deposit that reappears after a reversal is credited again only for what was taken
    back, so it ends `credited` with its whole value standing once.
    `credited` (credited at least once) and `reversed` (its credit fully reversed) are the
    same facts as booleans, for older readers.
    """

    __tablename__ = "deposits"
    __table_args__ = (
        UniqueConstraint("chain", "tx_hash", "log_index"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(check_in("status", DepositStatus), name="status_valid"),
        CheckConstraint(check_in("credit_state", DepositCreditState), name="credit_state_valid"),
        CheckConstraint(
            "credited_base_units >= 0 AND dust_base_units >= 0", name="credit_amounts_valid"
        ),
        # The address exists and belongs to the deposit's agent (which exists through the
        # address's own key): one check per stored deposit, where a key on each column took
        # two and let the pair disagree.
        ForeignKeyConstraint(
            ["deposit_address_id", "agent_id"],
            ["deposit_addresses.id", "deposit_addresses.agent_id"],
        ),
        Index("ix_deposits_chain_status_block", "chain", "status", "block_number"),
        Index("ix_deposits_agent_id_id", "agent_id", "id"),
        # Deposits of one status by id (GET /v1/deposits?status=, the oldest pending one in
        # /metrics): the pending ones are not behind every confirmed one (migration 0020).
        Index("ix_deposits_status_id", "status", "id"),
        # An agent's incoming funds (balances), without its credited history.
        Index(
            "ix_deposits_pending_by_agent",
            "agent_id",
            postgresql_where=text(PENDING_DEPOSIT_SQL),
            sqlite_where=text(PENDING_DEPOSIT_SQL),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    chain: Mapped[str] = mapped_column(String(32))
    # EVM tx hash (66) or Solana signature (up to 88).
    tx_hash: Mapped[str] = mapped_column(String(100))
    # EVM log index; Solana balance-change index within the transaction.
    log_index: Mapped[int] = mapped_column(Integer)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id"))
    # The type of the keys they refer to (INTEGER on SQLite); the foreign key is the pair's.
    agent_id: Mapped[int] = mapped_column(BigIntPK)
    deposit_address_id: Mapped[int] = mapped_column(BigIntPK)
    from_address: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(Uint256())
    block_number: Mapped[int]
    block_hash: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=DepositStatus.PENDING)
    credited: Mapped[bool] = mapped_column(default=False)
    reversed: Mapped[bool] = mapped_column(default=False)
    # Server defaults too: the indexers' bulk insert leaves these out.
    credit_state: Mapped[str] = mapped_column(
        String(16), default=DepositCreditState.NONE, server_default=DepositCreditState.NONE.value
    )
    credited_base_units: Mapped[int] = mapped_column(default=0, server_default="0")
    dust_base_units: Mapped[int] = mapped_column(Uint256(), default=0, server_default="0")
    credit_note: Mapped[str | None] = mapped_column(String(200))
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
