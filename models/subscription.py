"""Recurring charges: a buyer's standing authorization and one row per charged period."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from escrowd.models.base import Base, BigIntPK, check_in, utcnow


class SubscriptionStatus(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    CANCELED = "canceled"


class SubscriptionInterval(enum.StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class ChargeStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


MAX_INTERVAL_COUNT = 365
# The scheduler's index holds only active subscriptions; its query states this as a literal.
ACTIVE_SUBSCRIPTION_SQL = f"status = '{SubscriptionStatus.ACTIVE}'"


class Subscription(Base):
    """`buyer` authorizes `amount` of `asset` every `interval_count` `interval`s, to the
    worker (minus `fee_bps`) or, with no worker, to the platform. Period k starts at
    `anchor_at` + k intervals; `next_period` is the first period not yet decided."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("fee_bps >= 0 AND fee_bps <= 10000", name="fee_bps_range"),
        CheckConstraint(check_in("status", SubscriptionStatus), name="status_valid"),
        CheckConstraint(check_in("interval", SubscriptionInterval), name="interval_valid"),
        CheckConstraint(
            f"interval_count >= 1 AND interval_count <= {MAX_INTERVAL_COUNT}",
            name="interval_count_range",
        ),
        CheckConstraint("next_period >= 0", name="next_period_nonnegative"),
        CheckConstraint(
            "worker_agent_id IS NULL OR worker_agent_id <> buyer_agent_id",
            name="distinct_parties",
        ),
        Index(
            "ix_subscriptions_due",
            "next_charge_at",
            "id",
            postgresql_where=text(ACTIVE_SUBSCRIPTION_SQL),
            sqlite_where=text(ACTIVE_SUBSCRIPTION_SQL),
        ),
        Index("ix_subscriptions_buyer_id", "buyer_agent_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    # The marketplace's own id of the subscription.
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    buyer_agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id"))
    # None: the platform is paid.
    worker_agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"))
    asset: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int]
    fee_bps: Mapped[int] = mapped_column(Integer)
    interval: Mapped[str] = mapped_column(String(8))
    interval_count: Mapped[int] = mapped_column(Integer)
    anchor_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), default=SubscriptionStatus.ACTIVE)
    next_period: Mapped[int] = mapped_column(Integer, default=0)
    # When the scheduler looks at it next: the next period's start, or a failed charge's retry.
    next_charge_at: Mapped[datetime]
    paused_at: Mapped[datetime | None]
    canceled_at: Mapped[datetime | None]
    canceled_by: Mapped[str | None] = mapped_column(String(16))
    # The last unexpected error the scheduler met on this subscription, if any.
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SubscriptionCharge(Base):
    """The charge of one period. The unique (subscription, period) pair is what keeps a
    period from being charged twice, whichever runner or daemon gets there."""

    __tablename__ = "subscription_charges"
    __table_args__ = (
        UniqueConstraint("subscription_id", "period_index"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("period_index >= 0", name="period_index_nonnegative"),
        CheckConstraint(check_in("status", ChargeStatus), name="status_valid"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id"))
    period_index: Mapped[int] = mapped_column(Integer)
    period_start: Mapped[datetime]
    amount: Mapped[int]
    # Set when the charge succeeds: what the payee got and the platform's fee.
    payee_amount: Mapped[int | None]
    fee_amount: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(500))
    charged_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
