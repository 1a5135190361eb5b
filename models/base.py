"""Declarative base, column types and enums shared by every table."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, Numeric, String, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase

# Stable constraint names, so alembic autogenerate and hand-written DDL agree on both databases.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements a column declared exactly INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Uint256(TypeDecorator[int]):
    """Token amounts as large as a uint256 (up to 78 digits), exact on both databases:
    NUMERIC(78, 0) on PostgreSQL, decimal text on SQLite, whose integer columns hold 64
    bits and turn larger values into floats. SQL arithmetic on the SQLite form is wrong:
    sum and compare these in Python there."""

    impl = Numeric(78, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(78))
        return dialect.type_descriptor(Numeric(78, 0))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**256:
            raise ValueError(f"not a uint256 amount: {value!r}")
        return str(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        # PostgreSQL hands back a Decimal without exponent, SQLite the stored text.
        return None if value is None else int(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), int: BigInteger(), str: String()}


def check_in(column: str, values: Iterable[str]) -> str:
    """SQL that a status column holds one of `values` (an enum's, for a CHECK, or some of
    them, for a query a partial index serves): literals, not bound parameters."""
    allowed = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({allowed})"


class Chain(enum.StrEnum):
    EVM = "evm"
    SOLANA = "solana"


class DepositStatus(enum.StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    ORPHANED = "orphaned"


class DepositCreditState(enum.StrEnum):
    """What happened to a deposit's credit (models.chain.Deposit explains each)."""

    NONE = "none"
    CREDITED = "credited"
    DUST = "dust"
    REFUSED = "refused"
    REVERSED = "reversed"
    REVERSAL_SHORT = "reversal_short"


class AccountKind(enum.StrEnum):
    AGENT_AVAILABLE = "agent_available"
    ESCROW = "escrow"
    PLATFORM_FEES = "platform_fees"
    CUSTODY = "custody"
    PAYOUTS_IN_FLIGHT = "payouts_in_flight"
    # Free-form accounts for operators' adjustments and tests of the ledger itself.
    GENERAL = "general"


class TransferCode(enum.StrEnum):
    DEPOSIT = "deposit"
    DEPOSIT_REVERSAL = "deposit_reversal"
    ESCROW_FUND = "escrow_fund"
    ESCROW_RELEASE = "escrow_release"
    FEE = "fee"
    REFUND = "refund"
    PAYOUT_HOLD = "payout_hold"
    PAYOUT = "payout"
    PAYOUT_REVERSAL = "payout_reversal"
    ADJUSTMENT = "adjustment"
    SUBSCRIPTION_CHARGE = "subscription_charge"


class EscrowStatus(enum.StrEnum):
    FUNDED = "funded"
    RELEASED = "released"
    REFUNDED = "refunded"
    RESOLVED = "resolved"
    EXPIRED = "expired"


class PayoutStatus(enum.StrEnum):
    REQUESTED = "requested"
    SIGNED = "signed"
    BROADCAST = "broadcast"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    # Not yet signed: the hot wallet cannot cover the amount and the network fee now.
    WAITING_FUNDS = "waiting_funds"
    # An unexpected error parked it; the hold stays until `payouts retry` or `cancel`.
    NEEDS_ATTENTION = "needs_attention"
    # Cancelled by an operator once nothing signed for it could land; the hold reversed.
    CANCELLED = "cancelled"


class PayoutReason(enum.StrEnum):
    RELEASE = "release"
    REFUND = "refund"
    WITHDRAWAL = "withdrawal"
    SWEEP = "sweep"


class ApiScope(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
