"""Declarative base, column types and enums shared by every table."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, String, TypeDecorator
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


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), int: BigInteger(), str: String()}


def check_in(column: str, values: type[enum.StrEnum]) -> str:
    """SQL for a CHECK that a status column holds one of an enum's values."""
    allowed = ", ".join(f"'{member.value}'" for member in values)
    return f"{column} IN ({allowed})"


class Chain(enum.StrEnum):
    EVM = "evm"
    SOLANA = "solana"


class DepositStatus(enum.StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    ORPHANED = "orphaned"


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
